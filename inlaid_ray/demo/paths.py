"""Where the committed demo artifacts live inside the package: data, adapters and results."""

from __future__ import annotations

from pathlib import Path

from inlaid_ray.demo.task_base import SPLITS
from inlaid_ray.demo.tasks import get_task

DEMO_DIR = Path(__file__).resolve().parent
DATA_DIR = DEMO_DIR / "data"
ADAPTERS_DIR = DEMO_DIR / "adapters"
RESULTS_DIR = DEMO_DIR / "results"


def demo_data_path(name: str, split: str, data_dir: Path | None = None) -> Path:
    """`<data_dir>/<task>/<split>.jsonl` (default: the committed data set)."""
    get_task(name)  # raises TaskNotFound for an unknown name
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(data_dir or DATA_DIR) / name / f"{split}.jsonl"


def demo_adapter_dir(name: str, adapters_dir: Path | None = None) -> Path:
    """`<adapters_dir>/<task>/` holding the PEFT adapter (default: the committed adapters)."""
    get_task(name)
    return Path(adapters_dir or ADAPTERS_DIR) / name
