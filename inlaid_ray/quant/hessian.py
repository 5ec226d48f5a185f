"""Layer-input Hessians `H = 2 X X^T / N` for GPTQ, and their aggregation across tasks.

`HessianAccumulator` is GPTQ's `add_batch` (docs/algorithms.md 2.2) fed by a forward pre-hook on a
linear layer, with one change MLGPTQ needs (5.4 item 2, 11 item 3): the running average counts
REAL tokens (padding masked out), not sequences, so Hessians of tasks with different prompt
lengths are on the same scale. `max_aggregate_hessians` is MLGPTQ's element-wise max over tasks
(5.3); `mix_aggregate_hessians` is the GPTQ-mixed baseline, identical to running GPTQ on the
union of all tasks' calibration data. `channel_max_aggregate_hessians` keeps the max per input
channel (the diagonal) but takes the channel correlations from the mix, so it stays PSD (5.4).
Two more readings of "the max over tasks", studied in load_tests/quant_ablation.py (5.4 item 7):
`eigenbasis_max_aggregate_hessians` takes the max energy per eigendirection of the mix (PSD), and
`normalized_max_aggregate_hessians` the element-wise max of scale-normalised task Hessians.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class HessianAccumulator:
    """Running `H = (2 / num_tokens) * sum_tokens x x^T` (fp32 [d_in, d_in]) of one layer input."""

    def __init__(self, d_in: int, device: torch.device | str = "cpu") -> None:
        if d_in <= 0:
            raise ValueError(f"d_in={d_in} must be positive")
        self.d_in = d_in
        self.H = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.num_tokens = 0  # real (non-pad) tokens seen
        self.weight_total = 0.0  # sum of token weights: the normaliser (= num_tokens when unweighted)
        self.num_sequences = 0  # metadata only (GPTQ's own normaliser)

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None) -> None:
        """Add activations `x [tokens, d_in]` or `[B, S, d_in]`; `mask` (same leading shape, true =
        real token) drops padding; `weights` (same leading shape, >= 0) weighs tokens, making H the
        weighted mean `2 sum w x x^T / sum w` (e.g. an attention-sink token down-weighted)."""
        if x.shape[-1] != self.d_in or x.dim() not in (2, 3):
            raise ValueError(
                f"activations of shape {tuple(x.shape)}; expected [tokens, {self.d_in}] or [B, S, {self.d_in}]"
            )
        for name, t in (("mask", mask), ("weights", weights)):
            if t is not None and tuple(t.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"{name} shape {tuple(t.shape)} does not match activations {tuple(x.shape)}")
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
        n_seq = 1 if x.dim() == 2 else int(x.shape[0] if mask is None else mask.any(dim=1).sum())
        x = x.reshape(-1, self.d_in)  # [tokens, d_in]
        w = None if weights is None else weights.reshape(-1).to(device=self.H.device, dtype=torch.float32)
        if mask is not None:
            keep = mask.reshape(-1)
            x = x[keep]
            w = None if w is None else w[keep.to(w.device)]
        n = x.shape[0]
        if w is not None and bool((w < 0).any()):
            raise ValueError("token weights must be non-negative")
        added = float(n) if w is None else float(w.sum())
        if n == 0 or added == 0.0:
            self.num_tokens += n
            return
        x = x.to(device=self.H.device, dtype=torch.float32)
        total = self.weight_total + added
        # Running average as in the reference (keeps fp32 magnitudes bounded): rescale the old
        # mean, then add the new tokens with weight 2 w / total through sqrt(2 w / total) * x.
        self.H.mul_(self.weight_total / total)
        x = x * (2.0 / total) ** 0.5 if w is None else x * (2.0 * w / total).sqrt().unsqueeze(1)
        self.H.addmm_(x.t(), x)  # [d_in, tokens] @ [tokens, d_in]
        self.num_tokens += n
        self.weight_total = total
        self.num_sequences += n_seq

    def hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: `linear.register_forward_pre_hook(acc.hook)` records the layer input."""
        self.add_batch(args[0].detach())


def _as_tensor(h: torch.Tensor | HessianAccumulator) -> torch.Tensor:
    return h.H if isinstance(h, HessianAccumulator) else h


def _check_same_shape(hs: Sequence[torch.Tensor]) -> None:
    if not hs:
        raise ValueError("no Hessians to aggregate")
    shapes = {tuple(h.shape) for h in hs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"Hessians must all be square and of one shape; got {sorted(shapes)}")


def max_aggregate_hessians(hs: Sequence[torch.Tensor | HessianAccumulator]) -> torch.Tensor:
    """MLGPTQ aggregate: `H[i, j] = max_t H_t[i, j]` (fp32). Commutative, associative and
    idempotent, so a running max over tasks is exact; the result need not be PSD (5.4)."""
    mats = [_as_tensor(h) for h in hs]
    _check_same_shape(mats)
    out = mats[0].float().clone()
    for h in mats[1:]:
        torch.maximum(out, h.to(out.device, torch.float32), out=out)
    return out


