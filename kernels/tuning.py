"""Tuned launch parameters as data: one JSON file per GPU name in `kernels/configs/`, read once
per name (style rule 10). Each op keeps its own default table in code and asks this module only
for the entries measured on the current GPU; a missing file or entry means "use the default".

File layout (`kernels/configs/nvidia_h100_80gb_hbm3.json`, written by load_tests/bench_kernels.py):

    {"gpu": "NVIDIA H100 80GB HBM3",
     "gptq_gemm": {"4096x4096": [{"max_m": 1, "block_m": 1, ...}, ...], "default": [...]},
     "lora_shrink": {...}, ...}
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def gpu_config_name(device_name: str) -> str:
    """File stem for a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^0-9a-z]+", "_", device_name.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def _load_file(stem: str) -> dict[str, Any]:
    # Keyed by GPU name (static data shipped with the package), never by tensor pointers.
    path = CONFIG_DIR / f"{stem}.json"
    if not path.is_file():
        return {}
    with path.open() as f:
        return json.load(f)


def tuned_table(op: str, device: torch.device) -> dict[str, Any]:
    """The `op` section of the current GPU's config file, or {} (CPU, interpreter, unknown GPU)."""
    if device.type != "cuda":
        return {}
    return _load_file(gpu_config_name(torch.cuda.get_device_name(device))).get(op, {})


def pick_by_max_m(entries: list[dict[str, Any]], m: int) -> dict[str, Any]:
    """First entry whose `max_m` >= m (entries sorted by max_m), else the last one."""
    assert entries, "empty config list"
    for entry in entries:
        if m <= entry["max_m"]:
            return entry
    return entries[-1]
