"""W4A16 GEMM (also 2- and 8-bit weights) on the GPTQ v1 checkpoint layout (docs/algorithms.md
section 3), following Marlin's recipe (docs/performance.md "How to get there"): every packed int32 is
read from memory once, unpacked and scaled in registers, and accumulated in fp32.

Each tile of BLOCK_K input channels is BLOCK_W = BLOCK_K / PACK packed rows (PACK = 32 / bits
codes per word), loaded once. Three ways to turn it into products (chosen by `GPTQGemmConfig`):
- GEMV (`block_m == 1`, decode): fp32 FMAs on interleaved K: sub-tile j is code j of every word,
  i.e. channels k0 + PACK*i + j, multiplied by the matching stride-PACK slice of x (the K order
  inside a tile is permuted, the sum is the same). Example (4 bits): sub-tile 3 multiplies
  channels 3, 11, 19, ... by `(word >> 12) & 0xF`.
- interleaved dot (`interleave=True`): the same sub-tiles, PACK small `tl.dot`s per tile.
- natural dot (default for `block_m >= 16`): codes are unpacked in registers (tl.join/reshape)
  into natural channel order and meet a contiguous x tile in one `tl.dot`; `swap_ab` computes
  out^T = W x^T so the weights are the dot's first operand (no permute, wgmma for M < 64).
`split_k > 1` spreads K over many programs so small-M calls still stream from every SM. The K
splits of a tile are summed either by fp32 atomics into a zeroed buffer, then one cast
(`split_k_reduce="atomic"`: three kernels), or by the last split to finish the tile
(`"last"`: every split stores its fp32 partial and takes a ticket from a per-tile atomic
counter; the one holding the last ticket sums the partials in split order, writes the output
dtype and resets the counter, so there is one kernel, no zero fill, no cast, and the sum does
not depend on the order the splits ran in).
Group scales: when `group_size` is declared and a multiple of BLOCK_K, a whole tile shares one
group and the scale is applied once per output after the tile's dot (fast path); otherwise
scales and zeros are gathered per input channel through `g_idx` (act-order) or `c // group_size`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from inlaid_ray.kernels._common import cdiv, dot, interp_upcast, is_interpreted
from inlaid_ray.kernels.ops import GPTQ_KERNEL_BITS
from inlaid_ray.kernels.tuning import pick_by_max_m, tuned_table

# Held to (atol, rtol) against `gptq_matmul_ref` (fp32 math on the fp16-rounded dense W),
# for outputs of order 1; bf16 also rounds the dequantized weight to bf16 on the dot path.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
}

_KERNEL_BITS = GPTQ_KERNEL_BITS
_GROUP_PER_TILE, _GROUP_DIV, _GROUP_GATHER = 0, 1, 2
_STORE, _ATOMIC, _LAST_SPLIT = 0, 1, 2  # how a program writes its tile (REDUCE)
SPLIT_K_REDUCTIONS = {"atomic": _ATOMIC, "last": _LAST_SPLIT}


@dataclass(frozen=True)
class GPTQGemmConfig:
    """Launch parameters of one call; `block_m == 1` selects the GEMV path."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128  # input channels per tile
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # dot path only: dequantized weights as the dot's first operand
    interleave: bool = False  # dot path only: PACK sub-dots on interleaved K instead of one dot
    split_k_reduce: str = "atomic"  # how K splits are summed: "atomic" or "last" (module docstring)


# Fallback when kernels/configs/<gpu>.json has no entry: (max_m, config), ascending max_m.
# Values: the shape-independent winners of load_tests/bench_kernels.py on an H100 (2026-11).
DEFAULT_CONFIGS: list[tuple[int, GPTQGemmConfig]] = [
    (1, GPTQGemmConfig(block_m=1, block_n=64, block_k=128, split_k=16, num_warps=4, num_stages=3)),
    (16, GPTQGemmConfig(block_m=16, block_n=64, block_k=128, split_k=8, num_warps=4, num_stages=3, swap_ab=True)),
    (32, GPTQGemmConfig(block_m=32, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3, swap_ab=True)),
    (64, GPTQGemmConfig(block_m=64, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3)),
    (1 << 30, GPTQGemmConfig(block_m=128, block_n=64, block_k=64, split_k=1, num_warps=8, num_stages=3)),
]


