"""The shape every demo task shares: sample fields from word lists, render a user prompt from one
of several templates, render the reference completion, score a prediction.

Splits are disjoint by construction: each sampled example has a content key (its fields, not
its prompt wording) and a stable hash of that key picks the one split it may appear in, so the
same content can never land in two splits whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from typing import Any

SPLITS = ("train", "eval", "calib")
_HASH_BUCKETS = 20
# Bucket ranges of the content hash: 10% eval, 10% calib, 80% train.
_SPLIT_BUCKETS = {"eval": range(0, 2), "calib": range(2, 4), "train": range(4, _HASH_BUCKETS)}
_MAX_DRAWS_PER_EXAMPLE = 400


def _digest(task_name: str, content_key: str) -> bytes:
    return hashlib.sha256(f"{task_name}\x00{content_key}".encode()).digest()


def example_id(task_name: str, content_key: str) -> str:
    """A stable 12-hex-digit id of an example's content (equal ids = same content)."""
    return _digest(task_name, content_key).hex()[:12]


def split_of(task_name: str, content_key: str) -> str:
    """The split an example with this content belongs to (stable across runs and machines)."""
    bucket = int.from_bytes(_digest(task_name, content_key)[:8], "big") % _HASH_BUCKETS
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def make_record(prompt: str, completion: str, **extra: Any) -> dict[str, Any]:
    """One chat example: `messages` (user, assistant) plus the bare `prompt` and `completion`."""
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ],
        "prompt": prompt,
        "completion": completion,
        **extra,
    }


class DemoTask(ABC):
    """A generated task; subclasses set the class attributes and implement the four hooks."""

    name: str
    description: str
    primary_metric: str
    max_new_tokens: int  # generation budget at evaluation, comfortably above the longest reference
    prompt_templates: tuple[str, ...]  # str.format templates over `_prompt_fields`

    @abstractmethod
    def _sample(self, rng: random.Random) -> dict[str, Any]:
        """Draw the fields of one example."""

    @abstractmethod
    def _prompt_fields(self, fields: dict[str, Any], rng: random.Random) -> dict[str, str]:
        """Values substituted into the prompt template (surface wording may use `rng`)."""

    @abstractmethod
    def _completion(self, fields: dict[str, Any]) -> str:
        """The reference answer for these fields."""

    @abstractmethod
    def score(self, prediction: str, reference: str) -> dict[str, float]:
        """Metrics in [0, 1] for one prediction; always contains `primary_metric`."""

    def content_key(self, fields: dict[str, Any]) -> str:
        """What makes two examples 'the same' for split disjointness (default: all fields)."""
        return repr(sorted(fields.items()))

    def make_examples(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """`n` distinct records of `split`, a pure function of (task, split, n, seed)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        records: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(_MAX_DRAWS_PER_EXAMPLE * max(n, 1)):
            if len(records) == n:
                break
            fields = self._sample(rng)
            key = self.content_key(fields)
            if key in seen or split_of(self.name, key) != split:
                continue
            seen.add(key)
            template = rng.choice(self.prompt_templates)
            prompt = template.format(**self._prompt_fields(fields, rng))
            record = make_record(prompt, self._completion(fields), task=self.name, split=split)
            records.append({"id": example_id(self.name, key), **record})
        if len(records) < n:
            raise RuntimeError(
                f"task {self.name!r} produced only {len(records)} distinct {split!r} examples of {n}"
            )
        return records

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, primary_metric={self.primary_metric!r})"
