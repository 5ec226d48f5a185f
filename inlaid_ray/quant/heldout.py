"""Held-out loss of a base with one task's adapter: the number the onboarding rollout gate
compares between the base that serves now and a re-quantized candidate (jobs/rollout_gate.py).

The loss is the mean next-token cross-entropy (teacher-forced, fp32 logits) over each example's
answer, the tokens in [start, end): `quant.calibration.load_scored_file` sets them to the
assistant's last message through its end-of-turn token, the completion, or every token after the
first of plain text. For chat records it is the demo's eval loss (the training objective).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from inlaid_ray.lora.adapter import LoRAAdapter
from inlaid_ray.lora.bank import AdapterBank
from inlaid_ray.model.runner import prefill_logits
from inlaid_ray.model.transformer import Transformer

Example = tuple[Sequence[int], int, int]  # (token ids, first scored index >= 1, end of the scored span)


def _batches(scored: Sequence[tuple[list[int], int]], batch_tokens: int) -> Iterator[list[tuple[list[int], int]]]:
    batch: list[tuple[list[int], int]] = []
    for item in scored:
        if batch and sum(len(ids) for ids, _ in batch) + len(item[0]) > batch_tokens:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.inference_mode()
def scored_loss(model: Transformer, examples: Sequence[Example], slot: int,
                batch_tokens: int = 2048) -> tuple[float, int]:
    """(mean cross-entropy per scored token, number of scored tokens) of `examples` on `model` with
    the adapter in `slot` of its attached bank (-1 = the base alone). Examples with nothing to
    score are skipped."""
    # each example cut after its span; the first token has no prediction to score
    scored = [(list(ids[:end]), max(int(start), 1)) for ids, start, end in examples
              if max(int(start), 1) < min(int(end), len(ids))]
    if not scored:
        raise ValueError("held-out loss needs at least one example with a token to score")
    total, count = 0.0, 0
    for batch in _batches(scored, batch_tokens):
        logits = prefill_logits(model, [ids for ids, _ in batch], [slot] * len(batch))
        for lg, (ids, start) in zip(logits, batch):
            target = torch.tensor(ids[start:], dtype=torch.long, device=lg.device)
            total += float(F.cross_entropy(lg[start - 1 : -1].float(), target, reduction="sum"))
            count += len(ids) - start
    return total / count, count


def heldout_loss(model: Transformer, examples: Sequence[Example], adapter: LoRAAdapter | None,
                 batch_tokens: int = 2048) -> tuple[float, int]:
    """`scored_loss` with `adapter` (None = the base alone) in a one-slot bank attached for the call."""
    bank, slot = None, -1
    if adapter is not None:
        bank = AdapterBank(model.config, max_slots=1, max_rank=adapter.max_rank, dtype=model.dtype,
                           device=model.device)
        slot = bank.add(adapter)
    attached, model.adapter_bank = model.adapter_bank, bank
    try:
        return scored_loss(model, examples, slot, batch_tokens)
    finally:
        model.adapter_bank = attached
