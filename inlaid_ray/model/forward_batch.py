"""Per-step metadata the engine hands to the model: which token belongs to which sequence,
where its K/V go in the paged cache, and which adapter slot it uses.

Walk-through (block_size 4): sequence 0 prefills 3 tokens, sequence 1 decodes 1 token at
position 6 (its cache already holds 6 tokens in blocks [7, 2]):

    input_ids      = [t0, t1, t2, u6]          # flattened, sequences back to back
    positions      = [0, 1, 2, 6]
    query_start    = [0, 3, 4]                 # sequence s owns tokens query_start[s]:query_start[s+1]
    context_lens   = [3, 7]                    # tokens in cache after this step, incl. new ones
    block_tables   = [[5, -1], [7, 2]]         # padded with -1
    slot_mapping   = [20, 21, 22, 10]          # block*block_size + offset of each new token
    logits_indices = [2, 3]                    # last token of each sequence
    token_slots    = [0, 0, 0, -1]             # adapter slot per token, -1 = base only
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """Token -> adapter-slot mapping for one step, sorted once so ops can run per segment.

    `sorted_token_ids[offsets[i] : offsets[i] + counts[i]]` are the tokens using `slots[i]`.
    Base-only tokens (slot -1) appear in no segment.
    """

    token_slots: torch.Tensor  # [T] int64, -1 = no adapter
    sorted_token_ids: torch.Tensor  # [T_lora] int64, token indices grouped by slot
    sorted_slots: torch.Tensor  # [T_lora] int64, the slot of each of those tokens (once per step, not per projection)
    slots: torch.Tensor  # [S_active] int64, distinct slots in this step (ascending)
    counts: torch.Tensor  # [S_active] int64
    offsets: torch.Tensor  # [S_active] int64
    slots_list: list[int]  # the same as `slots`, host side, for the reference path
    counts_list: list[int]
    offsets_list: list[int]
    # Static launches (CUDA graphs): the device arrays are padded (segments with count 0, token ids
    # past the real ones) and kernels are launched for `max_count` tokens per segment, whatever
    # the step's mix. None: sized from this step's counts.
    max_count: int | None = None

    @classmethod
    def from_token_slots(cls, token_slots: torch.Tensor) -> "LoRABatch":
        """Group token indices by adapter slot (stable, so token order inside a slot is kept)."""
        token_slots = token_slots.to(torch.int64)
        active = torch.nonzero(token_slots >= 0, as_tuple=False).flatten()
        order = torch.argsort(token_slots[active], stable=True)
        sorted_token_ids = active[order]
        slots, counts = torch.unique_consecutive(token_slots[sorted_token_ids], return_counts=True)
        offsets = torch.cumsum(counts, 0) - counts
        return cls(
            token_slots=token_slots,
            sorted_token_ids=sorted_token_ids,
            sorted_slots=token_slots[sorted_token_ids],
            slots=slots,
            counts=counts,
            offsets=offsets,
            slots_list=slots.tolist(),
            counts_list=(counts_list := counts.tolist()),
            offsets_list=[0, *itertools.accumulate(counts_list)][:-1],
        )

    @classmethod
    def from_host_slots(cls, token_slots: list[int], device: torch.device | str) -> "LoRABatch":
        """The same grouping computed from the host list the engine already has: no device sync
        (`from_token_slots` reads the grouping back with `.tolist()`), one host-to-device copy."""
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
        n, k, m = len(token_slots), len(slots), len(sorted_ids)
        sorted_slots = [token_slots[t] for t in sorted_ids]
        flat = torch.tensor([*token_slots, *sorted_ids, *sorted_slots, *slots, *counts, *offsets], dtype=torch.int64)
        flat = flat.to(device, non_blocking=True)
        parts = torch.split(flat, [n, m, m, k, k, k])
        return cls(token_slots=parts[0], sorted_token_ids=parts[1], sorted_slots=parts[2], slots=parts[3],
                   counts=parts[4], offsets=parts[5], slots_list=slots, counts_list=counts, offsets_list=offsets)

    @property
    def num_active_slots(self) -> int:
        return len(self.slots_list)

    @property
    def num_lora_tokens(self) -> int:
        """Tokens that use an adapter (a static batch's device arrays hold padding after them)."""
        return sum(self.counts_list)

    @property
    def launch(self) -> tuple[int, int]:
        """(segments, tokens per segment) a segmented kernel's grid covers: this step's exact
        figures, or a static batch's padded ones, which do not change between steps."""
        if self.max_count is not None:
            return int(self.slots.shape[0]), self.max_count
        return len(self.counts_list), max(self.counts_list, default=0)


@dataclass
class ForwardBatch:
    """Everything one model forward needs besides the token ids (see module docstring)."""

    positions: torch.Tensor  # [T] int64
    query_start: torch.Tensor  # [S+1] int64 (device)
    context_lens: torch.Tensor  # [S] int64 (device)
    block_tables: torch.Tensor  # [S, max_blocks] int64, -1 padded
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [S] int64
    query_lens_list: list[int]  # host copies used to plan the attention call
    context_lens_list: list[int]
    lora: LoRABatch | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])
