"""Flatten one step's scheduled requests into the model's `ForwardBatch` (see
inlaid_ray/model/forward_batch.py for a worked example of every field)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inlaid_ray.engine.request import Request
from inlaid_ray.model.forward_batch import ForwardBatch, LoRABatch


def build_step_batch(
    requests: Sequence[Request],
    adapter_slots: Sequence[int],
    block_size: int,
    device: torch.device | str,
    with_lora: bool,
) -> tuple[torch.Tensor, ForwardBatch]:
    """(input_ids [T], batch) feeding each request its tokens num_computed_tokens..num_tokens.

    `adapter_slots[s]` is request s's adapter slot (-1 = base); `with_lora` attaches the
    token -> slot grouping for the adapter bank.
    """
    assert len(requests) == len(adapter_slots) > 0, f"{len(requests)} requests, {len(adapter_slots)} slots"
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    token_slots: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    max_blocks = max(len(r.block_ids) for r in requests)
    block_tables: list[list[int]] = []
    for req, adapter_slot in zip(requests, adapter_slots):
        start, end = req.num_computed_tokens, req.num_tokens
        blocks = req.block_ids
        assert 0 <= start < end <= len(blocks) * block_size, (
            f"{req.request_id}: tokens {start}..{end} do not fit its {len(blocks)} blocks of {block_size}"
        )
        if end - start == 1:  # decode: the common case, no list copies
            input_ids.append(req.token_id(start))
        else:
            input_ids.extend((req.prompt_token_ids + req.output_token_ids)[start:end])
        positions.extend(range(start, end))
        slot_mapping.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        token_slots.extend([adapter_slot] * (end - start))
        query_start.append(query_start[-1] + end - start)
        context_lens.append(end)
        block_tables.append(blocks + [-1] * (max_blocks - len(blocks)))

    def tensor(xs: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.int64).to(device, non_blocking=True)

    batch = ForwardBatch(
        positions=tensor(positions),
        query_start=tensor(query_start),
        context_lens=tensor(context_lens),
        block_tables=tensor(block_tables),
        slot_mapping=tensor(slot_mapping),
        logits_indices=tensor([q - 1 for q in query_start[1:]]),
        query_lens_list=[b - a for a, b in zip(query_start[:-1], query_start[1:])],
        context_lens_list=context_lens,
        lora=LoRABatch.from_host_slots(token_slots, device) if with_lora else None,
    )
    return tensor(input_ids), batch
