"""Scoring helpers for the demo tasks: normalised exact match, ROUGE-L F1 (Lin, 2004, section 3.1)
on lower-cased alphanumeric words, and per-field accuracy of a JSON object."""

from __future__ import annotations

import json
import re
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")


def normalize_text(text: str) -> str:
    """Strip the ends and trailing spaces of each line; keep line breaks and case."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's default tokenisation: lower case, runs of [a-z0-9], everything else a separator."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) between two strings; 1.0 when both have no words."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return float(not pred and not ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (models sometimes wrap it in prose or fences), or None."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return obj if isinstance(obj, dict) else None
    return None


def field_accuracy(prediction: dict[str, Any] | None, reference: dict[str, Any]) -> float:
    """Fraction of the reference's fields whose value the prediction reproduces exactly."""
    if not reference:
        raise ValueError("field_accuracy needs a non-empty reference object")
    if prediction is None:
        return 0.0
    return sum(prediction.get(k) == v for k, v in reference.items()) / len(reference)
