"""Writing files and directories so that a reader sees the old version or the whole new one,
never part of either: build in a hidden sibling (same file system), then rename over the target
(atomic on POSIX). One rule for every writer (adapters, statistics, reports, checkpoints, banks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unique name beside `path` (unique: two writers of one path never share it)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to a hidden sibling, fsync it, and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any, indent: int = 2) -> Path:
    """`data` as JSON (sorted keys, trailing newline; non-JSON values as `str`), written atomically."""
    text = json.dumps(data, indent=indent, sort_keys=True, default=str) + "\n"
    return write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling directory to build into; on normal exit it takes the place
    of `path` (an old `path` is moved aside first and deleted after), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _sibling(path, "tmp"), None
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _sibling(path, "old")
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if path.exists():  # another writer's version took the place meanwhile: it stays
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(path)  # the swap failed half-way: the old version stays
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
