"""Calibration data for (ML)GPTQ: JSONL files, one record a line, tokenized and sampled to a
per-task token budget (docs/algorithms.md 5.4 point 2: every task's Hessian is normalised by its real
token count, and by default every task gets the same number of tokens, so no task dominates the
max by sheer volume).

Record shapes (extra keys are ignored; the first matching shape wins, in this order):
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat
  template (a generation prompt is appended when the last message is not the assistant's);
- `{"prompt": ..., "completion": ...}`: the raw text `prompt + completion`, no template;
- `{"text": ...}`: raw text.
Every problem is an `InvalidRequest` naming the file and, where there is one, the line.

Sampling is a pure function of (token sequences, `CalibrationConfig`): a shuffle seeded by the
config's seed and the sequences' content, then sequences (each cut to `max_seq_len`) are taken
until the budget is met, the last one cut to hit it exactly. Adding a task later therefore never
changes the samples of the others, which incremental quantization (section 6.3) relies on, and
two tasks with the same calibration data get the same sample whatever their names, so an exact
copy of a task has exactly its statistics (an identical task never changes the base).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.jsonl import read_jsonl_objects
from inlaid_ray.model.tokenizer import CHAT_ROLES

log = logging.getLogger(__name__)
RECORD_SHAPES = ('{"messages": [...]}', '{"prompt": ..., "completion": ...}', '{"text": ...}')


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration sequences are chosen for each task."""

    tokens_per_task: int | None = None  # token budget of every task; None = the smallest task's total
    max_seq_len: int = 512  # each sequence is cut to this many tokens
    max_sequences: int | None = None  # at most this many sequences per task (None = no limit)
    seed: int = 0  # shuffle seed (combined with a digest of the task's token sequences)
    # Concatenate the chosen sequences into windows of this many tokens, as standard GPTQ
    # calibrates on long windows: only each window's first token is an attention sink at
    # position 0 (5.4 item 6). None = one sequence per record.
    pack_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.tokens_per_task is not None and self.tokens_per_task < 1:
            raise ValueError(f"tokens_per_task={self.tokens_per_task} must be >= 1 (or None)")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 1")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"max_sequences={self.max_sequences} must be >= 1 (or None)")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ValueError(f"pack_tokens={self.pack_tokens} must be >= 1 (or None)")

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_task": self.tokens_per_task, "max_seq_len": self.max_seq_len,
                "max_sequences": self.max_sequences, "seed": self.seed,
                **({"pack_tokens": self.pack_tokens} if self.pack_tokens is not None else {})}


@dataclass(frozen=True)
class CalibrationSet:
    """The token sequences one task is calibrated on (no padding: every token is real)."""

    task: str
    sequences: tuple[tuple[int, ...], ...]
    source: str = ""  # file it was read from ("" if built from tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def digest(self) -> str:
        """sha256 of the exact token ids (what the Hessians are a function of)."""
        return sequences_digest(self.sequences)


def sequences_digest(sequences: Sequence[Sequence[int]]) -> str:
    """sha256 of token sequences, in order, with their lengths."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(len(seq).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in seq))
    return h.hexdigest()


def read_calibration_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line of a JSONL file; shapes are checked here."""
    records = read_jsonl_objects(path, "calibration file")
    for lineno, record in records:
        _record_shape(record, f"{path}:{lineno}")
    if not records:
        raise InvalidRequest(f"calibration file {path} is empty (no records)")
    return records