def mix_aggregate_hessians(
    hs: Sequence[torch.Tensor | HessianAccumulator], token_counts: Sequence[float] | None = None
) -> torch.Tensor:
    """GPTQ-mixed baseline: token-weighted mean `sum_t n_t H_t / sum_t n_t` (fp32), i.e. the
    Hessian of the union of all tasks' tokens. `token_counts` defaults to the accumulators' own."""
    mats = [_as_tensor(h) for h in hs]
    _check_same_shape(mats)
    if token_counts is None:
        if not all(isinstance(h, HessianAccumulator) for h in hs):
            raise ValueError("token_counts are required when aggregating plain tensors")
        token_counts = [h.weight_total for h in hs]  # type: ignore[union-attr]  (= num_tokens unweighted)
    if len(token_counts) != len(mats):
        raise ValueError(f"{len(token_counts)} token counts for {len(mats)} Hessians")
    if any(n < 0 for n in token_counts) or sum(token_counts) <= 0:
        raise ValueError(f"token_counts={list(token_counts)} must be non-negative with a positive sum")
    total = float(sum(token_counts))
    out = torch.zeros_like(mats[0], dtype=torch.float32)
    for h, n in zip(mats, token_counts):
        out.add_(h.to(out.device, torch.float32), alpha=n / total)
    return out


def channel_max_aggregate_hessians(
    hs: Sequence[torch.Tensor | HessianAccumulator], token_counts: Sequence[float] | None = None
) -> torch.Tensor:
    """PSD max aggregate: `S M S` with M the token-weighted mean and `S = diag(sqrt(max_t H_t[i, i] /
    M[i, i]))`, so the diagonal is every channel's max energy over tasks (as the element-wise max)
    while the off-diagonals keep the pooled data's correlations. A congruence of the PSD mean, so
    Cholesky never needs eigenvalue clipping (the element-wise max of the off-diagonals is where
    the max turns indefinite: max of task-dependent entries is a positively biased random matrix)."""
    mix = mix_aggregate_hessians(hs, token_counts)
    top = torch.stack([_as_tensor(h).diagonal().to(mix.device, torch.float32) for h in hs]).amax(dim=0)
    return channel_max_from_mix(mix, top)


def channel_max_from_mix(mix: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`S M S` with `S = diag(sqrt(top / diag(M)))`: the mix `M` rescaled so that its diagonal is
    `top` (every channel's max energy over tasks); channels the mix never saw stay as they are."""
    mix = mix.float().clone()
    mean = mix.diagonal()
    top = top.to(mix.device, torch.float32)
    scale = torch.where(mean > 0, (top / mean.clamp_min(torch.finfo(mean.dtype).tiny)).sqrt(), torch.ones_like(mean))
    return mix.mul_(scale.unsqueeze(1)).mul_(scale.unsqueeze(0))


def eigenbasis_max_aggregate_hessians(
    hs: Sequence[torch.Tensor | HessianAccumulator], token_counts: Sequence[float] | None = None
) -> torch.Tensor:
    """Max energy per direction, in one shared basis: with `M = E diag(m) E^T` the token-weighted
    mean, `H = E diag(max_t diag(E^T H_t E)) E^T`. Every direction of the pooled data keeps the
    largest second moment any task has along it; PSD by construction (each diagonal entry is a
    task's energy along a unit vector), and equal to the element-wise max when the H_t commute
    with M and each other (e.g. all diagonal). Computed in fp64."""
    mix = mix_aggregate_hessians(hs, token_counts).double()
    _, basis = torch.linalg.eigh(mix)  # [d, d], columns orthonormal
    energy = torch.stack([((_as_tensor(h).to(mix.device, torch.float64) @ basis) * basis).sum(0) for h in hs])
    top = energy.amax(dim=0).clamp_min(0.0)  # [d]; rounding can leave -1e-17 on null directions
    out = (basis * top) @ basis.t()
    return ((out + out.t()) / 2).float()


def normalized_max_aggregate_hessians(hs: Sequence[torch.Tensor | HessianAccumulator]) -> torch.Tensor:
    """Element-wise max of the task Hessians each divided by its mean diagonal (its overall
    input energy), rescaled by the mean of those energies: the max compares the SHAPE of each
    task's statistics, not their scale. Like the plain max it need not be PSD."""
    mats = [_as_tensor(h).float() for h in hs]
    _check_same_shape(mats)
    energies = [float(m.diagonal().mean()) for m in mats]
    if min(energies) <= 0:
        raise ValueError("a task Hessian with zero energy cannot be normalised")
    out = mats[0] / energies[0]
    for m, e in zip(mats[1:], energies[1:]):
        torch.maximum(out, m.to(out.device) / e, out=out)
    return out.mul_(sum(energies) / len(energies))
