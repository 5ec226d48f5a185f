"""Causal GQA attention over the paged KV cache for a batch of variable-length sequences.

Reference path (any device): new K/V are scattered into their cache slots, then each
sequence's context is gathered through its block table into a padded
`[S, max_ctx]` view and one masked `scaled_dot_product_attention` call serves every
sequence, prefill and decode alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inlaid_ray.model.forward_batch import ForwardBatch
from inlaid_ray.model.kv_cache import PagedKVCache


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: PagedKVCache,
    layer: int,
    batch: ForwardBatch,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for the new tokens; returns [T, H, D] in q.dtype."""
    kv_cache.write(layer, batch.slot_mapping, k, v)
    num_seqs = batch.num_seqs
    max_q, max_ctx = max(batch.query_lens_list), max(batch.context_lens_list)
    num_heads, head_dim = q.shape[1], q.shape[2]
    device = q.device

    # Token t -> (its sequence, its index inside that sequence's new tokens).
    query_lens = batch.query_start[1:] - batch.query_start[:-1]  # [S]
    token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)  # [T]
    token_local = torch.arange(q.shape[0], device=device) - batch.query_start[token_seq]  # [T]

    q_pad = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
    q_pad[token_seq, token_local] = q
    pos_pad = torch.full((num_seqs, max_q), -1, dtype=torch.int64, device=device)
    pos_pad[token_seq, token_local] = batch.positions

    keys = _gather_context(kv_cache.key_caches[layer], batch.block_tables, max_ctx)  # [S, C, KVH, D]
    values = _gather_context(kv_cache.value_caches[layer], batch.block_tables, max_ctx)
    group = num_heads // keys.shape[2]
    keys = keys.repeat_interleave(group, dim=2).to(q.dtype)  # GQA: share each KV head across its group
    values = values.repeat_interleave(group, dim=2).to(q.dtype)

    key_pos = torch.arange(max_ctx, device=device)
    mask = key_pos[None, None, :] <= pos_pad[:, :, None]  # causal; key j holds position j
    mask &= key_pos[None, None, :] < batch.context_lens[:, None, None]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > pos_pad[:, :, None] - sliding_window
    mask[:, :, 0] |= pos_pad < 0  # padded query rows attend to one key so softmax stays finite

    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),  # [S, H, max_q, D]
        keys.transpose(1, 2),  # [S, H, C, D]
        values.transpose(1, 2),
        attn_mask=mask[:, None, :, :],
    )  # [S, H, max_q, D]
    return out.transpose(1, 2)[token_seq, token_local]  # [T, H, D]


def _gather_context(pool: torch.Tensor, block_tables: torch.Tensor, max_ctx: int) -> torch.Tensor:
    """Cache pool [N, B, KVH, D] + block tables [S, nb] -> contexts [S, max_ctx, KVH, D]."""
    num_seqs = block_tables.shape[0]
    blocks = pool[block_tables.clamp(min=0)]  # [S, nb, B, KVH, D]; -1 pads read block 0, masked later
    return blocks.reshape(num_seqs, -1, *pool.shape[2:])[:, :max_ctx]
