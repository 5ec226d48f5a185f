"""Paged prefill / extend attention: any number of new query tokens per sequence (a whole prompt,
a chunk of one after a cached prefix, or one decode token, mixed in one step) attend causally
to their sequence's context read straight from the paged KV cache through the block table. No
gather into a padded copy of the cache, no [S, max_q, max_ctx] mask tensor (the padded
reference path in model/attention.py builds both per forward).

One kernel, grid (query blocks, heads): a query block is up to BLOCK_M consecutive new tokens
of one sequence (`q_block_seq`, `q_block_start`: built once per forward from host lists); the
program loads their queries for one head, walks the context positions they may see in chunks of
BLOCK_N, looks each position's block up in the block table, and keeps an online softmax.
Positions: sequence s's new tokens are the last `q_len = query_start[s+1] - query_start[s]` of
its `context_lens[s]` tokens (their K/V are already in the cache), so new token j sits at
position context_lens[s] - q_len + j and sees keys 0..that position (the last `window` with a
sliding window). Query head h reads KV head h // (H / KVH) (GQA).
Walk-through (block_size 4, BLOCK_M 16): a sequence with 3 cached tokens extends by 5 (context
7, block table [9, 2]); its one query block holds tokens at positions 3-7, and position 5's key
is read at key_cache[2, 1].
Reference: `reference.paged_prefill_attention_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inlaid_ray.kernels._common import dot, interp_upcast, is_interpreted, next_pow2

# (atol, rtol) against the fp32 reference, for outputs of order 1
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass(frozen=True)
class PrefillAttentionConfig:
    """Launch parameters (BLOCK_M, BLOCK_N >= 16: tl.dot's minimum)."""

    block_m: int = 32  # new tokens per program
    block_n: int = 32  # context positions per inner step
    num_warps: int = 4
    num_stages: int = 2


# The launch configuration; `query_blocks` must be built with the same block_m as the launch.
PREFILL_CONFIG = PrefillAttentionConfig()


def query_blocks(query_lens: list[int], block_m: int = PREFILL_CONFIG.block_m) -> tuple[list[int], list[int]]:
    """(sequence, first flattened token) of every query block of a step (host lists)."""
    seqs, starts, start = [], [], 0
    for s, n in enumerate(query_lens):
        for first in range(start, start + n, block_m):
            seqs.append(s)
            starts.append(first)
        start += n
    return seqs, starts


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr,
    q_block_seq_ptr, q_block_start_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):
    qb = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(q_block_seq_ptr + qb).to(tl.int64)
    t0 = tl.load(q_block_start_ptr + qb).to(tl.int32)
    qs = tl.load(query_start_ptr + seq).to(tl.int32)
    qe = tl.load(query_start_ptr + seq + 1).to(tl.int32)
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    first_pos = ctx - (qe - qs)  # position of the sequence's first new token

    offs_m = t0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < qe
    pos_m = first_pos + (offs_m - qs)  # [BLOCK_M] query positions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    hi = tl.minimum(first_pos + (tl.minimum(t0 + BLOCK_M, qe) - qs), ctx)  # keys the block's last token sees
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(first_pos + (t0 - qs) - WINDOW + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + offs_n // KV_BLOCK, mask=n_mask, other=0).to(tl.int64)
        row = offs_n % KV_BLOCK
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + row[:, None] * stride_kt + kv_head * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k.to(q.dtype)), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST) * scale
        visible = n_mask[None, :] & (offs_n[None, :] <= pos_m[:, None])
        if WINDOW > 0:
            visible = visible & (offs_n[None, :] > pos_m[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + row[:, None] * stride_vt + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], UPCAST)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    q_block_seq: torch.Tensor,
    q_block_start: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    config: PrefillAttentionConfig = PREFILL_CONFIG,
) -> torch.Tensor:
    """Same contract as `paged_prefill_attention_ref`: q [T, H, D] -> [T, H, D] in q.dtype.
    `q_block_seq` / `q_block_start` come from `query_blocks(query lens, config.block_m)`: blocks
    of another size would leave rows unwritten."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    assert block_tables.dim() == 2 and query_start.shape == (block_tables.shape[0] + 1,)
    assert q_block_seq.shape == q_block_start.shape and config.block_m >= 16 and config.block_n >= 16
    assert q.is_cuda or is_interpreted(_prefill_kernel), "CPU tensors need TRITON_INTERPRET=1"
    out = torch.empty_like(q)
    if num_tokens == 0 or q_block_seq.numel() == 0:
        return out
    _prefill_kernel[(q_block_seq.numel(), num_heads)](
        q, key_cache, value_cache, out, block_tables, query_start, context_lens, q_block_seq, q_block_start,
        scale,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, KV_BLOCK=block_size, WINDOW=sliding_window or 0,
        UPCAST=interp_upcast(_prefill_kernel, q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out

