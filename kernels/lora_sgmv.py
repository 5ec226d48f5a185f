"""Multi-LoRA shrink and expand as segmented GEMMs (punica SGMV, S-LoRA) over tokens sorted by
adapter slot (`LoRABatch`): one launch covers every adapter of the step, base-only tokens are
in no segment, and programs past the end of a segment (or past a slot's true rank) exit early.

The two jitted kernels are generic over where a segment's matrix lives (pointer + strides), so
`compressed_lora.py` launches them with the shared cluster bases V_c / U_c as well:
- shrink: h[t, r] (+)= sum_k x[t, k] * W[seg(t)][r, k]   (split over K with fp32 atomics)
- expand: y[t, n] += sum_r (h[t, r] * sigma?[t, r]) * W[seg(t)][n, r]
Walk-through: token_slots = [2, -1, 0, 2] -> sorted_token_ids = [2, 0, 3], slots = [0, 2],
counts = [1, 2], offsets = [0, 1]; program (segment 1, m-block 0) handles tokens 0 and 3
with lora_a[2] and lora_b[2]; token 1 is never read or written.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from inlaid_ray.kernels._common import cdiv, dot, interp_upcast, is_interpreted, next_pow2
from inlaid_ray.kernels.tuning import pick_by_max_m, tuned_table
from inlaid_ray.model.forward_batch import LoRABatch

# (atol, rtol) against the fp32 references, for outputs of order 1: the kernels round h to the
# weight dtype before the expand dot (as punica does).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 3e-2),
}


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of a segmented shrink; `max_m` buckets by the largest segment."""

    block_m: int = 16
    block_k: int = 256
    split_k: int = 8
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class ExpandConfig:
    """Launch parameters of a segmented expand."""

    block_m: int = 16
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2


# Decode bucket: the H100 winner of load_tests/bench_kernels.py (2026-11); larger buckets untuned.
DEFAULT_SHRINK: list[tuple[int, ShrinkConfig]] = [
    (16, ShrinkConfig(block_m=16, block_k=128, split_k=32)),
    (128, ShrinkConfig(block_m=32, block_k=128, split_k=4, num_stages=3)),
    (1 << 30, ShrinkConfig(block_m=64, block_k=64, split_k=2, num_stages=3)),
]
DEFAULT_EXPAND: list[tuple[int, ExpandConfig]] = [
    (16, ExpandConfig(block_m=16, block_n=128)),
    (1 << 30, ExpandConfig(block_m=64, block_n=128, num_stages=3)),
]


def _select(op: str, defaults: list, cls: type, max_count: int, device: torch.device):
    entries = tuned_table(op, device).get("default")
    if entries:
        e = pick_by_max_m(entries, max_count)
        return cls(**{f: e.get(f, v) for f, v in asdict(cls()).items()})
    for max_m, cfg in defaults:
        if max_count <= max_m:
            return cfg
    return defaults[-1][1]


@functools.lru_cache(maxsize=1024)
def select_shrink_config(max_count: int, device: torch.device) -> ShrinkConfig:
    """Tuned shrink config for segments of up to `max_count` tokens, else the code default
    (cached: a launch plan is chosen once per shape, not per call)."""
    return _select("sgmv_shrink", DEFAULT_SHRINK, ShrinkConfig, max_count, device)


@functools.lru_cache(maxsize=1024)
def select_expand_config(max_count: int, device: torch.device) -> ExpandConfig:
    """Tuned expand config for segments of up to `max_count` tokens, else the code default (cached)."""
    return _select("sgmv_expand", DEFAULT_EXPAND, ExpandConfig, max_count, device)


