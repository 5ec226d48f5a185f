"""Step 1 of onboarding: check the adapter (`lora.validation`, the rule the runtime adapter
endpoint shares) and the calibration data before anything is written. The calibration file must
be JSONL in one of the record shapes of `quant.calibration` and render to enough tokens with the
base tokenizer. Every problem raises AdapterError / InvalidRequest naming the file and the
offending value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.quant.calibration import load_calibration_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationCheck:
    """A validated calibration file."""

    path: Path
    num_records: int
    num_tokens: int


def validate_calibration(path: str | Path, tokenizer: Any, min_tokens: int = 32,
                         what: str = "calibration file") -> CalibrationCheck:
    """Parse and tokenize every record of a calibration-format JSONL file (`what` names it in
    errors: the calibration file, the held-out examples); at least `min_tokens` in total."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise InvalidRequest(f"{what} {path} must be JSONL (.jsonl), got suffix {path.suffix!r}")
    sequences = load_calibration_file(path, tokenizer)
    total = sum(len(s) for s in sequences)
    if total < min_tokens:
        raise InvalidRequest(f"{what} {path} renders to {total} tokens in {len(sequences)} records; "
                             f"at least {min_tokens} are needed")
    return CalibrationCheck(path, len(sequences), total)
