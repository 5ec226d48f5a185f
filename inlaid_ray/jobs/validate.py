"""Step 1 of onboarding: check the adapter and the calibration data before anything is written.

The adapter must be a PEFT LoRA directory in safetensors (pickle is refused unread by
`lora.peft_io`), fit the base model's layers and shapes, name a base of the same family, and
stay within the serving limits (rank, file size). The calibration file must be JSONL in one of
the record shapes of `quant.calibration` and render to enough tokens with the base tokenizer.
Every problem raises AdapterError / InvalidRequest naming the file and the offending value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inlaid_ray.errors import AdapterError, InvalidRequest
from inlaid_ray.lora import LoRAAdapter, load_peft_adapter
from inlaid_ray.lora.peft_io import WEIGHTS_NAME
from inlaid_ray.model import ModelConfig
from inlaid_ray.quant.calibration import load_calibration_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterLimits:
    """What a replica can serve: rank of its adapter bank and a sanity bound on the file size."""

    max_rank: int = 16
    max_file_mb: float = 512.0


@dataclass(frozen=True)
class CalibrationCheck:
    """A validated calibration file."""

    path: Path
    num_records: int
    num_tokens: int


def _same_name(a: str | None, b: str) -> bool:
    return bool(a) and Path(str(a)).name.lower() == Path(b).name.lower()


def validate_adapter(path: str | Path, model_config: ModelConfig, limits: AdapterLimits = AdapterLimits(),
                     name: str | None = None) -> LoRAAdapter:
    """The adapter at `path` read (fp32, CPU) and checked against the base and `limits`."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if weights.is_file() and weights.stat().st_size > limits.max_file_mb * 2**20:
        raise AdapterError(f"{weights} is {weights.stat().st_size / 2**20:.1f} MiB, above the limit of "
                           f"{limits.max_file_mb:g} MiB for one adapter")
    adapter = load_peft_adapter(path, model_config, name=name)  # shapes, names, values, family, no pickle
    if adapter.max_rank > limits.max_rank:
        worst = max(adapter.weights.items(), key=lambda kv: kv[1].rank)[0]
        raise AdapterError(f"{path}: rank {adapter.max_rank} (layer {worst[0]} {worst[1]}) exceeds the serving "
                           f"limit max_rank={limits.max_rank}")
    base = adapter.base_model_name_or_path
    if base and not _same_name(base, model_config.name_or_path):
        # Shapes and family already match; a different checkpoint of the same shape is allowed
        # (fine-tunes are often trained against a mirror or local copy), but worth a line in the log.
        log.warning("adapter %s was trained on %r; the served base is %r (same family and shapes)",
                    path, base, model_config.name_or_path)
    return adapter


def validate_calibration(path: str | Path, tokenizer: Any, min_tokens: int = 32) -> CalibrationCheck:
    """Parse and tokenize every record of a calibration JSONL file; at least `min_tokens` in total."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise InvalidRequest(f"calibration file {path} must be JSONL (.jsonl), got suffix {path.suffix!r}")
    sequences = load_calibration_file(path, tokenizer)
    total = sum(len(s) for s in sequences)
    if total < min_tokens:
        raise InvalidRequest(f"calibration file {path} renders to {total} tokens in {len(sequences)} records; "
                             f"at least {min_tokens} are needed")
    return CalibrationCheck(path, len(sequences), total)
