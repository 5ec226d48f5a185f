"""Next-token sampling on fp32 logits, on the logits' device: greedy, temperature, top-k and
top-p (nucleus).

Batch independence: a request's token depends only on its logits, its parameters, its seed
and how many tokens it has sampled before, never on the other rows. Each sampled row draws one
uniform u = splitmix64(seed, token index) computed on the device for all rows at once (a
counter-based generator: no per-request generator state, nothing to copy to the device but the
step's seeds and counters, one transfer) and takes the token where the cumulative distribution
first exceeds u (inverse CDF, exact). Rows are vectorised in groups that need the same
computation (plain temperature / one top-k value / full sort for top-p alone), so a row's
arithmetic, shapes included, never depends on which other requests share the step. The sampled
ids come back to the host in one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inlaid_ray.engine.request import SamplingParams

# Temperatures below this are treated as greedy: dividing by them overflows fp32 logits.
GREEDY_EPS = 1e-5


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int | None],
    counters: Sequence[int],
) -> list[int]:
    """One token id per row of `logits` [S, vocab] (fp32): row i with params[i], its seed (None
    for greedy rows) and counters[i], the index of the token it samples (its output tokens so far)."""
    assert logits.dim() == 2 and logits.shape[0] == len(params) == len(seeds) == len(counters), (
        f"logits {tuple(logits.shape)}, {len(params)} params, {len(seeds)} seeds, {len(counters)} counters"
    )
    logits = logits.float()
    out = logits.argmax(dim=-1)  # [S]; greedy rows keep this
    groups: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(params):
        if p.temperature >= GREEDY_EPS:
            assert seeds[i] is not None, f"row {i} samples (temperature {p.temperature}) but has no seed"
            groups.setdefault(_group_key(p, logits.shape[1]), []).append(i)
    if groups:
        sampled = [i for rows in groups.values() for i in rows]
        # seeds are 64-bit, signed or not (SamplingParams); the generator works mod 2^64
        keys = torch.tensor([[_signed64(seeds[i]) for i in sampled], [counters[i] for i in sampled]],
                            dtype=torch.int64)
        u_all = uniforms(*keys.to(logits.device, non_blocking=True)).to(logits.dtype)  # [R_total], one copy
        position = {row: k for k, row in enumerate(sampled)}
    for (kind, k), rows in groups.items():
        values, order = _candidates(logits[rows], [params[i] for i in rows], kind, k)
        u = u_all[[position[i] for i in rows]]  # [R]
        probs = values.softmax(dim=-1)  # [R, C]
        cdf = probs.cumsum(dim=-1)
        # First candidate whose cumulative mass exceeds u * total: zero-mass candidates are never
        # hit, and when rounding makes u * total reach the total, the last candidate with mass wins.
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [R, 1]
        last = (probs > 0).int().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
        idx = torch.minimum(idx, last)
        picked = idx if order is None else order.gather(1, idx)
        out[rows] = picked.squeeze(1)
    return out.tolist()


# splitmix64 (Steele, Lea and Flood 2014; the seeding generator of xoshiro) constants as int64.
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """u in [0, 1) (float64) per element: the top 53 bits of splitmix64's output for state
    seed + (counter + 1) * gamma, on the tensors' device (int64 arithmetic wraps mod 2^64)."""
    z = seeds.to(torch.int64) + (counters.to(torch.int64) + 1) * _GAMMA
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0**-53


def _group_key(p: SamplingParams, vocab: int) -> tuple[str, int]:
    """Rows computed together: same candidate set shape and order."""
    if 0 < p.top_k < vocab:
        return ("top_k", p.top_k)
    return ("sorted", 0) if p.top_p < 1.0 else ("plain", 0)


def _candidates(
    logits: torch.Tensor, params: Sequence[SamplingParams], kind: str, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled, filtered logits of the candidates [R, C] (-inf = excluded) and their token ids.

    `order` is None when the candidates are the whole vocabulary in token order.
    """
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits / temperature[:, None]
    if kind == "plain":
        return scaled, None
    if kind == "top_k":
        values, order = scaled.topk(k, dim=-1)  # [R, k], descending
    else:
        values, order = scaled.sort(dim=-1, descending=True, stable=True)  # [R, vocab]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely candidates
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False  # the most likely token always stays
    return values.masked_fill(drop, float("-inf")), order


def sampling_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The distribution `sample` draws from, [R, vocab], after temperature, top-k (-1 = off), top-p.

    Top-k keeps the k largest logits; top-p then keeps the smallest prefix of the sorted,
    renormalised distribution whose mass reaches p (always at least the most likely token).
    """
    vocab = logits.shape[1]
    out = torch.zeros_like(logits, dtype=torch.float32)
    for r in range(logits.shape[0]):
        p = SamplingParams(temperature=float(temperature[r]), top_k=int(top_k[r]), top_p=float(top_p[r]))
        kind, k = _group_key(p, vocab)
        values, order = _candidates(logits[r : r + 1].float(), [p], kind, k)
        probs = values.softmax(dim=-1)
        out[r] = probs[0] if order is None else out[r].scatter(0, order[0], probs[0])
    return out
