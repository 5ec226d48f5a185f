"""Causal GQA attention over the paged KV cache for a batch of variable-length sequences.

Reference path (any device): new K/V are scattered into their cache slots, then each
sequence's context is gathered through its block table into a padded `[S, max_ctx]` view
and one masked `scaled_dot_product_attention` call serves every sequence, prefill and
decode alike. The padding plan and mask depend only on the batch, so `AttentionPlan` builds
them once per forward and every layer reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inlaid_ray.model.forward_batch import ForwardBatch
from inlaid_ray.model.kv_cache import PagedKVCache


@dataclass
class AttentionPlan:
    """Token <-> padded-position maps and the causal/length/window mask of one batch."""

    token_seq: torch.Tensor  # [T] sequence of each token
    token_local: torch.Tensor  # [T] index among its sequence's new tokens
    mask: torch.Tensor  # [S, 1, max_q, max_ctx] bool, True = attend
    max_q: int
    max_ctx: int

    @classmethod
    def build(cls, batch: ForwardBatch, sliding_window: int | None) -> "AttentionPlan":
        device = batch.positions.device
        num_seqs = batch.num_seqs
        max_q, max_ctx = max(batch.query_lens_list), max(batch.context_lens_list)
        seq_ids = [s for s, n in enumerate(batch.query_lens_list) for _ in range(n)]
        token_seq = torch.tensor(seq_ids, dtype=torch.int64, device=device)  # [T]
        token_local = torch.arange(len(seq_ids), device=device) - batch.query_start[token_seq]  # [T]
        pos_pad = torch.full((num_seqs, max_q), -1, dtype=torch.int64, device=device)
        pos_pad[token_seq, token_local] = batch.positions
        key_pos = torch.arange(max_ctx, device=device)
        mask = key_pos[None, None, :] <= pos_pad[:, :, None]  # causal; cache slot j holds position j
        mask &= key_pos[None, None, :] < batch.context_lens[:, None, None]
        if sliding_window is not None:
            mask &= key_pos[None, None, :] > pos_pad[:, :, None] - sliding_window
        mask[:, :, 0] |= pos_pad < 0  # padded query rows attend to one key so softmax stays finite
        return cls(token_seq, token_local, mask[:, None], max_q, max_ctx)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: PagedKVCache,
    layer: int,
    batch: ForwardBatch,
    plan: AttentionPlan,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for the new tokens; returns [T, H, D] in q.dtype."""
    kv_cache.write(layer, batch.slot_mapping, k, v)
    q_pad = q.new_zeros(batch.num_seqs, plan.max_q, q.shape[1], q.shape[2])
    q_pad[plan.token_seq, plan.token_local] = q
    keys = _gather_context(kv_cache.key_caches[layer], batch.block_tables, plan.max_ctx)  # [S, C, KVH, D]
    values = _gather_context(kv_cache.value_caches[layer], batch.block_tables, plan.max_ctx)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),  # [S, H, max_q, D]
        keys.transpose(1, 2).to(q.dtype),  # [S, KVH, C, D]
        values.transpose(1, 2).to(q.dtype),
        attn_mask=plan.mask,
        enable_gqa=True,  # each KV head serves num_heads / num_kv_heads query heads
    )  # [S, H, max_q, D]
    return out.transpose(1, 2)[plan.token_seq, plan.token_local]  # [T, H, D]


def _gather_context(pool: torch.Tensor, block_tables: torch.Tensor, max_ctx: int) -> torch.Tensor:
    """Cache pool [N, B, KVH, D] + block tables [S, nb] -> contexts [S, max_ctx, KVH, D]."""
    num_seqs = block_tables.shape[0]
    blocks = pool[block_tables.clamp(min=0)]  # [S, nb, B, KVH, D]; -1 pads read block 0, masked later
    return blocks.reshape(num_seqs, -1, *pool.shape[2:])[:, :max_ctx]
