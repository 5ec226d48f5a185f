"""Step "gate" of onboarding: a re-quantized base goes live only if no live task gets worse.

Every live task that was onboarded with held-out examples (`--eval-data`, kept beside its
adapter) is scored on the base that serves now and on the candidate, with its own adapter: the
mean loss over each example's answer tokens, through its end-of-turn token
(`quant.heldout.heldout_loss`). When any task's held-out loss rises by more than
`max_loss_increase` (nats per token) the candidate is refused: the job keeps the current base
and still onboards the new task on it (its statistics stay stored, so a later re-quantization
includes it). The task being onboarded is scored too, for the report, but never gates: it is not
served yet. Tasks without held-out examples are listed as unchecked. A candidate's losses are
written beside it (`heldout_losses.json`, keyed by the examples' and the adapter's hashes and the
scoring settings), so when it goes live the next job reads the current base's losses instead of
recomputing them. No Ray here: onboard.py runs `check_candidate` as a Ray task (on a GPU when the
cluster has one).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inlaid_ray.atomic_files import write_json_atomic
from inlaid_ray.devices import parse_dtype, resolve_device
from inlaid_ray.lora.peft_io import load_peft_adapter
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.quant.calibration import load_scored_file
from inlaid_ray.quant.heldout import heldout_loss
from inlaid_ray.quantized_base.loading import load_base

log = logging.getLogger(__name__)
EVAL_FILE = "eval.jsonl"  # held-out examples, in the task's artifact directory
LOSSES_FILE = "heldout_losses.json"  # a scored base's losses, in its artifact directory


@dataclass(frozen=True)
class GateSettings:
    """When a candidate base is refused, and how much held-out data is scored."""

    max_loss_increase: float | None = 0.05  # nats per token; None = no gate (every candidate goes live)
    max_examples: int = 64  # first records of each task's held-out file
    max_seq_len: int = 512  # each record is cut to this many tokens
    device: str = "auto"
    dtype: str = "float32"


@dataclass(frozen=True)
class HeldOutTask:
    """A task to score: its adapter, its held-out examples, and whether it may refuse the base."""

    name: str
    adapter_dir: Path
    eval_path: Path
    gated: bool = True  # False: the task being onboarded (reported, never refuses)


def scorable_examples(path: Path, tokenizer: Any, settings: GateSettings) -> list[tuple[list[int], int, int]]:
    """The first `max_examples` records of a held-out file, cut to `max_seq_len`, that still hold
    an answer token to score."""
    out = []
    for ids, start, end in load_scored_file(path, tokenizer)[: settings.max_examples]:
        ids = ids[: settings.max_seq_len]
        if max(start, 1) < min(end, len(ids)):
            out.append((ids, start, end))
    return out


def check_candidate(base_dir: str | Path, current: str | Path, candidate: str | Path,
                    tasks: Sequence[HeldOutTask], unchecked: Sequence[str],
                    settings: GateSettings = GateSettings()) -> dict[str, Any]:
    """Score `tasks` on the `current` and `candidate` bases (model directories, dense or GPTQ) and
    decide. `base_dir` is the fp16 base (its tokenizer and shapes); `unchecked` names the live tasks
    that have no held-out examples. Returns the gate's report: passed, reason, per-task losses."""
    report: dict[str, Any] = {"max_loss_increase": settings.max_loss_increase, "tasks": {},
                              "unchecked": sorted(unchecked)}
    if settings.max_loss_increase is None:
        return report | {"passed": True, "reason": "gate off (max_loss_increase=None)"}
    if not tasks:
        return report | {"passed": True, "reason": "no task has held-out examples: nothing to check"}
    device, dtype = resolve_device(settings.device), parse_dtype(settings.dtype)
    tokenizer, model_config = load_tokenizer(base_dir), ModelConfig.from_dir(base_dir)
    examples = {t.name: scorable_examples(t.eval_path, tokenizer, settings) for t in tasks}
    report["unchecked"] = sorted([*unchecked, *(t.name for t in tasks if t.gated and not examples[t.name])])
    tasks = [t for t in tasks if examples[t.name]]
    if not tasks:
        return report | {"passed": True, "reason": "no held-out example has an answer token to score"}
    adapters = {t.name: load_peft_adapter(t.adapter_dir, model_config, name=t.name, dtype=dtype, device=device)
                for t in tasks}
    keys = {t.name: hashlib.sha256(t.eval_path.read_bytes()).hexdigest() + ":" + adapters[t.name].content_hash
            for t in tasks}
    scoring = {"max_examples": settings.max_examples, "max_seq_len": settings.max_seq_len,
               "dtype": str(dtype), "device_type": device.type}
    cached = _cached(current, scoring, keys)
    losses: dict[str, dict[str, tuple[float, int]]] = {"current": dict(cached), "candidate": {}}
    for which, model_dir in (("current", current), ("candidate", candidate)):
        todo = [t for t in tasks if t.name not in losses[which]]
        if not todo:
            continue
        model = load_base(model_dir, dtype, device)
        losses[which].update({t.name: heldout_loss(model, examples[t.name], adapters[t.name]) for t in todo})
        del model
    write_json_atomic(Path(candidate) / LOSSES_FILE, {"scoring": scoring, "tasks": {
        name: {"key": keys[name], "loss": loss, "tokens": tokens} for name, (loss, tokens) in losses["candidate"].items()}})
    refused = []
    for t in tasks:
        (old, tokens), (new, _) = losses["current"][t.name], losses["candidate"][t.name]
        ok = new - old <= settings.max_loss_increase
        report["tasks"][t.name] = {"current": round(old, 6), "candidate": round(new, 6),
                                   "increase": round(new - old, 6), "tokens": tokens, "gated": t.gated,
                                   "passed": ok, "current_cached": t.name in cached}
        if t.gated and not ok:
            refused.append(f"{t.name} (+{new - old:.4f})")
    if refused:
        reason = (f"held-out loss of live tasks {', '.join(refused)} rose by more than "
                  f"{settings.max_loss_increase} nats per token: the current base stays")
    else:
        gated = sorted(t.name for t in tasks if t.gated)
        reason = f"no live task lost more than {settings.max_loss_increase} nats per token (checked {gated})"
    log.info("rollout gate: %s", reason)
    return report | {"passed": not refused, "reason": reason}


def _cached(base: str | Path, scoring: dict[str, Any], keys: dict[str, str]) -> dict[str, tuple[float, int]]:
    """Losses a previous gate wrote for `base`, for the tasks whose examples, adapter and scoring
    settings are still the same."""
    path = Path(base) / LOSSES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("scoring") != scoring:
        return {}
    return {name: (float(e["loss"]), int(e["tokens"])) for name, e in data.get("tasks", {}).items()
            if keys.get(name) == e.get("key")}