@functools.lru_cache(maxsize=256)
def block_r(rank: int) -> int:
    """Rank tile: a power of two in [16, 64] (tl.dot needs >= 16; larger ranks loop)."""
    return max(16, min(64, next_pow2(rank)))


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, seg_ids_ptr, counts_ptr, offsets_ptr, ranks_ptr,
    K, R, slice_r, stride_xm, stride_ws, stride_wr, stride_wk, stride_hm, k_per_split,
    HAS_RANKS: tl.constexpr, SLICED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_mr = tl.program_id(1)
    pid_k = tl.program_id(2)
    pid_m = pid_mr // tl.cdiv(R, BLOCK_R)
    pid_r = pid_mr % tl.cdiv(R, BLOCK_R)
    count = tl.load(counts_ptr + seg)
    if pid_m * BLOCK_M >= count:  # past the end of this segment
        return
    s = tl.load(seg_ids_ptr + seg).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if SLICED:  # R = slices x slice_r rows: slice p's row j is p * slice_r + j, real while j < rank
        mask_r = offs_r < R
        if HAS_RANKS:
            mask_r = mask_r & ((offs_r % slice_r) < tl.load(ranks_ptr + s).to(tl.int32))
    else:
        rank = R
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + s).to(tl.int32)
        if pid_r * BLOCK_R >= rank:  # only zero padding left
            return
        mask_r = offs_r < rank
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tok = tl.load(sorted_ids_ptr + tl.load(offsets_ptr + seg) + offs_m, mask=mask_m, other=0).to(tl.int64)
    w_base = w_ptr + s * stride_ws
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(
            w_base + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
            mask=mask_k[:, None] & mask_r[None, :], other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        acc = dot(xt, wt, acc, UPCAST)
    ptrs = h_ptr + tok[:, None] * stride_hm + offs_r[None, :]
    hmask = mask_m[:, None] & mask_r[None, :]
    if not ATOMIC:  # this program owns its outputs
        tl.store(ptrs, acc, mask=hmask)
    else:
        tl.atomic_add(ptrs, acc, mask=hmask)


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, h_ptr, w_ptr, sigma_ptr, rows_ptr, sorted_ids_ptr, seg_ids_ptr, counts_ptr, offsets_ptr, ranks_ptr,
    starts_ptr, N, R, n_blocks, stride_ym, stride_hm, stride_ws, stride_wn, stride_wr, stride_ss, stride_sn,
    HAS_RANKS: tl.constexpr, HAS_SIGMA: tl.constexpr, SLICED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    count = tl.load(counts_ptr + seg)
    if pid_m * BLOCK_M >= count:
        return
    s = tl.load(seg_ids_ptr + seg).to(tl.int64)
    rank = R
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + s).to(tl.int32)
    if SLICED:  # output columns [starts[p], starts[p+1]) read h columns [p * R, (p + 1) * R)
        p = pid_n // n_blocks
        n_start = tl.load(starts_ptr + p) + (pid_n % n_blocks) * BLOCK_N
        n_end = tl.load(starts_ptr + p + 1)
        if n_start >= n_end:  # past the end of this slice
            return
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        h_ptr = h_ptr + p * R
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tok = tl.load(sorted_ids_ptr + tl.load(offsets_ptr + seg) + offs_m, mask=mask_m, other=0).to(tl.int64)
    w_base = w_ptr + s * stride_ws
    if HAS_SIGMA:  # diagonal core of a compressed adapter, gathered per token's row
        sig_base = sigma_ptr + s * stride_ss + tl.load(rows_ptr + tok, mask=mask_m, other=0).to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        hm = mask_m[:, None] & mask_r[None, :]
        ht = tl.load(h_ptr + tok[:, None] * stride_hm + offs_r[None, :], mask=hm, other=0.0)
        if HAS_SIGMA:
            ht = ht * tl.load(sig_base[:, None] + offs_r[None, :], mask=hm, other=0.0).to(tl.float32)
        wt = tl.load(
            w_base + offs_n[None, :] * stride_wn + offs_r[:, None] * stride_wr,
            mask=mask_r[:, None] & mask_n[None, :], other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        acc = dot(ht.to(wt.dtype), wt, acc, UPCAST)
    ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def _check_segments(sorted_ids: torch.Tensor, seg_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
                    device: torch.device) -> None:
    for name, t in (("sorted_token_ids", sorted_ids), ("segment ids", seg_ids), ("counts", counts), ("offsets", offsets)):
        assert t.device == device and t.is_contiguous(), f"{name} on {t.device} (contiguous={t.is_contiguous()}), expected {device}"
        assert t.dtype in (torch.int32, torch.int64), f"{name} dtype {t.dtype}"
    assert seg_ids.shape == counts.shape == offsets.shape, (seg_ids.shape, counts.shape, offsets.shape)


def sgmv_shrink(
    h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], rank: int,
    sorted_ids: torch.Tensor, seg_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
    launch: tuple[int, int], ranks: torch.Tensor | None, config: ShrinkConfig | None, slice_rank: int = 0,
) -> None:
    """h[t, :rank] += W[seg] x[t] for segment tokens; W element (s, r, k) at w + s*ws + r*wr + k*wk.
    `launch` = (segments, tokens per segment) the grid covers; programs past a segment's count exit.
    slice_rank > 0: the `rank` rows are slices of `slice_rank` rows each, and `ranks` bounds each slice."""
    num_segments, max_count = launch
    if not num_segments or not max_count:
        return
    k = x.shape[1]
    cfg = config or select_shrink_config(max_count, x.device)
    br = block_r(slice_rank or rank)
    split_k = max(1, min(cfg.split_k, cdiv(k, cfg.block_k)))
    k_per_split = cdiv(cdiv(k, split_k), cfg.block_k) * cfg.block_k
    grid = (num_segments, cdiv(max_count, cfg.block_m) * cdiv(rank, br), split_k)
    _sgmv_shrink_kernel[grid](
        x, w, h, sorted_ids, seg_ids, counts, offsets, ranks if ranks is not None else counts,
        k, rank, slice_rank or rank, x.stride(0), *w_strides, h.stride(0), k_per_split,
        HAS_RANKS=ranks is not None, SLICED=slice_rank > 0, BLOCK_M=cfg.block_m, BLOCK_R=br, BLOCK_K=cfg.block_k,
        ATOMIC=split_k > 1,
        UPCAST=interp_upcast(_sgmv_shrink_kernel, x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def sgmv_expand(
    y: torch.Tensor, h: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], rank: int,
    sorted_ids: torch.Tensor, seg_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
    launch: tuple[int, int], ranks: torch.Tensor | None, config: ExpandConfig | None,
    sigma: torch.Tensor | None = None, rows: torch.Tensor | None = None,
    slices: tuple[tuple[int, ...], torch.Tensor] | None = None,
) -> None:
    """y[t] += W[seg] (h[t] * sigma[seg, rows[t]]) for segment tokens; W element (s, n, r) at w + s*ws + n*wn + r*wr.
    slices = (output widths, device int tensor of their boundaries [0, w0, w0 + w1, ...]): output
    slice p (its columns of y and rows of W) reads h columns [p * rank, (p + 1) * rank)."""
    num_segments, max_count = launch
    if not num_segments or not max_count:
        return
    n = y.shape[1]
    cfg = config or select_expand_config(max_count, y.device)
    n_blocks = cdiv(max(slices[0]) if slices else n, cfg.block_n)
    grid = (num_segments, cdiv(max_count, cfg.block_m), n_blocks * (len(slices[0]) if slices else 1))
    _sgmv_expand_kernel[grid](
        y, h, w, sigma if sigma is not None else h, rows if rows is not None else counts,
        sorted_ids, seg_ids, counts, offsets, ranks if ranks is not None else counts,
        slices[1] if slices else counts, n, rank, n_blocks, y.stride(0), h.stride(0), *w_strides,
        sigma.stride(0) if sigma is not None else 0, sigma.stride(1) if sigma is not None else 0,
        HAS_RANKS=ranks is not None, HAS_SIGMA=sigma is not None, SLICED=slices is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_R=block_r(rank), UPCAST=interp_upcast(_sgmv_expand_kernel, w.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# Layouts already checked: the checks run once per (activation, bank, ranks) layout and once per
# step's batch, not on each of a step's ~14 launches per layer (each check is host time).
_CHECKED_LAYOUTS: set[tuple] = set()
_CHECKED_BATCH: list[LoRABatch | None] = [None]


def _check_lora(x: torch.Tensor, w: torch.Tensor, batch: LoRABatch, ranks: torch.Tensor | None, what: str) -> None:
    layout = (what, x.shape[1:], x.stride(1), x.dtype, x.device, w.shape, w.stride(), w.dtype, w.device,
              None if ranks is None else (ranks.shape, ranks.device))
    if layout not in _CHECKED_LAYOUTS:
        assert x.dim() == 2 and x.stride(1) == 1, f"{what}: activations must be [T, d] with contiguous rows"
        assert w.dim() == 3 and w.stride(2) == 1, f"{what}: bank must be 3-D with contiguous rows, got {tuple(w.shape)}"
        assert w.dtype in TOLERANCES, f"{what}: dtype {w.dtype} not in {list(TOLERANCES)}"
        assert x.device == w.device, f"{what}: activations on {x.device}, bank on {w.device}"
        assert x.is_cuda or is_interpreted(_sgmv_shrink_kernel), "CPU tensors need TRITON_INTERPRET=1"
        if ranks is not None:
            assert ranks.shape == (w.shape[0],) and ranks.device == x.device, f"ranks {tuple(ranks.shape)} on {ranks.device}"
        _CHECKED_LAYOUTS.add(layout)
    assert batch.token_slots.shape[0] == x.shape[0], f"{what}: {batch.token_slots.shape[0]} token slots for {x.shape[0]} tokens"
    if _CHECKED_BATCH[0] is not batch or batch.sorted_token_ids.device != x.device:
        _check_segments(batch.sorted_token_ids, batch.slots, batch.counts, batch.offsets, x.device)
        _CHECKED_BATCH[0] = batch


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, *,
    ranks: torch.Tensor | None = None, config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """Segmented shrink: h[t] = lora_a[slot(t)] @ x[t] for tokens with an adapter, 0 elsewhere.

    Semantics:
        for each segment i, s = slots[i], t in sorted_token_ids[offsets[i] : offsets[i] + counts[i]]:
            h[t, r] = sum_k x[t, k] * lora_a[s, r, k]        (r < max_rank; rows of other tokens 0)
    Args:
        x: [T, d_in] fp16/bf16/fp32 (same dtype as lora_a), contiguous rows.
        lora_a: [num_slots, max_rank, d_in], contiguous.   batch: `LoRABatch` on x.device.
        ranks: optional [num_slots] int, promise that lora_a[s, ranks[s]:] == 0 (skipped, same result).
    Returns: h [T, max_rank] fp32.
    """
    _check_lora(x, lora_a, batch, ranks, "lora_shrink")
    assert x.dtype == lora_a.dtype, f"x dtype {x.dtype} != lora_a dtype {lora_a.dtype}"
    assert x.shape[1] == lora_a.shape[2], f"x {tuple(x.shape)} does not match lora_a {tuple(lora_a.shape)}"
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    strides = lora_a.stride()
    sgmv_shrink(h, x, lora_a, strides, lora_a.shape[1], batch.sorted_token_ids, batch.slots, batch.counts,
                batch.offsets, batch.launch, ranks, config)
    return h


def lora_expand(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch, *,
    ranks: torch.Tensor | None = None, config: ExpandConfig | None = None,
) -> None:
    """Segmented expand: y[t] += lora_b[slot(t)] @ h[t] for tokens with an adapter; y modified in place.

    Semantics:
        for each segment i, s = slots[i], t in its tokens:  y[t, n] += sum_r h[t, r] * lora_b[s, n, r]
    Args:
        y: [T, d_out] fp16/bf16/fp32 (same dtype as lora_b), contiguous rows; modified in place.
        h: [T, max_rank] fp32 (from `lora_shrink`), contiguous.
        lora_b: [num_slots, d_out, max_rank], contiguous, scaling folded in.
        ranks: optional [num_slots] int, promise that lora_b[s, :, ranks[s]:] == 0.
    """
    _check_lora(y, lora_b, batch, ranks, "lora_expand")
    assert y.dtype == lora_b.dtype, f"y dtype {y.dtype} != lora_b dtype {lora_b.dtype}"
    assert y.shape[1] == lora_b.shape[1], f"y {tuple(y.shape)} does not match lora_b {tuple(lora_b.shape)}"
    assert h.dtype == torch.float32 and h.is_contiguous() and h.shape == (y.shape[0], lora_b.shape[2]), (
        f"h must be contiguous fp32 {(y.shape[0], lora_b.shape[2])}, got {h.dtype} {tuple(h.shape)}")
    strides = lora_b.stride()
    sgmv_expand(y, h, lora_b, strides, lora_b.shape[2], batch.sorted_token_ids, batch.slots, batch.counts,
                batch.offsets, batch.launch, ranks, config)


def lora_shrink_expand(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch, *,
    ranks: torch.Tensor | None = None,
    shrink_config: ShrinkConfig | None = None, expand_config: ExpandConfig | None = None,
) -> None:
    """y[t] += lora_b[s] @ (lora_a[s] @ x[t]) with s = batch.token_slots[t] >= 0; y modified in place.

    Two launches for all adapters (shrink, expand); shapes and dtypes as in `lora_shrink` and
    `lora_expand`. Nothing is launched when no token has an adapter.
    """
    if not batch.num_active_slots and batch.max_count is None:
        return
    h = lora_shrink(x, lora_a, batch, ranks=ranks, config=shrink_config)
    lora_expand(y, h, lora_b, batch, ranks=ranks, config=expand_config)


def lora_shrink_expand_slices(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
    slices: tuple[tuple[int, ...], torch.Tensor], *, ranks: torch.Tensor | None = None,
    shrink_config: ShrinkConfig | None = None, expand_config: ExpandConfig | None = None,
) -> None:
    """The LoRA terms of projections fused along their outputs (q/k/v, gate/up), in two launches
    for every slice and adapter: y[t, slice p] += lora_b[s, slice p] @ (lora_a[s, p*R:(p+1)*R] @ x[t]).

    Args:
        y: [T, sum of widths], the fused projection's output; modified in place.
        x: [T, d_in], the input every slice reads.
        lora_a: [num_slots, P * R, d_in], slice p's A in rows [p*R, (p+1)*R).
        lora_b: [num_slots, sum of widths, R], slice p's B in the rows of its output columns.
        slices: (output widths, their boundaries [0, w0, w0 + w1, ...] as an int tensor on y's device).
        ranks: optional [num_slots], promise that rows j >= ranks[s] of every slice of lora_a[s] are 0.
    Equal to `lora_shrink_expand` on each slice's views (tests/kernels/test_lora_sgmv.py).
    """
    if not batch.num_active_slots and batch.max_count is None:
        return
    widths, _ = slices
    rank = lora_b.shape[2]
    _check_lora(x, lora_a, batch, ranks, "lora_shrink_slices")
    _check_lora(y, lora_b, batch, ranks, "lora_expand_slices")
    assert x.dtype == lora_a.dtype == y.dtype == lora_b.dtype, (x.dtype, lora_a.dtype, y.dtype, lora_b.dtype)
    assert lora_a.shape[1] == len(widths) * rank and lora_b.shape[1] == y.shape[1] == sum(widths), (
        f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} and y {tuple(y.shape)} do not fit slices {widths}")
    assert x.shape[1] == lora_a.shape[2], f"x {tuple(x.shape)} does not match lora_a {tuple(lora_a.shape)}"
    bounds = slices[1]  # its values are the caller's promise (checking them would sync the device)
    assert bounds.shape == (len(widths) + 1,) and bounds.device == y.device and bounds.dtype in (torch.int32, torch.int64), (
        f"slice boundaries {tuple(bounds.shape)} {bounds.dtype} on {bounds.device}, expected {len(widths) + 1} ints on {y.device}")
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    seg = (batch.sorted_token_ids, batch.slots, batch.counts, batch.offsets, batch.launch)
    sgmv_shrink(h, x, lora_a, lora_a.stride(), lora_a.shape[1], *seg, ranks, shrink_config, slice_rank=rank)
    sgmv_expand(y, h, lora_b, lora_b.stride(), rank, *seg, ranks, expand_config, slices=slices)
