"""Causal GQA attention over the paged KV cache for a batch of variable-length sequences.

New K/V are scattered into their cache slots first. Then:
- decode-only steps on CUDA (every sequence adds one token): the Triton paged decode kernel
  (`kernels/paged_attention.py`) reads K/V through the block tables; no gather, no padding,
  no mask, and a launch whose shape does not change with the context lengths;
- prefill and mixed steps with a prefill op (`select_prefill_attention(device, "triton")`;
  opt-in until checked on a GPU): the Triton paged prefill/extend kernel
  (`kernels/paged_prefill.py`), also without a padded copy of the cache or a mask tensor;
- otherwise (CPU, or no prefill op): the reference path. Each sequence's context is
  gathered through its block table into a padded `[S, max_ctx]` view and one masked
  `scaled_dot_product_attention` call serves every sequence. The padding plan and mask depend
  only on the batch, so `AttentionPlan` builds them once per forward and every layer reuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from inlaid_ray.model.forward_batch import ForwardBatch
from inlaid_ray.model.kv_cache import PagedKVCache
from inlaid_ray.model.layers import cast


# (q [S, H, D], key_cache, value_cache, block_tables [S, nb], context_lens [S], scale, sliding_window) -> [S, H, D]
DecodeAttentionOp = Callable[..., torch.Tensor]
# (q [T, H, D], key_cache, value_cache, block_tables, query_start [S+1], context_lens [S], q_block_seq,
#  q_block_start, scale, sliding_window) -> [T, H, D]
PrefillAttentionOp = Callable[..., torch.Tensor]


def select_decode_attention(device: torch.device | str, kernels: Literal["auto", "triton", "padded"] = "auto"
                            ) -> DecodeAttentionOp | None:
    """The one place the decode attention is chosen: "auto" = the Triton paged kernel on CUDA and
    the padded reference elsewhere (None); "triton" (CUDA, or CPU under TRITON_INTERPRET=1, for
    tests); "padded"."""
    if kernels == "padded" or (kernels == "auto" and torch.device(device).type != "cuda"):
        return None
    if kernels in ("auto", "triton"):
        from inlaid_ray.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention
    raise ValueError(f"kernels={kernels!r}; expected 'auto', 'triton' or 'padded'")


def select_prefill_attention(device: torch.device | str, kernels: Literal["auto", "triton", "padded"] = "auto"
                             ) -> PrefillAttentionOp | None:
    """The one place the prefill/extend attention is chosen: "auto" = the padded reference (None)
    until the Triton kernel has been checked on a GPU (load_tests/gpu_pending.sh); "triton"
    (CUDA, or CPU under TRITON_INTERPRET=1); "padded"."""
    if kernels in ("auto", "padded"):
        return None
    if kernels == "triton":
        from inlaid_ray.kernels.paged_prefill import paged_prefill_attention

        return paged_prefill_attention
    raise ValueError(f"kernels={kernels!r}; expected 'auto', 'triton' or 'padded'")


@dataclass
class AttentionPlan:
    """How every layer of one forward attends: the decode kernel, or the padded reference with
    its token <-> padded-position maps and causal/length/window mask."""

    token_seq: torch.Tensor | None  # [T] sequence of each token (padded path)
    token_local: torch.Tensor | None  # [T] index among its sequence's new tokens (padded path)
    mask: torch.Tensor | None  # [S, 1, max_q, max_ctx] bool, True = attend (padded path)
    max_q: int
    max_ctx: int
    sliding_window: int | None = None
    decode_op: DecodeAttentionOp | None = None  # set: a decode-only step through this kernel
    prefill_op: PrefillAttentionOp | None = None  # set: every sequence through the prefill kernel
    q_blocks: tuple[torch.Tensor, torch.Tensor] | None = None  # its (sequence, first token) per query block

    @classmethod
    def build(cls, batch: ForwardBatch, sliding_window: int | None, decode_op: DecodeAttentionOp | None = None,
              prefill_op: PrefillAttentionOp | None = None) -> "AttentionPlan":
        """`decode_op` is used when every sequence adds exactly one token, `prefill_op` for any
        other step (host lists: no sync)."""
        if decode_op is not None and max(batch.query_lens_list) == 1:
            return cls(None, None, None, 1, max(batch.context_lens_list), sliding_window, decode_op)
        if prefill_op is not None:
            from inlaid_ray.kernels.paged_prefill import PREFILL_CONFIG, query_blocks

            seqs, firsts = query_blocks(batch.query_lens_list, PREFILL_CONFIG.block_m)  # the launch's block_m
            blocks = torch.tensor([seqs, firsts], dtype=torch.int32).to(batch.positions.device, non_blocking=True)
            return cls(None, None, None, max(batch.query_lens_list), max(batch.context_lens_list), sliding_window,
                       prefill_op=prefill_op, q_blocks=(blocks[0], blocks[1]))
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
        return cls(token_seq, token_local, mask[:, None], max_q, max_ctx, sliding_window)


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
    if plan.decode_op is not None:  # one query per sequence, at its last context position
        return plan.decode_op(q, kv_cache.key_caches[layer], kv_cache.value_caches[layer], batch.block_tables,
                              batch.context_lens, q.shape[-1] ** -0.5, plan.sliding_window)
    if plan.prefill_op is not None:
        return plan.prefill_op(q, kv_cache.key_caches[layer], kv_cache.value_caches[layer], batch.block_tables,
                               batch.query_start, batch.context_lens, *plan.q_blocks, q.shape[-1] ** -0.5,
                               plan.sliding_window)
    q_pad = q.new_zeros(batch.num_seqs, plan.max_q, q.shape[1], q.shape[2])
    q_pad[plan.token_seq, plan.token_local] = q
    keys = _gather_context(kv_cache.key_caches[layer], batch.block_tables, plan.max_ctx)  # [S, C, KVH, D]
    values = _gather_context(kv_cache.value_caches[layer], batch.block_tables, plan.max_ctx)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),  # [S, H, max_q, D]
        cast(keys.transpose(1, 2), q.dtype),  # [S, KVH, C, D]
        cast(values.transpose(1, 2), q.dtype),
        attn_mask=plan.mask,
        enable_gqa=True,  # each KV head serves num_heads / num_kv_heads query heads
    )  # [S, H, max_q, D]
    return out.transpose(1, 2)[plan.token_seq, plan.token_local]  # [T, H, D]


def _gather_context(pool: torch.Tensor, block_tables: torch.Tensor, max_ctx: int) -> torch.Tensor:
    """Cache pool [N, B, KVH, D] + block tables [S, nb] -> contexts [S, max_ctx, KVH, D]."""
    num_seqs = block_tables.shape[0]
    blocks = pool[block_tables.clamp(min=0)]  # [S, nb, B, KVH, D]; -1 pads read block 0, masked later
    return blocks.reshape(num_seqs, -1, *pool.shape[2:])[:, :max_ctx]
