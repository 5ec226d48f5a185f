"""The base-model side of onboarding: the new task's MLGPTQ statistics (steps "statistics"
and, on rollback, their undo), whether the base must be re-quantized ("decide"), and the new
base version ("quantize"). Called by onboard.py; the math lives in inlaid_ray.quant.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inlaid_ray.jobs.artifacts import ArtifactStore
from inlaid_ray.jobs.onboard_args import Resolved
from inlaid_ray.jobs.quant_step import StatsResult, compute_statistics, requantize
from inlaid_ray.jobs.remote import run_step
from inlaid_ray.quant.incremental import TaskSource
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD
from inlaid_ray.quant.stats_store import AGGREGATE_METHODS, StatsStore
from inlaid_ray.registry import BaseVersion, Snapshot

log = logging.getLogger(__name__)


@dataclass
class StatsUndo:
    """The statistics store as it was before this job touched it, to restore on rollback."""

    store_existed: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def before(self) -> dict[str, Any]:
        """task -> its stored record, before the job."""
        return dict(self.manifest.get("tasks", {}))

    @classmethod
    def capture(cls, stats_dir: Path) -> "StatsUndo":
        aside = StatsStore.set_aside_if_older(stats_dir)
        if aside is not None:  # its live tasks' statistics are computed again from their calibration data
            log.warning("statistics store %s is of an older format; moved to %s, starting a new one", stats_dir, aside)
        existed = StatsStore.is_store(stats_dir)
        return cls(existed, StatsStore.open(stats_dir).manifest if existed else {})

    def restore(self, stats_dir: Path) -> None:
        """Put the store back as it was (remove it if this job created it)."""
        if not self.store_existed:
            shutil.rmtree(stats_dir, ignore_errors=True)
        elif StatsStore.is_store(stats_dir):
            StatsStore.open(stats_dir).restore(self.manifest)


def base_meta(snapshot: Snapshot) -> dict[str, Any] | None:
    """quantize_config.json "meta" of the current base (None: no quantized base is current)."""
    base = snapshot.base_version
    if base is None or base.quant_method == "none":
        return None
    config = Path(base.uri) / "quantize_config.json"
    try:
        return dict(json.loads(config.read_text())["meta"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("current base version %d: cannot read %s (%s)", base.version, config, exc)
        return {}


def quant_method_for(wanted: str, snapshot: Snapshot) -> str:
    """`wanted`, or for "auto" the method the current base was quantized with (else the default,
    DEFAULT_SHARED_METHOD)."""
    if wanted != "auto":
        return wanted
    method = (base_meta(snapshot) or {}).get("method", DEFAULT_SHARED_METHOD)
    return method if method in AGGREGATE_METHODS else DEFAULT_SHARED_METHOD


def _base_tasks(snapshot: Snapshot) -> list[dict[str, Any]] | None:
    """MLGPTQ meta "tasks" of the current base (None: no quantized base is current; [] when unreadable,
    so that every layer counts as changed)."""
    meta = base_meta(snapshot)
    return None if meta is None else list(meta.get("tasks") or [])


def task_statistics(new: dict[str, Path], snapshot: Snapshot, res: Resolved, stats_dir: Path,
                    undo: StatsUndo, progress: bool, catch_up: bool) -> StatsResult:
    """The new tasks' statistics ({task: its artifact directory}), and those of live tasks never
    stored when `catch_up`, in one Ray task; statistics of tasks no longer served are dropped."""
    stored = undo.before
    # Live tasks whose calibration data is known but whose statistics were never stored catch up now
    # (a re-quantization must see every live task); with requantize=never that waits for the next one.
    sources = [TaskSource(t.name, Path(t.adapter_uri), Path(t.extra["calibration_uri"]))
               for t in snapshot.tasks.values()
               if catch_up and t.status == "live" and t.name not in new and t.name not in stored
               and t.extra.get("calibration_uri")]
    sources += [TaskSource(task, task_dir, task_dir / "calibration.jsonl") for task, task_dir in new.items()]
    # Tasks no longer served (retired, or failed: an undo can bring back a failed task's old record)
    # leave the statistics; the next base is quantized for the tasks still served.
    retired = [n for n in stored if n not in new and n in snapshot.tasks
               and snapshot.tasks[n].status in ("retired", "failed")]
    label = next(iter(new)) if len(new) == 1 else f"{next(iter(new))}+{len(new) - 1}"
    return run_step(f"onboard-{label}-statistics", compute_statistics, res.base_dir, stats_dir, sources,
                    _base_tasks(snapshot), res.quant, progress, retired, remote=res.remote)


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(out)


def decide_requantize(mode: str, new: set[str], stats: StatsResult, snapshot: Snapshot) -> dict[str, Any]:
    """Whether `--requantize MODE` makes a new base version now, why, and which layer groups changed."""
    by_group: dict[str, list[int]] = {}
    for layer, groups in sorted(stats.changed.items()):
        for g in groups:
            by_group.setdefault(g, []).append(layer)
    changed = {g: _ranges(ls) for g, ls in sorted(by_group.items())}
    summary = f"{stats.num_changed} of {stats.num_groups} layer groups changed ({stats.basis})"
    missing = sorted(t.name for t in snapshot.tasks.values()
                     if t.status == "live" and t.name not in new and t.name not in stats.store_tasks)
    if mode == "never":
        requant, reason = False, f"requantize=never; statistics stored for a later re-quantization; {summary}"
    elif mode == "always":
        requant, reason = True, f"requantize=always; {summary}"
    elif missing:
        requant, reason = False, f"live tasks {missing} have no statistics (no calibration data): base kept; {summary}"
    elif not stats.changed:
        requant, reason = False, f"the max-aggregated statistics did not change: the current base stays; {summary}"
    else:
        requant, reason = True, summary
    return {"requantize": requant, "reason": reason, "changed_layers": changed, "num_changed": stats.num_changed,
            "num_groups": stats.num_groups, "tasks_without_statistics": missing}


def quantize_new_base(task: str, version: int, res: Resolved,
                      store: ArtifactStore) -> tuple[BaseVersion, dict[str, Any]]:
    """Base version `version` re-quantized from the stored statistics, and the quantization report."""
    with store.building("bases", None, version) as tmp:
        qreport = run_step(f"onboard-{task}-quantize", requantize, res.base_dir, store.stats_dir, tmp,
                           res.quant, False, remote=res.remote)
    return BaseVersion(version=version, uri=str(store.published[-1]), quant_method=res.quant.method), qreport
