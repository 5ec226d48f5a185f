"""JSON Lines input files (calibration data, held-out examples, onboarding batches): one JSON
object a line, blank lines skipped, every problem an `InvalidRequest` naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inlaid_ray.errors import InvalidRequest


def read_jsonl_objects(path: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of `path`; `what` names the file in errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{what} {path}: cannot be read ({exc})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise InvalidRequest(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((lineno, record))
    return records
