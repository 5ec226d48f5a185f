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

import numpy as np
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
    host_views: dict[str, np.ndarray]  # field -> numpy view of `host` (written in place each step)


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
        The tensors are views of the bucket's persistent buffer; logits rows past len(requests) are padding.
        Host cost is O(tokens + blocks in use): the host buffer is written in place (numpy views)."""
        n = len(requests)
        bucket = self.bucket_for(n)
        assert bucket is not None and n > 0, f"{n} sequences: no decode bucket (largest {self.buckets[-1]})"
        buf = self._buffers.get(bucket) or self._allocate(bucket)
        h = buf.host_views
        bs, scratch = self.block_size, self.scratch_block
        positions = [req.num_computed_tokens for req in requests]
        context_lens = [p + 1 for p in positions]
        h["input_ids"][:n] = [req.token_id(p) for req, p in zip(requests, positions)]
        h["positions"][:n] = positions
        h["slot_mapping"][:n] = [req.block_ids[p // bs] * bs + p % bs for req, p in zip(requests, positions)]
        h["context_lens"][:n] = context_lens
        tables = h["block_tables"]
        for i, req in enumerate(requests):
            assert req.num_tokens - positions[i] == 1, f"{req.request_id} is not decoding one token"
            k = len(req.block_ids)
            tables[i, :k] = req.block_ids
            tables[i, k:] = scratch
        # padding rows: token 0 at position 0 into the scratch block, attending to it alone
        h["input_ids"][n:] = 0
        h["positions"][n:] = 0
        h["slot_mapping"][n:] = scratch * bs
        h["context_lens"][n:] = 1
        tables[n:] = scratch
        lora = None
        if self.max_adapter_slots is not None:
            slots_list, counts_list, offsets_list = self._write_lora(h, [*adapter_slots, *([-1] * (bucket - n))])
            v = buf.views
            lora = LoRABatch(token_slots=v["token_slots"], sorted_token_ids=v["sorted_token_ids"],
                             sorted_slots=v["sorted_slots"], slots=v["slots"], counts=v["counts"], offsets=v["offsets"],
                             slots_list=slots_list, counts_list=counts_list, offsets_list=offsets_list,
                             max_count=bucket)
        buf.device.copy_(buf.host, non_blocking=True)  # the one transfer of the step's metadata
        v = buf.views
        batch = ForwardBatch(
            positions=v["positions"], query_start=v["query_start"], context_lens=v["context_lens"],
            block_tables=v["block_tables"], slot_mapping=v["slot_mapping"], logits_indices=v["logits_indices"],
            query_lens_list=[1] * bucket, context_lens_list=context_lens + [1] * (bucket - n), lora=lora,
        )
        return v["input_ids"], batch

    def _write_lora(self, h: dict, token_slots: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Write the padded adapter-segment layout; return the real segments' (slots, counts, offsets)."""
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
        segments = len(h["slots"])
        assert len(slots) <= segments, f"{len(slots)} adapters in one step, buffers hold {segments}"
        m, k = len(sorted_ids), len(slots)
        h["token_slots"][:] = token_slots
        h["sorted_token_ids"][:m] = sorted_ids
        h["sorted_token_ids"][m:] = 0
        h["sorted_slots"][:m] = [token_slots[t] for t in sorted_ids]
        h["sorted_slots"][m:] = 0
        for name, values in (("slots", slots), ("counts", counts), ("offsets", offsets)):
            h[name][:k] = values
            h[name][k:] = 0  # padded segments: count 0, never read
        return slots, counts, offsets

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
        views, host_views, start = {}, {}, 0
        host_np = host.numpy()
        for name, size in sizes.items():
            views[name] = device[start : start + size]
            host_views[name] = host_np[start : start + size]
            start += size
        views["block_tables"] = views["block_tables"].view(bucket, self.max_blocks_per_seq)
        host_views["block_tables"] = host_views["block_tables"].reshape(bucket, self.max_blocks_per_seq)
        host_views["logits_indices"][:] = np.arange(bucket)  # constant per bucket
        host_views["query_start"][:] = np.arange(bucket + 1)
        buffers = _BucketBuffers(host, device, views, host_views)
        self._buffers[bucket] = buffers
        return buffers
