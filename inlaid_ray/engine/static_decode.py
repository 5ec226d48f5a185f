"""Decode steps with fixed shapes: the metadata of a decode-only step written into persistent
device buffers, so every step of one batch-size bucket runs the same launches on the same
addresses (what CUDA-graph capture needs; the eager path gains one transfer per step).

A step of n decoding sequences is padded up to the next bucket B. Per bucket, one int64 device
buffer holds every metadata tensor back to back:

    input_ids B | positions B | slot_mapping B | context_lens B | logits_indices B | query_start B+1 |
    block_tables B x W | token_slots B | sorted_token_ids B | sorted_slots B | slots S | counts S | offsets S

W = blocks of a max_model_len sequence, S = min(B, adapter slots). The step's host lists are
written into one (pinned, on CUDA) host buffer and copied with one transfer. Padding rows decode
token 0 at position 0 into a reserved scratch KV block, attend only to it and use no adapter;
their logits are dropped. Adapter segments are padded with count 0, and the LoRA kernels are
launched for B tokens per segment (`LoRABatch.max_count`): programs past a segment's count
exit, so one launch serves any mix of adapters.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inlaid_ray.engine.request import Request
from inlaid_ray.model.forward_batch import ForwardBatch, LoRABatch

DECODE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The buckets up to `max_num_seqs`, ending with it."""
    return tuple(b for b in DECODE_BUCKETS if b < max_num_seqs) + (max_num_seqs,)


@dataclass
class _BucketBuffers:
    host: torch.Tensor  # [total] int64, pinned on CUDA
    device: torch.Tensor  # [total] int64
    views: dict[str, torch.Tensor]  # field -> view of `device`


class StaticDecodeInputs:
    """Persistent per-bucket metadata buffers of decode-only steps (see module docstring)."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, scratch_block: int,
                 device: torch.device | str, max_adapter_slots: int | None) -> None:
        self.buckets = decode_buckets(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = torch.device(device)
        self.max_adapter_slots = max_adapter_slots  # None: no adapter bank
        self._buffers: dict[int, _BucketBuffers] = {}

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket holding `num_seqs` sequences (None: more than the largest)."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def fill(self, requests: Sequence[Request], adapter_slots: Sequence[int]) -> tuple[torch.Tensor, ForwardBatch]:
        """(input_ids [B], batch) of a step where every request decodes one token; B = its bucket.
        The tensors are views of the bucket's persistent buffer; logits rows past len(requests) are padding."""
        n = len(requests)
        bucket = self.bucket_for(n)
        assert bucket is not None and n > 0, f"{n} sequences: no decode bucket (largest {self.buckets[-1]})"
        buf = self._buffers.get(bucket) or self._allocate(bucket)
        pad = bucket - n
        width, bs, scratch = self.max_blocks_per_seq, self.block_size, self.scratch_block * self.block_size
        input_ids, positions, slot_mapping, context_lens, block_tables = [], [], [], [], []
        for req in requests:
            pos = req.num_computed_tokens
            assert req.num_tokens - pos == 1, f"{req.request_id} is not decoding one token"
            blocks = req.block_ids
            input_ids.append(req.token_id(pos))
            positions.append(pos)
            slot_mapping.append(blocks[pos // bs] * bs + pos % bs)
            context_lens.append(pos + 1)
            block_tables.extend(blocks)
            block_tables.extend([self.scratch_block] * (width - len(blocks)))
        token_slots = [*adapter_slots, *([-1] * pad)]
        lora_lists, lora_host = self._lora_lists(token_slots, bucket)
        host = [
            *input_ids, *([0] * pad), *positions, *([0] * pad), *slot_mapping, *([scratch] * pad),
            *context_lens, *([1] * pad), *range(bucket), *range(bucket + 1),
            *block_tables, *([self.scratch_block] * (pad * width)), *lora_host,
        ]
        buf.host.copy_(torch.tensor(host, dtype=torch.int64))
        buf.device.copy_(buf.host, non_blocking=True)
        v = buf.views
        lora = None
        if self.max_adapter_slots is not None:
            slots_list, counts_list, offsets_list = lora_lists
            lora = LoRABatch(token_slots=v["token_slots"], sorted_token_ids=v["sorted_token_ids"],
                             sorted_slots=v["sorted_slots"], slots=v["slots"], counts=v["counts"], offsets=v["offsets"],
                             slots_list=slots_list, counts_list=counts_list, offsets_list=offsets_list,
                             max_count=bucket)
        batch = ForwardBatch(
            positions=v["positions"], query_start=v["query_start"], context_lens=v["context_lens"],
            block_tables=v["block_tables"], slot_mapping=v["slot_mapping"], logits_indices=v["logits_indices"],
            query_lens_list=[1] * bucket, context_lens_list=context_lens + [1] * pad, lora=lora,
        )
        return v["input_ids"], batch

    def _lora_lists(self, token_slots: list[int], bucket: int) -> tuple[tuple[list[int], list[int], list[int]], list[int]]:
        """Host (slots, counts, offsets) of the real segments and the padded device layout."""
        if self.max_adapter_slots is None:
            return ([], [], []), []
        sorted_ids = sorted((t for t, s in enumerate(token_slots) if s >= 0), key=token_slots.__getitem__)
        slots: list[int] = []
        counts: list[int] = []
        for t in sorted_ids:
            if slots and slots[-1] == token_slots[t]:
                counts[-1] += 1
            else:
                slots.append(token_slots[t])
                counts.append(1)
        offsets = [0, *itertools.accumulate(counts)][:-1]
        segments = self._segments(bucket)
        assert len(slots) <= segments, f"{len(slots)} adapters in one step, buffers hold {segments}"
        seg_pad = segments - len(slots)
        tok_pad = bucket - len(sorted_ids)
        host = [*token_slots, *sorted_ids, *([0] * tok_pad), *(token_slots[t] for t in sorted_ids), *([0] * tok_pad),
                *slots, *([0] * seg_pad), *counts, *([0] * seg_pad), *offsets, *([0] * seg_pad)]
        return (slots, counts, offsets), host

    def _segments(self, bucket: int) -> int:
        return min(bucket, self.max_adapter_slots or 0)

    def _allocate(self, bucket: int) -> _BucketBuffers:
        sizes = {"input_ids": bucket, "positions": bucket, "slot_mapping": bucket, "context_lens": bucket,
                 "logits_indices": bucket, "query_start": bucket + 1,
                 "block_tables": bucket * self.max_blocks_per_seq}
        if self.max_adapter_slots is not None:
            segments = self._segments(bucket)
            sizes.update(token_slots=bucket, sorted_token_ids=bucket, sorted_slots=bucket, slots=segments,
                         counts=segments, offsets=segments)
        total = sum(sizes.values())
        device = torch.empty(total, dtype=torch.int64, device=self.device)
        host = torch.empty(total, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        views, start = {}, 0
        for name, size in sizes.items():
            views[name] = device[start : start + size]
            start += size
        views["block_tables"] = views["block_tables"].view(bucket, self.max_blocks_per_seq)
        buffers = _BucketBuffers(host, device, views)
        self._buffers[bucket] = buffers
        return buffers