def select_config(m: int, k: int, n: int, device: torch.device) -> GPTQGemmConfig:
    """Tuned config for this GPU and shape (`"KxN"` entry, then `"default"`), else the code default."""
    table = tuned_table("gptq_gemm", device)
    entries = table.get(f"{k}x{n}") or table.get("default")
    if entries:
        e = pick_by_max_m(entries, m)
        return GPTQGemmConfig(**{f: e.get(f, v) for f, v in asdict(GPTQGemmConfig()).items()})
    for max_m, cfg in DEFAULT_CONFIGS:
        if m <= max_m:
            return cfg
    return DEFAULT_CONFIGS[-1][1]


@triton.jit
def _code_f16(q):
    # 0x6400 is fp16 1024.0 with an empty 10-bit mantissa: OR-ing a code c < 1024 into it
    # gives exactly 1024 + c without an int->float conversion (quarter-rate on the ALUs).
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _code_f32(q):
    # Same trick in fp32: 0x4B000000 is 2^23.
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _code(packed, j: tl.constexpr, BITS: tl.constexpr):
    return (packed >> (BITS * j)) & ((1 << BITS) - 1)


# tl.join adds its new axis last, so flattening [..., a, b, c] reads the outermost join fastest:
# to get code j at flat index j, the outer join takes the even codes first, then the odd ones.
@triton.jit
def _nat2(packed, j: tl.constexpr, s: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_code(packed, j, BITS), _code(packed, j + s, BITS))


@triton.jit
def _nat4(packed, j: tl.constexpr, s: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_nat2(packed, j, 2 * s, BITS), _nat2(packed, j + s, 2 * s, BITS))


@triton.jit
def _nat8(packed, j: tl.constexpr, s: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_nat4(packed, j, 2 * s, BITS), _nat4(packed, j + s, 2 * s, BITS))


@triton.jit
def _unpack_natural(packed, BITS: tl.constexpr, SWAP_AB: tl.constexpr):
    """Codes of a packed tile in natural channel order, unpacked in registers:
    [BLOCK_W, BLOCK_N] -> [BLOCK_K, BLOCK_N] (row PACK*i + j = code j of word row i), or with
    SWAP_AB [BLOCK_N, BLOCK_W] -> [BLOCK_N, BLOCK_K]."""
    PACK: tl.constexpr = 32 // BITS
    D0: tl.constexpr = packed.shape[0]
    D1: tl.constexpr = packed.shape[1]
    if BITS == 8:
        q = _nat4(packed, 0, 1, BITS)
    elif BITS == 4:
        q = _nat8(packed, 0, 1, BITS)
    else:
        q = tl.join(_nat8(packed, 0, 2, BITS), _nat8(packed, 1, 2, BITS))
    q = tl.reshape(q, (D0, D1, PACK))  # [..., j] = code j (row-major over the joined axes)
    if SWAP_AB:
        return tl.reshape(q, (D0, D1 * PACK))
    else:
        return tl.reshape(tl.permute(q, (0, 2, 1)), (D0 * PACK, D1))


@triton.jit
def _along(v, AXIS: tl.constexpr):
    # Lay a 1-D index/vector along axis AXIS of a 2-D tile.
    if AXIS == 0:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit(do_not_specialize=["M"])  # one binary for every batch size
