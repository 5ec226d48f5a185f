"""How tasks are shown to operators: the rows of `inlaid-ray tasks list` and of the admin route
GET /v1/admin/tasks, and the full view of one task (its record plus its cluster's), built from
registry records only (the CLI reads Redis, the router reads its watcher cache)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from inlaid_ray.errors import TaskNotFound
from inlaid_ray.registry.records import TASK_STATUSES, ClusterRecord, TaskRecord
from inlaid_ray.registry.store import TaskRegistry

LIST_FIELDS = ("name", "tenant", "status", "cluster", "version", "rank", "adapter_uri", "updated_at")


def task_row(task: TaskRecord) -> dict[str, Any]:
    """The list view of one task."""
    return {f: getattr(task, f) for f in LIST_FIELDS}


def task_rows(tasks: Iterable[TaskRecord], tenant: str | None = None,
              statuses: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """List views sorted by name, optionally one tenant's and/or in `statuses` (ValueError if unknown)."""
    wanted = set(statuses) if statuses else None
    if wanted is not None and not wanted <= set(TASK_STATUSES):
        raise ValueError(f"unknown statuses {sorted(wanted - set(TASK_STATUSES))}; allowed {TASK_STATUSES}")
    return [task_row(t) for t in sorted(tasks, key=lambda t: t.name)
            if (tenant is None or t.tenant == tenant) and (wanted is None or t.status in wanted)]


def task_detail(task: TaskRecord, cluster: ClusterRecord | None) -> dict[str, Any]:
    """The full record of one task and the record of its cluster (None if it has none)."""
    return {**asdict(task), "cluster_record": asdict(cluster) if cluster is not None else None}


def list_tasks(registry: TaskRegistry, tenant: str | None = None,
               statuses: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """`task_rows` straight from Redis."""
    return task_rows(registry.list_tasks(), tenant, statuses)


def show_task(registry: TaskRegistry, name: str) -> dict[str, Any]:
    """`task_detail` straight from Redis; TaskNotFound if there is no such task."""
    task = registry.require_task(name)
    return task_detail(task, registry.get_cluster(task.cluster) if task.cluster else None)


def retire_task(registry: TaskRegistry, name: str) -> dict[str, Any]:
    """Retire `name` (TaskNotFound if unknown): {"name", "status", "changed"}. New requests get 404
    as soon as routers apply the task_retired event; requests in flight run to their end."""
    if registry.get_task(name) is None:
        raise TaskNotFound(f"task {name!r} is not registered (namespace {registry.namespace!r})")
    record = registry.retire(name)
    return {"name": name, "status": "retired", "changed": record is not None}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `task_rows` output (for the CLI)."""
    cols = ("name", "tenant", "status", "cluster", "version", "rank", "updated")
    cells = [[str(r["name"]), str(r["tenant"]), str(r["status"]), str(r["cluster"] or "-"), str(r["version"]),
              str(r["rank"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated_at"]))] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) if cells else lines[0] + "\n(no tasks)"
