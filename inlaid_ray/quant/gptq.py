"""GPTQ on one linear layer: blockwise OBS error feedback over input columns (docs/algorithms.md 2.3,
following IST-DASLab `gptq.py::fasterquant` and AutoGPTQ's scale/zero/g_idx outputs), plus the
non-PSD handling MLGPTQ's max-aggregated Hessians need (5.4: escalate damping, then eigen-clip).

Works on plain tensors: W [d_out, d_in] and H [d_in, d_in] wherever the caller put them (the
computation runs on W's device, in fp32). `rtn_quantize` is the round-to-nearest baseline on the
same grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from inlaid_ray.quant.quantizer import QuantGrid, quantize_codes

log = logging.getLogger(__name__)


@dataclass
class GPTQResult:
    """One quantized layer. Semantics: Q[o, c] = scales[g_idx[c], o] * (codes[o, c] - zeros[g_idx[c], o])."""

    codes: torch.Tensor  # int32 [d_out, d_in], in [0, 2^bits)
    Q: torch.Tensor  # fp32 [d_out, d_in], the dequantized grid values
    scales: torch.Tensor  # fp32 [n_groups, d_out], every value exactly representable in fp16
    zeros: torch.Tensor  # int32 [n_groups, d_out], real zero points (the v1 file stores zero - 1)
    g_idx: torch.Tensor  # int32 [d_in], group of each input column (original column order)
    bits: int
    loss: float | None  # GPTQ's sum of (w - q)^2 / (2 Hinv_cc^2); None for RTN
    damp_used: float  # damp_percent finally used (>= grid.damp_percent after escalation)
    eig_clipped: bool = False  # H needed the PSD repair (non-PSD aggregate; grid.psd_repair)


def _check_inputs(W: torch.Tensor, H: torch.Tensor | None, grid: QuantGrid) -> int:
    if W.dim() != 2:
        raise ValueError(f"W must be [d_out, d_in]; got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    if H is not None:
        if tuple(H.shape) != (d_in, d_in):
            raise ValueError(
                f"H shape {tuple(H.shape)} does not match W [d_out={d_out}, d_in={d_in}]; expected ({d_in}, {d_in})"
            )
        if H.device != W.device:
            raise ValueError(f"W is on {W.device} but H is on {H.device}; put both on one device")
        if not bool(torch.isfinite(H).all()):
            raise ValueError("H has non-finite entries (NaN/Inf); the calibration activations overflowed")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W has non-finite entries (NaN/Inf)")
    return grid.group_width(d_in)


def _try_inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor | None:
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), or None if not positive definite."""
    Hd = H.clone()
    Hd.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def inverse_hessian_factor(H: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, float, bool]:
    """(Hinv upper factor, damp_percent used, eigen-clipped?) for fp32 H (docs/algorithms.md 2.3 step
    6-7 and 5.4): standard damping; on failure double damp_percent up to `grid.damp_max`; then
    clip eigenvalues of H at a small positive floor and apply the standard damping again."""
    percdamp = grid.damp_percent
    while True:
        U = _try_inverse_factor(H, percdamp)
        if U is not None:
            if percdamp != grid.damp_percent:
                log.info("Cholesky needed damp_percent=%g (configured %g)", percdamp, grid.damp_percent)
            return U, percdamp, False
        if percdamp >= grid.damp_max:
            break
        percdamp = min(percdamp * 2.0, grid.damp_max)
    # Last resort (eigh is O(d^3) like Cholesky; runs rarely): "clip" projects H onto the PSD
    # cone; "shift" adds (-min eigenvalue + floor) * I.
    evals, evecs = torch.linalg.eigh(H)
    floor = max(float(torch.diag(H).mean()), 1e-12) * 1e-6
    if grid.psd_repair == "shift":
        Hpsd = H.clone()
        Hpsd.diagonal().add_(max(0.0, -float(evals.min())) + floor)
    else:
        Hpsd = (evecs * evals.clamp_min(floor)) @ evecs.t()
        Hpsd = (Hpsd + Hpsd.t()) / 2  # [d_in, d_in], re-symmetrise rounding noise
    U = _try_inverse_factor(Hpsd, grid.damp_percent)
    if U is None:
        raise ValueError(
            f"H of shape {tuple(H.shape)} is not invertible even after damping up to {grid.damp_max} "
            f"and eigenvalue clipping (min eigenvalue {float(evals.min()):.3g})"
        )
    log.warning(
        "H not positive definite up to damp_percent=%g: PSD repair %r (min eigenvalue was %.3g)",
        grid.damp_max,
        grid.psd_repair,
        float(evals.min()),
    )
    return U, grid.damp_percent, True


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: QuantGrid) -> GPTQResult:
    """Quantize W [d_out, d_in] against the input Hessian H [d_in, d_in] (docs/algorithms.md 2.3).

    Runs on W.device in fp32; H may be non-PSD (max-aggregated). Neither input is modified.
    """
    g = _check_inputs(W, H, grid)
    d_out, d_in = W.shape
    maxq = grid.maxq
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    scale, zero = grid.find_params(W)  # whole-row params (used as-is when group_size == -1)

    dead = torch.diag(H) == 0  # inputs never active: any value works, use 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if grid.static_groups and grid.group_size != -1:
        static = [grid.find_params(W[:, i : i + g]) for i in range(0, d_in, g)]  # original columns

    perm = torch.arange(d_in, device=W.device)
    if grid.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    invperm = torch.argsort(perm)
    perm_list = perm.tolist()  # host copy: no device sync per column in the loop

    Hinv, damp_used, clipped = inverse_hessian_factor(H, grid)
    del H

    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    losses = torch.zeros_like(W)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []
    for i1 in range(0, d_in, grid.blocksize):
        i2 = min(i1 + grid.blocksize, d_in)
        W1 = W[:, i1:i2].clone()  # [d_out, count], receives in-block error feedback
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i  # position in processing order
            w, d = W1[:, i], Hinv1[i, i]
            if grid.group_size != -1:
                if static:
                    scale, zero = static[perm_list[col] // g]
                elif col % g == 0:
                    # As in the reference: params from W, which holds the lazy updates of earlier
                    # blocks but not this block's in-block feedback (identical when g == blocksize).
                    scale, zero = grid.find_params(W[:, col : col + g])
                    group_scales.append(scale)
                    group_zeros.append(zero)
            c = quantize_codes(w, scale, zero, maxq)
            q = scale * (c - zero)
            codes[:, col], Q[:, col] = c, q
            losses[:, col] = (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # OBS update of the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the columns after the block

    if static:
        group_scales, group_zeros = [s for s, _ in static], [z for _, z in static]
    elif grid.group_size == -1:
        group_scales, group_zeros = [scale], [zero]
    # g_idx: static groups or no act-order -> c // g; dynamic groups + act-order -> (position of
    # column c in the processing order) // g, so the kernel must gather per input channel.
    pos = torch.arange(d_in, device=W.device)
    g_idx = pos // g if (static or not grid.desc_act) else invperm // g
    return GPTQResult(
        codes=codes[:, invperm].to(torch.int32),
        Q=Q[:, invperm],
        scales=torch.stack(group_scales),  # [n_groups, d_out]
        zeros=torch.stack(group_zeros).to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=grid.bits,
        loss=float(losses.sum()),
        damp_used=damp_used,
        eig_clipped=clipped,
    )


def rtn_quantize(W: torch.Tensor, grid: QuantGrid) -> GPTQResult:
    """Round-to-nearest baseline on the same grid (group params from W, no error feedback)."""
    g = _check_inputs(W, None, grid)
    d_out, d_in = W.shape
    W = W.detach().float()
    params = [grid.find_params(W[:, i : i + g]) for i in range(0, d_in, g)]
    scales = torch.stack([s for s, _ in params])  # [n_groups, d_out]
    zeros = torch.stack([z for _, z in params])
    g_idx = torch.arange(d_in, device=W.device) // g
    s, z = scales[g_idx].t(), zeros[g_idx].t()  # [d_out, d_in]
    codes = quantize_codes(W, s, z, grid.maxq)
    return GPTQResult(
        codes=codes.to(torch.int32),
        Q=s * (codes - z),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=grid.bits,
        loss=None,
        damp_used=0.0,
        eig_clipped=False,
    )
