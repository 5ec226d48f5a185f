"""The artifact store the onboarding job writes and the replicas read: versioned, immutable
directories under one root, each built in a hidden temporary sibling and renamed into place
(a rename within one file system is atomic), so no reader ever sees a half-written version.

    <root>/tasks/<task>/v0003-1f2e3d4c/       raw PEFT adapter + calibration (+ held-out) data of one attempt
    <root>/clusters/<cluster>/v0002-9a8b7c6d/ compressed cluster bank (lora/cluster_bank.py format)
    <root>/bases/v0001-5e6f7a8b/              quantized base (GPTQ v1 checkpoint, MLGPTQ meta)
    <root>/stats/                             MLGPTQ per-task statistics (quant/stats_store.py)
    <root>/reports/onboard-<task>-v0003-1f2e3d4c.json   one JSON report per onboarding attempt
    <root>/.onboard.lock                      flock held by a running onboarding job

The random suffix makes two attempts that pick the same version number write different
directories; the registry's version checks decide which one becomes current. A version becomes
visible to the service only when the registry names it, and rollback removes the directories
the failed attempt published (nothing references them any more).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from inlaid_ray.atomic_files import fsync_dir, write_json_atomic
from inlaid_ray.registry.records import check_name

log = logging.getLogger(__name__)

Kind = Literal["tasks", "clusters", "bases"]
LOCK_NAME = ".onboard.lock"


class ArtifactStore:
    """Versioned artifact directories under `root` (see module docstring); tracks what it published."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.published: list[Path] = []

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    def version_dir(self, kind: Kind, name: str | None, version: int, suffix: str) -> Path:
        """Final path of one version: `<root>/<kind>/[<name>/]v0003-<suffix>`."""
        parent = self.root / kind if name is None else self.root / kind / check_name(kind, name)
        return parent / f"v{version:04d}-{suffix}"

    @contextlib.contextmanager
    def building(self, kind: Kind, name: str | None, version: int) -> Iterator[Path]:
        """Yield a not-yet-existing temporary path to write one version into; on normal exit it is
        renamed to its final versioned path (appended to `published`), on error it is removed.
        The final path is `self.published[-1]` after the block."""
        suffix = uuid.uuid4().hex[:8]
        final = self.version_dir(kind, name, version, suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            yield tmp
            if not tmp.is_dir():
                raise FileNotFoundError(f"the {kind} builder wrote nothing at {tmp}")
            os.rename(tmp, final)  # atomic: readers see no directory or the whole one
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.published.append(final)
        log.info("published %s", final)

    def discard_published(self) -> list[Path]:
        """Remove every directory this store published (rollback); returns them."""
        gone = [path for path in reversed(self.published) if self.discard(path)]
        self.published.clear()
        return gone

    def discard(self, path: Path) -> bool:
        """Remove one published directory (a refused candidate base); False if it was already gone."""
        if path in self.published:
            self.published.remove(path)
        # Rename first so a concurrent reader sees the version vanish at once, then delete.
        trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def write_report(self, name: str, data: dict[str, Any]) -> Path:
        """`<root>/reports/<name>.json`, written atomically."""
        return write_json_atomic(self.root / "reports" / f"{name}.json", data)

    @contextlib.contextmanager
    def lock(self, blocking: bool = True) -> Iterator[None]:
        """Exclusive flock on `<root>/.onboard.lock`: one onboarding job at a time per artifact root
        (they share the statistics store). Works across processes on one node or a local volume."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_NAME, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise RuntimeError(f"another onboarding job holds {self.root / LOCK_NAME}") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def list_versions(root: str | Path, kind: Kind, name: str | None = None) -> list[Path]:
    """Published version directories of one artifact (hidden temporaries excluded), sorted."""
    parent = Path(root) / kind if name is None else Path(root) / kind / name
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith("v"))
