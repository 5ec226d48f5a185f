"""One-shot prefill of whole sequences through the paged model (tests, calibration, eval)."""

from __future__ import annotations

import torch

from inlaid_ray.model.forward_batch import ForwardBatch, LoRABatch
from inlaid_ray.model.kv_cache import PagedKVCache
from inlaid_ray.model.transformer import Transformer


def build_prefill_batch(
    seq_lens: list[int], block_size: int, token_slots: list[int] | None, device: torch.device | str
) -> ForwardBatch:
    """ForwardBatch prefilling each sequence from position 0 into consecutive fresh blocks."""
    positions, block_tables, slot_mapping, slots = [], [], [], []
    next_block = 0
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    for s, n in enumerate(seq_lens):
        nb = -(-n // block_size)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        positions += range(n)
        slot_mapping += [blocks[i // block_size] * block_size + i % block_size for i in range(n)]
        block_tables.append(blocks + [-1] * (max_blocks - nb))
        slots += [token_slots[s] if token_slots else -1] * n
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    t = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    lora = LoRABatch.from_token_slots(t(slots)) if token_slots is not None else None
    return ForwardBatch(
        positions=t(positions),
        query_start=t(starts),
        context_lens=t(seq_lens),
        block_tables=t(block_tables),
        slot_mapping=t(slot_mapping),
        logits_indices=t([s - 1 for s in starts[1:]]),
        query_lens_list=list(seq_lens),
        context_lens_list=list(seq_lens),
        lora=lora,
    )


def prefill_logits(
    model: Transformer,
    token_lists: list[list[int]],
    token_slots: list[int] | None = None,
    block_size: int = 16,
) -> list[torch.Tensor]:
    """fp32 logits [len_i, vocab] for every position of every sequence (slot -1 = base only)."""
    seq_lens = [len(ids) for ids in token_lists]
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"every sequence needs at least one token, got lengths {seq_lens}")
    device = model.device
    num_blocks = sum(-(-n // block_size) for n in seq_lens)
    cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, device)
    batch = build_prefill_batch(seq_lens, block_size, token_slots, device)
    input_ids = torch.tensor([i for ids in token_lists for i in ids], dtype=torch.int64, device=device)
    logits = model(input_ids, batch, cache, all_logits=True)
    return list(torch.split(logits, seq_lens))
