"""The committed demo data set: writing the generated splits as JSONL (with per-record token
counts for the length predictor and scheduler), reading them back, and length statistics."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inlaid_ray.demo.paths import demo_data_path
from inlaid_ray.demo.task_base import SPLITS
from inlaid_ray.demo.tasks import DEMO_TASKS, get_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLIT_SIZES = {"train": 400, "eval": 50, "calib": 32}


def count_tokens(tokenizer: "PreTrainedTokenizerBase", record: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens after the chat template incl. the assistant header, completion tokens without EOS)."""
    prompt = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    return len(prompt_ids), len(completion_ids)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8, keys in insertion order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def load_examples(name: str, split: str, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """The records of one split of a demo task, as written by `write_demo_data`."""
    path = demo_data_path(name, split, data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no {split!r} data for task {name!r} at {path}; run `python -m inlaid_ray.demo.train`")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(values: Sequence[int]) -> dict[str, float]:
    """mean, std, min, p50, p90, max of a list of token counts."""
    if not values:
        raise ValueError("summarize needs at least one value")
    ordered = sorted(values)

    def pct(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "mean": statistics.fmean(ordered),
        "std": statistics.pstdev(ordered),
        "min": float(ordered[0]),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "max": float(ordered[-1]),
    }


def length_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Prompt/completion token statistics of records that carry `prompt_tokens`/`completion_tokens`."""
    return {
        "n": len(records),
        "prompt_tokens": summarize([r["prompt_tokens"] for r in records]),
        "completion_tokens": summarize([r["completion_tokens"] for r in records]),
    }


def task_length_stats(name: str, split: str = "train", data_dir: Path | None = None) -> dict[str, Any]:
    """Length statistics of one committed split (what the scheduler's priors are built from)."""
    return length_stats(load_examples(name, split, data_dir))


def write_demo_data(
    tokenizer: "PreTrainedTokenizerBase",
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    data_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate and write every split of `tasks`; returns {task: {split: length_stats}}."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)} in sizes; expected a subset of {SPLITS}")
    stats: dict[str, dict[str, Any]] = {}
    for name in tasks or list(DEMO_TASKS):
        task = get_task(name)
        stats[name] = {}
        for split, n in sizes.items():
            records = task.make_examples(split, n, seed)
            for record in records:
                record["prompt_tokens"], record["completion_tokens"] = count_tokens(tokenizer, record)
            write_jsonl(demo_data_path(name, split, data_dir), records)
            stats[name][split] = length_stats(records)
    return stats
