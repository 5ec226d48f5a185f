"""Synthetic (task, prompt, output length) records with the four task kinds of LoRA-Inlaid
Fig.3, for training and testing the output-length predictor without real data.

Each kind has a prompt feature that drives its output length, as real tasks do:
- translation: output ~ 1.4 x the words of the source sentence;
- table summary: output ~ 12 tokens per table row;
- text summary: the prompt asks for "about K words", output ~ 1.3 K tokens;
- code generation: output ~ 60 tokens per listed requirement.
Each multiplies a per-kind log-normal noise, so a per-task mean cannot explain it all.
With more than four tasks, task i is kind i % 4 with its own scale factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("translation", "table_summary", "text_summary", "code_generation")

_WORDS = (
    "the market river village engineer quickly old report system water green light data "
    "winter council music question small history morning garden city network policy train "
    "bridge doctor student energy paper result open strong machine north language family "
    "price summer forest window simple project value moment travel island school measure "
    "signal harvest letter culture science famous quiet bright heavy careful modern ancient"
).split()
_VERBS = "parses sorts merges validates counts filters groups normalizes caches streams".split()
_OBJECTS = "records intervals strings invoices events matrices tokens logs graphs dates".split()


@dataclass(frozen=True)
class LengthRecord:
    """One logged request: its task, prompt text and true output length in tokens."""

    task: str
    prompt: str
    output_len: int


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_WORDS, size=max(n, 1)))


def _translation(rng: np.random.Generator, scale: float) -> tuple[str, float]:
    n = int(np.clip(rng.lognormal(np.log(25), 0.6), 3, 200))
    return f"Translate the following French text into English:\n{_words(rng, n)}", 1.4 * n * scale * rng.lognormal(0, 0.15)


def _table(rng: np.random.Generator, scale: float) -> tuple[str, float]:
    rows = int(np.clip(rng.lognormal(np.log(7), 0.5), 2, 40))
    cols = int(rng.integers(2, 6))
    lines = [" | ".join(_words(rng, 1) for _ in range(cols))]
    lines += [" | ".join(str(int(rng.integers(0, 1000))) for _ in range(cols)) for _ in range(rows)]
    return "Write a one-paragraph summary of the table below.\n" + "\n".join(lines), 12 * rows * scale * rng.lognormal(0, 0.25)


def _summary(rng: np.random.Generator, scale: float) -> tuple[str, float]:
    k = int(np.exp(rng.uniform(np.log(15), np.log(150))))
    body = _words(rng, int(np.clip(rng.lognormal(np.log(400), 0.4), 50, 2000)))
    return f"Summarize the following article in about {k} words.\n\n{body}", 1.3 * k * scale * rng.lognormal(0, 0.15)


def _code(rng: np.random.Generator, scale: float) -> tuple[str, float]:
    k = int(rng.integers(1, 9))
    reqs = "\n".join(f"{i + 1}. It {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {_words(rng, 4)}." for i in range(k))
    name = f"{rng.choice(_VERBS)}_{rng.choice(_OBJECTS)}"
    return f"Write a Python function `{name}`. Requirements:\n{reqs}", 60 * k * scale * rng.lognormal(0, 0.35)


_MAKERS = {"translation": _translation, "table_summary": _table, "text_summary": _summary, "code_generation": _code}


def task_names(num_tasks: int) -> list[str]:
    """Names of the synthetic tasks: the kind, plus an index beyond the first four."""
    return [KINDS[i % 4] if num_tasks <= 4 else f"{KINDS[i % 4]}-{i:03d}" for i in range(num_tasks)]


def make_records(num_tasks: int, per_task: int, seed: int, max_output_len: int = 1024) -> list[LengthRecord]:
    """`per_task` records for each of `num_tasks` tasks; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    scales = np.exp(np.random.default_rng(12345).normal(0.0, 0.3, size=num_tasks))  # fixed per task
    scales[: min(4, num_tasks)] = 1.0
    out = []
    for i, name in enumerate(task_names(num_tasks)):
        maker = _MAKERS[KINDS[i % 4]]
        for _ in range(per_task):
            prompt, length = maker(rng, float(scales[i]))
            out.append(LengthRecord(name, prompt, int(np.clip(round(length), 1, max_output_len))))
    return out
