"""Paged decode attention (one query token per sequence) read straight from the paged KV cache
through the block table: no gather into a padded context, no mask tensor, and a launch grid
that depends on the batch size only, never on the context lengths (the split bounds are
computed on the device from `context_lens`), so the same launch is CUDA-graph safe at any length.

Split-KV in two kernels (flash-decoding, as SGLang's Triton decode attention does):
1. grid (S, KVH, num_splits): each program takes one sequence, one KV head with all the query
   heads that share it (GQA: one K/V read serves the whole group), and one contiguous slice of
   the context; it walks the slice in chunks of `block_n` positions, looks each position's
   block up in the block table, and keeps an online softmax; it writes a partial output and
   its log-sum-exp. An empty slice writes lse = -inf.
2. grid (S, H): merges the splits by their log-sum-exp.
Walk-through (block_size 4, num_splits 2): a sequence with context_lens 7 and block table
[9, 2] has positions 0-3 in block 9 and 4-6 in block 2; split 0 takes positions 0-3, split 1
positions 4-6, and position 5 is read at key_cache[2, 1].
Reference: `reference.paged_decode_attention_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inlaid_ray.kernels._common import dot, interp_upcast, next_pow2

# (atol, rtol) against the fp32 reference, for outputs of order 1
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """Launch parameters; fixed per deployment so the launch does not change with the context."""

    num_splits: int = 8
    block_n: int = 32  # context positions per inner step (>= 16: tl.dot's minimum)
    num_warps: int = 4


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr, part_lse_ptr,
    scale,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ps, stride_ph, stride_pp,
    stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    first = 0
    if WINDOW > 0:
        first = tl.maximum(ctx - WINDOW, 0)
    per_split = tl.cdiv(ctx - first, NUM_SPLITS)
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + offs_n // KV_BLOCK, mask=n_mask, other=0).to(tl.int64)
        row = offs_n % KV_BLOCK
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + row[:, None] * stride_kt + kv_head * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k.to(q.dtype)), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST) * scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + row[:, None] * stride_vt + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], UPCAST)
        m_i = m_new

    nonempty = l_i > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(part_out_ptr + seq * stride_ps + heads[:, None] * stride_ph + split * stride_pp + offs_d[None, :],
             out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(part_lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ps, stride_ph, stride_pp,
    stride_ls, stride_lh,
    stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + seq * stride_ls + head * stride_lh + offs_p, mask=p_mask, other=float("-inf"))
    weight = tl.exp(lse - tl.max(lse, 0))  # empty splits: exp(-inf) = 0
    weight = weight / tl.sum(weight, 0)
    parts = tl.load(part_out_ptr + seq * stride_ps + head * stride_ph + offs_p[:, None] * stride_pp + offs_d[None, :],
                    mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(weight[:, None] * parts, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    config: DecodeAttentionConfig = DecodeAttentionConfig(),
) -> torch.Tensor:
    """Same contract as `paged_decode_attention_ref`: q [S, H, D] -> [S, H, D] in q.dtype.

    Every sequence must have context_lens >= 1. The cache may hold another dtype than q
    (it is converted on load)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,)
    assert config.block_n >= 16 and config.num_splits >= 1
    group = num_heads // num_kv_heads
    block_d = next_pow2(head_dim)
    splits = config.num_splits
    part_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    _decode_split_kernel[(num_seqs, num_kv_heads, splits)](
        q, key_cache, value_cache, block_tables, context_lens, part_out, part_lse,
        scale,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=max(16, next_pow2(group)),
        BLOCK_N=config.block_n, KV_BLOCK=block_size, NUM_SPLITS=splits, WINDOW=sliding_window or 0,
        UPCAST=interp_upcast(_decode_split_kernel, q.dtype), num_warps=config.num_warps,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits, BLOCK_P=next_pow2(splits),
    )
    return out