def _record_shape(record: dict[str, Any], where: str) -> str:
    """'messages' | 'prompt' | 'text', after checking the fields of that shape."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise InvalidRequest(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        roles = sorted({m["role"] for m in msgs} - set(CHAT_ROLES))
        if roles:
            raise InvalidRequest(f"{where}: roles {roles} are not among the chat template's {list(CHAT_ROLES)}")
        return "messages"
    if "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise InvalidRequest(f"{where}: 'prompt' and 'completion' must both be strings, got "
                                 f"{type(p).__name__} and {type(c).__name__}")
        return "prompt"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise InvalidRequest(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise InvalidRequest(f"{where}: unknown record shape with keys {sorted(record)}; expected one of "
                         f"{', '.join(RECORD_SHAPES)}")


def render_record(record: dict[str, Any], tokenizer: Any, where: str = "record") -> list[int]:
    """Token ids of one record (see the module docstring for each shape)."""
    shape = _record_shape(record, where)
    if shape == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{where}: a 'messages' record needs a tokenizer with a chat template")
        msgs = record["messages"]
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=msgs[-1]["role"] != "assistant")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5: BatchEncoding
    else:
        text = record["prompt"] + record["completion"] if shape == "prompt" else record["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
    ids = [int(i) for i in ids]
    if not ids:
        raise InvalidRequest(f"{where}: the record renders to no tokens")
    return ids


def answer_span(record: dict[str, Any], tokenizer: Any, ids: Sequence[int]) -> tuple[int, int]:
    """[start, end) in `ids` (the rendered record) of the answer: the last message when it is the
    assistant's, up to and including its end-of-turn token (what follows is the template's, not the
    answer's: the demo's eval loss stops there too); the completion of a prompt/completion record;
    every token after the first of anything else."""
    prefix: Sequence[int] = ()
    chat_answer = "messages" in record and len(record["messages"]) > 1 and record["messages"][-1]["role"] == "assistant"
    if chat_answer:
        prefix = tokenizer.apply_chat_template(record["messages"][:-1], tokenize=True, add_generation_prompt=True)
        prefix = prefix["input_ids"] if hasattr(prefix, "keys") else prefix
    elif "messages" not in record and "prompt" in record:
        prefix = tokenizer.encode(record["prompt"], add_special_tokens=False)
    prefix = [int(i) for i in prefix]
    if not (0 < len(prefix) < len(ids) and list(ids[: len(prefix)]) == prefix):
        return 1, len(ids)
    start, end = len(prefix), len(ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if chat_answer and eos is not None and eos in ids[start:]:
        end = list(ids).index(eos, start) + 1
    return start, end


def load_scored_file(path: str | Path, tokenizer: Any) -> list[tuple[list[int], int, int]]:
    """Every record of a JSONL file in a calibration shape as (token ids, *`answer_span`)."""
    out = []
    for lineno, rec in read_calibration_records(path):
        ids = render_record(rec, tokenizer, f"{path}:{lineno}")
        out.append((ids, *answer_span(rec, tokenizer, ids)))
    return out


def load_calibration_file(path: str | Path, tokenizer: Any) -> list[list[int]]:
    """Every record of a calibration JSONL file as token ids, in file order."""
    return [render_record(rec, tokenizer, f"{path}:{lineno}") for lineno, rec in read_calibration_records(path)]


def available_tokens(sequences: Sequence[Sequence[int]], config: CalibrationConfig) -> int:
    """Tokens a task can contribute under `config` (sequences cut, count capped)."""
    lens = sorted((min(len(s), config.max_seq_len) for s in sequences), reverse=True)
    return sum(lens[: config.max_sequences] if config.max_sequences else lens)


def sample_calibration(
    task: str, sequences: Sequence[Sequence[int]], budget: int | None, config: CalibrationConfig, source: str = ""
) -> CalibrationSet:
    """Seeded choice of sequences holding exactly `budget` tokens (all available if None or fewer)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InvalidRequest(f"task {task!r}: calibration needs non-empty token sequences ({source or 'tokens'})")
    order = list(range(len(sequences)))
    random.Random(f"{config.seed}/{sequences_digest(sequences)}").shuffle(order)
    chosen: list[tuple[int, ...]] = []
    total = 0
    for i in order:
        if (budget is not None and total >= budget) or (config.max_sequences and len(chosen) >= config.max_sequences):
            break
        seq = tuple(int(t) for t in sequences[i][: config.max_seq_len])
        if budget is not None:
            seq = seq[: budget - total]  # the last sequence fills the budget exactly
        chosen.append(seq)
        total += len(seq)
    if config.pack_tokens is not None:
        chosen = pack_windows(chosen, config.pack_tokens)
    return CalibrationSet(task, tuple(chosen), source)


def pack_windows(sequences: Sequence[Sequence[int]], window: int) -> list[tuple[int, ...]]:
    """The sequences concatenated in order and cut into windows of `window` tokens (the last may
    be shorter): the same tokens, fewer sequence starts."""
    flat = [t for seq in sequences for t in seq]
    return [tuple(flat[i : i + window]) for i in range(0, len(flat), window)]


def resolve_budget(available: Mapping[str, int], config: CalibrationConfig) -> int:
    """The per-task token budget: `config.tokens_per_task`, or the smallest task's total (equal budgets)."""
    if config.tokens_per_task is not None:
        return config.tokens_per_task
    if not available:
        raise InvalidRequest("no calibration tasks given")
    return min(available.values())


def build_calibration_sets(
    files: Mapping[str, str | Path],
    tokenizer: Any,
    config: CalibrationConfig = CalibrationConfig(),
    budget: int | None = None,
) -> dict[str, CalibrationSet]:
    """Read, tokenize and sample every task's file; all tasks get the same token budget
    (`budget`, else `resolve_budget`). A task with fewer tokens than an explicit budget uses all it has."""
    tokens = {task: load_calibration_file(path, tokenizer) for task, path in files.items()}
    avail = {t: available_tokens(s, config) for t, s in tokens.items()}
    if budget is None:
        budget = resolve_budget(avail, config)
    short = {t: n for t, n in avail.items() if n < budget}
    if short:
        log.warning("tasks %s have fewer calibration tokens than the per-task budget %d: they use all they have",
                    short, budget)
    return {t: sample_calibration(t, s, budget, config, str(files[t])) for t, s in tokens.items()}