def _gptq_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr, partial_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, group_size, k_per_split,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE: tl.constexpr,
    SWAP_AB: tl.constexpr, INTERLEAVE: tl.constexpr, UPCAST: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    BLOCK_W: tl.constexpr = BLOCK_K // PACK
    # Tile orientation. Default: weights [K, N], x [M, K], out [M, N]. SWAP_AB computes
    # out^T = W x^T so the dequantized weights are the dot's first operand: weights [N, K],
    # x [K, M], out [N, M]. A0 is the axis of m (x, out) and of k (weights); A1 the other.
    A0: tl.constexpr = SWAP_AB  # 0 or 1
    A1: tl.constexpr = 1 - SWAP_AB
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n_words = K // PACK
    zcols = N // PACK
    zero_shift = (offs_n % PACK) * BITS
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)  # GEMV: reduced over rows at the end
    elif SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rows = k0 // PACK + offs_w  # packed word rows of this tile
        mask_w = rows < n_words
        wmask = _along(mask_w, A0) & _along(mask_n, A1)
        packed = tl.load(qweight_ptr + _along(rows, A0) * N + _along(offs_n, A1), mask=wmask, other=0)
        if BLOCK_M == 1:
            x_base = x_ptr + pid_m * stride_xm + (k0 + offs_w * PACK)  # channel of code 0 per word
            hi = packed >> 16  # codes of the upper half-word, shifted down once per word
            if GROUP_MODE == 0:
                g = k0 // group_size
                scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                zword = tl.load(qzeros_ptr + g * zcols + offs_n // PACK, mask=mask_n, other=0)
                zero = ((zword >> zero_shift) & MAXQ) + 1  # v1 stores zero - 1
                tile = tl.zeros(acc.shape, dtype=tl.float32)
                for j in tl.static_range(PACK):
                    # Code j stays in place (no shift): (word & (MAXQ << b)) | 2^23 as fp32 is
                    # 2^23 + q * 2^b exactly (b < 16); minus 2^23 + z * 2^b gives (q - z) * 2^b,
                    # and x is pre-scaled by 2^-b. Three ALU ops per weight: LOP3, FADD, FFMA.
                    sh = BITS * (j % (PACK // 2))
                    src = packed if j < PACK // 2 else hi
                    xj = tl.load(x_base + j, mask=mask_w, other=0.0).to(tl.float32) * (1.0 / (1 << sh))
                    wq = ((src & (MAXQ << sh)) | 0x4B000000).to(tl.float32, bitcast=True)
                    tile += xj[:, None] * (wq - ((zero << sh) | 0x4B000000).to(tl.float32, bitcast=True)[None, :])
                acc += tile * scale[None, :]
            else:
                for j in tl.static_range(PACK):
                    ch = k0 + offs_w * PACK + j
                    if GROUP_MODE == 1:
                        g = ch // group_size
                    else:
                        g = tl.load(g_idx_ptr + ch, mask=mask_w, other=0)
                    s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0)
                    zword = tl.load(qzeros_ptr + g[:, None] * zcols + (offs_n // PACK)[None, :], mask=wmask, other=0)
                    zero = ((zword >> zero_shift[None, :]) & MAXQ) + 1
                    xj = tl.load(x_base + j, mask=mask_w, other=0.0).to(tl.float32)
                    q = (packed >> (j * BITS)) & MAXQ
                    acc += xj[:, None] * ((_code_f32(q) - _code_f32(zero)) * s.to(tl.float32))
        elif INTERLEAVE:
            # Dot path, interleaved K: sub-tile j (code j of every word, no repacking) meets the
            # stride-PACK slice of x; PACK small dots per tile (module docstring).
            if GROUP_MODE == 0:
                g = k0 // group_size
                scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                zword = tl.load(qzeros_ptr + g * zcols + offs_n // PACK, mask=mask_n, other=0)
                zero = _along(((zword >> zero_shift) & MAXQ) + 1, A1)
                tile = tl.zeros(acc.shape, dtype=tl.float32)
                for j in tl.static_range(PACK):
                    ch = k0 + offs_w * PACK + j
                    xmask = _along(mask_m, A0) & _along(mask_w, A1)
                    xj = tl.load(x_ptr + _along(offs_m, A0) * stride_xm + _along(ch, A1), mask=xmask, other=0.0)
                    w = (_code_f16(_code(packed, j, BITS)) - _code_f16(zero)).to(xj.dtype)
                    if SWAP_AB:
                        tile = dot(w, xj, tile, UPCAST)
                    else:
                        tile = dot(xj, w, tile, UPCAST)
                acc += tile * _along(scale, A1)
            else:
                for j in tl.static_range(PACK):
                    ch = k0 + offs_w * PACK + j
                    if GROUP_MODE == 1:
                        g = ch // group_size
                    else:
                        g = tl.load(g_idx_ptr + ch, mask=mask_w, other=0)
                    s = tl.load(scales_ptr + _along(g, A0) * N + _along(offs_n, A1), mask=wmask, other=0.0)
                    zword = tl.load(qzeros_ptr + _along(g, A0) * zcols + _along(offs_n // PACK, A1), mask=wmask, other=0)
                    zero = ((zword >> _along(zero_shift, A1)) & MAXQ) + 1
                    xmask = _along(mask_m, A0) & _along(mask_w, A1)
                    xj = tl.load(x_ptr + _along(offs_m, A0) * stride_xm + _along(ch, A1), mask=xmask, other=0.0)
                    w = ((_code_f16(_code(packed, j, BITS)) - _code_f16(zero)).to(s.dtype) * s).to(xj.dtype)
                    if SWAP_AB:
                        acc = dot(w, xj, acc, UPCAST)
                    else:
                        acc = dot(xj, w, acc, UPCAST)
        else:
            # Dot path: unpack the tile in registers to natural channel order, one dot per tile.
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xmask = _along(mask_m, A0) & _along(mask_k, A1)
            xt = tl.load(x_ptr + _along(offs_m, A0) * stride_xm + _along(offs_k, A1), mask=xmask, other=0.0)
            q = _unpack_natural(packed, BITS, SWAP_AB)
            if GROUP_MODE == 0:
                g = k0 // group_size
                scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                zword = tl.load(qzeros_ptr + g * zcols + offs_n // PACK, mask=mask_n, other=0)
                zero = _along(((zword >> zero_shift) & MAXQ) + 1, A1)  # v1 stores zero - 1
                # integer-valued (q - z) is exact in fp16 and bf16 (|q - z| <= 256)
                w = (_code_f16(q) - _code_f16(zero)).to(xt.dtype)
                tile = tl.zeros(acc.shape, dtype=tl.float32)
                if SWAP_AB:
                    tile = dot(w, xt, tile, UPCAST)
                else:
                    tile = dot(xt, w, tile, UPCAST)
                acc += tile * _along(scale, A1)
            else:
                if GROUP_MODE == 1:
                    g = offs_k // group_size
                else:
                    g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
                gmask = _along(mask_k, A0) & _along(mask_n, A1)
                s = tl.load(scales_ptr + _along(g, A0) * N + _along(offs_n, A1), mask=gmask, other=0.0)
                zword = tl.load(qzeros_ptr + _along(g, A0) * zcols + _along(offs_n // PACK, A1), mask=gmask, other=0)
                zero = ((zword >> _along(zero_shift, A1)) & MAXQ) + 1
                # one rounding of an exact product: the same dense W as the reference
                w = ((_code_f16(q) - _code_f16(zero)).to(s.dtype) * s).to(xt.dtype)
                if SWAP_AB:
                    acc = dot(w, xt, acc, UPCAST)
                else:
                    acc = dot(xt, w, acc, UPCAST)
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    else:
        out = acc
    if HAS_BIAS:
        if pid_k == 0:  # added once, by the first K split
            out += _along(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), A1)
    ptrs = out_ptr + _along(offs_m, A0) * stride_om + _along(offs_n, A1)
    omask = _along(mask_m, A0) & _along(mask_n, A1)
    if REDUCE == 0:  # this program owns its outputs
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)
    elif REDUCE == 1:
        tl.atomic_add(ptrs, out, mask=omask)
    else:
        # Partials are [split_k, M, N] fp32. Every thread's store must be done before the ticket
        # (the barrier), and the ticket's acq_rel makes them visible to the last split, whose
        # L2-only (.cg) loads cannot hit stale L1 lines.
        split_k = tl.num_programs(2)
        offs_mn = _along(offs_m, A0) * N + _along(offs_n, A1)
        tl.store(partial_ptr + pid_k * M * N + offs_mn, out, mask=omask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(ticket_ptr + tile, 1) == split_k - 1:
            total = tl.zeros(out.shape, dtype=tl.float32)
            for split in range(0, split_k):
                total += tl.load(partial_ptr + split * M * N + offs_mn, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next launch


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    config: GPTQGemmConfig | None = None,
) -> torch.Tensor:
    """`y = x @ W^T (+ bias)` with W dequantized from GPTQ v1 tensors in registers.

    Semantics (PACK = 32 / bits, z = stored zero + 1):
        for m, o: y[m, o] = sum_i x[m, i] * scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) + bias[o]
        q[i, o] = (qweight[i // PACK, o] >> (bits * (i % PACK))) & (2^bits - 1)
        z[g, o] = ((qzeros[g, o // PACK] >> (bits * (o % PACK))) & (2^bits - 1)) + 1
    Args:
        x: [M, d_in] fp16 or bf16, last dim contiguous.
        qweight: [d_in / PACK, d_out] int32, contiguous.  qzeros: [n_groups, d_out / PACK] int32.
        scales: [n_groups, d_out] fp16 (or bf16).  g_idx: [d_in] int32.
        bits: 2, 4 or 8.  bias: [d_out] or None.
        group_size: optional promise that g_idx[i] == i // group_size (-1: one group); enables the
            per-tile scale path. It never changes the result (check once with
            `monotone_group_size`).
        config: launch parameters; default from kernels/configs/<gpu>.json or `DEFAULT_CONFIGS`.
    Returns: y [M, d_out] in x.dtype (fp32 accumulation).
    """
    assert x.dim() == 2, f"x must be [M, d_in], got {tuple(x.shape)}"
    m = x.shape[0]
    plan = _launch_plan(m, x.shape[1], x.stride(1), x.dtype, x.device, qweight, qzeros, scales, g_idx, bits, bias,
                        group_size, config)
    cfg, n = plan.config, plan.n
    if m == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), plan.split_k)
    partials = tickets = scales  # unused placeholders unless REDUCE == _LAST_SPLIT
    if plan.reduce == _ATOMIC:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if plan.reduce == _LAST_SPLIT:
        partials = torch.empty(plan.split_k, m, n, dtype=torch.float32, device=x.device)
        tickets = tile_tickets(x.device, grid[0] * grid[1])
    _gptq_gemm_kernel[grid](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else scales, out, partials, tickets,
        m, n, plan.k, x.stride(0), out.stride(0), plan.group_size or 1, plan.k_per_split,
        BITS=bits, GROUP_MODE=plan.mode, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, REDUCE=plan.reduce,
        SWAP_AB=int(cfg.swap_ab), INTERLEAVE=cfg.interleave, UPCAST=interp_upcast(_gptq_gemm_kernel, x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if plan.reduce == _ATOMIC else out


@dataclass(frozen=True)
class _LaunchPlan:
    config: GPTQGemmConfig
    n: int
    k: int
    group_size: int | None
    mode: int
    split_k: int
    k_per_split: int
    reduce: int


# Launch plans by (m, layout): the checks and the config choice run once per shape and weight
# layout, not on each of a step's ~4 GEMMs per layer (each is host time; issue #15).
_PLANS: dict[tuple, _LaunchPlan] = {}


def _launch_plan(m: int, k: int, x_col_stride: int, x_dtype: torch.dtype, device: torch.device,
                 qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                 bias: torch.Tensor | None, group_size: int | None, config: GPTQGemmConfig | None) -> _LaunchPlan:
    key = (m, k, x_col_stride, x_dtype, device, bits, group_size, config,
           *((tuple(t.shape), t.stride(), t.dtype, t.device) for t in (qweight, qzeros, scales, g_idx)),
           None if bias is None else (tuple(bias.shape), bias.stride(), bias.dtype, bias.device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(m, k, x_col_stride, x_dtype, device, qweight, qzeros, scales, g_idx, bits, bias, group_size,
                          config)
        _PLANS[key] = plan
    return plan


def _make_plan(m: int, k: int, x_col_stride: int, x_dtype: torch.dtype, device: torch.device,
               qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
               bias: torch.Tensor | None, group_size: int | None, config: GPTQGemmConfig | None) -> _LaunchPlan:
    assert bits in _KERNEL_BITS, f"bits={bits}: the kernel supports {_KERNEL_BITS} (use the reference)"
    pack = 32 // bits
    assert x_col_stride == 1, "x must be [M, d_in] with contiguous rows"
    assert x_dtype in (torch.float16, torch.bfloat16), f"x dtype {x_dtype}, expected fp16/bf16"
    assert scales.dtype in (torch.float16, torch.bfloat16), f"scales dtype {scales.dtype}"
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32, (qweight.dtype, qzeros.dtype)
    assert g_idx.dtype == torch.int32, f"g_idx dtype {g_idx.dtype}, expected int32"
    n = scales.shape[1]
    n_groups = scales.shape[0]
    assert k % pack == 0 and n % pack == 0, f"d_in={k}, d_out={n} must be multiples of {pack}"
    assert qweight.shape == (k // pack, n), f"qweight {tuple(qweight.shape)} != {(k // pack, n)}"
    assert qzeros.shape == (n_groups, n // pack), f"qzeros {tuple(qzeros.shape)} != {(n_groups, n // pack)}"
    assert g_idx.shape == (k,), f"g_idx {tuple(g_idx.shape)} != ({k},)"
    assert bias is None or bias.shape == (n,), f"bias {None if bias is None else tuple(bias.shape)}"
    weights = [qweight, qzeros, scales, g_idx] + ([] if bias is None else [bias])
    assert all(t.is_contiguous() for t in weights), "qweight/qzeros/scales/g_idx/bias must be contiguous"
    assert all(t.device == device for t in weights), f"tensors on {[str(t.device) for t in weights]}, x on {device}"
    assert device.type == "cuda" or is_interpreted(_gptq_gemm_kernel), "CPU tensors need TRITON_INTERPRET=1"
    if group_size is not None:
        group_size = k if group_size == -1 else group_size
        assert n_groups == cdiv(k, group_size), f"{n_groups} groups != ceil({k} / {group_size})"
    cfg = config or select_config(m, k, n, device)
    assert cfg.block_m == 1 or (cfg.block_m >= 16 and cfg.block_k >= 16), f"{cfg}: the dot path needs block_m, block_k >= 16"
    assert cfg.block_k % pack == 0, f"block_k={cfg.block_k} not a multiple of {pack}"
    assert not (cfg.swap_ab and cfg.block_m == 1), f"{cfg}: swap_ab needs the dot path"
    assert not cfg.interleave or cfg.block_k // pack >= 16, f"{cfg}: interleaved dots need block_k >= {16 * pack}"
    assert cfg.split_k_reduce in SPLIT_K_REDUCTIONS, f"{cfg}: split_k_reduce must be one of {list(SPLIT_K_REDUCTIONS)}"
    if group_size is not None and group_size % cfg.block_k == 0:
        mode = _GROUP_PER_TILE
    elif group_size is not None:
        mode = _GROUP_DIV
    else:
        mode = _GROUP_GATHER
    split_k = max(1, min(cfg.split_k, cdiv(k, cfg.block_k)))
    k_per_split = cdiv(cdiv(k, split_k), cfg.block_k) * cfg.block_k
    reduce = _STORE if split_k == 1 else SPLIT_K_REDUCTIONS[cfg.split_k_reduce]
    return _LaunchPlan(cfg, n, k, group_size, mode, split_k, k_per_split, reduce)


# Tile tickets of the "last" split-K reduction, one buffer per device: every launch leaves its
# tickets at zero, so a buffer is zeroed once, when it is first made or grown, not per call.
# Launches that share it must be ordered, i.e. on one stream (as the engine runs), like Marlin's
# workspace in vLLM. Make it before CUDA-graph capture (any warm-up call does): a buffer made
# while capturing would stay unzeroed until the first replay.
_TICKETS: dict[str, torch.Tensor] = {}


def tile_tickets(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 tickets on `device` (see above)."""
    tickets = _TICKETS.get(str(device))
    if tickets is None or tickets.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split_k_reduce='last' needs one call before CUDA-graph capture (warm-up) "
                               f"to make its {count} tile tickets")
        tickets = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _TICKETS[str(device)] = tickets
    return tickets


def monotone_group_size(g_idx: torch.Tensor) -> int | None:
    """The group size g if g_idx[i] == i // g for all i (no act-order), else None; syncs once."""
    size = int((g_idx == 0).sum())
    if size == 0:
        return None
    ref = torch.arange(g_idx.shape[0], device=g_idx.device, dtype=torch.int64) // size
    return size if bool(torch.equal(g_idx.to(torch.int64), ref)) else None
