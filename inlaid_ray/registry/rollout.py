"""Onboarding rollout transactions beside `TaskRegistry.begin_onboarding` (docs/architecture.md,
onboarding steps 6-7): *stage* a task (its cluster membership, the new cluster bank version and
an optional new base version are written in ONE transaction while the task stays `onboarding`,
so only an admin probe can reach it), then *activate* it (`onboarding -> live`, `task_added`),
or *roll back* (task -> `failed`, cluster record and current base version restored) in one
transaction as well. Every write publishes its events inside the same EXEC (store.py).

A rollback restores the cluster record exactly as it was (version, bank, members) only if no
other writer changed it after our stage; otherwise it just removes the task from the members,
so a concurrent onboarding that joined the same cluster is never undone. The same holds for the
base version: it is switched back (and our version entry removed) only while ours is current.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from inlaid_ray.errors import TaskNotFound
from inlaid_ray.registry.events import BaseVersionChanged, ClusterRemoved, ClusterUpdated, TaskAdded, TaskUpdated
from inlaid_ray.registry.records import BaseVersion, ClusterRecord, TaskRecord, to_json
from inlaid_ray.registry.store import TaskRegistry
from inlaid_ray.registry.transaction import Plan


@dataclass(frozen=True)
class Staged:
    """What `stage_onboarding` wrote, and what it replaced (for `rollback_onboarding`)."""

    task: TaskRecord
    cluster: ClusterRecord
    cluster_before: ClusterRecord | None  # None: the cluster was created by this stage
    base: BaseVersion | None  # the base version made current, None if the base did not change
    base_before: BaseVersion | None  # the current base before the stage, else `previous_base`
    first_base: bool = False  # no base version was current before the stage
    stored_previous: bool = False  # the stage stored `previous_base` in the base versions


def _same_base(a: BaseVersion | None, b: BaseVersion | None) -> bool:
    return a is not None and b is not None and a.version == b.version and a.uri == b.uri


def stage_onboarding(registry: TaskRegistry, task: TaskRecord, cluster: ClusterRecord,
                     base: BaseVersion | None = None, previous_base: BaseVersion | None = None) -> Staged | None:
    """One transaction: write `task`'s artifact fields and cluster (still `onboarding`), the cluster
    record with `task` among its members, and `base` as the current base version (if given).

    `previous_base` is stored (not made current) when no base version exists yet, so a rollback has
    a version to return to (typically version 0 = the unquantized base the service started with).
    Returns None if the task is no longer onboarding at `task.version` (failed, retired or
    re-onboarded meanwhile). Raises ValueError if the cluster version does not move forward or the
    base version goes backwards (a concurrent onboarding won)."""
    r = registry

    def body(pipe, rev: int) -> Plan[Staged | None]:
        old = r._read_task(pipe, task.name)
        if old is None:
            raise TaskNotFound(f"task {task.name!r} is not registered (namespace {r.namespace!r})")
        if old.status != "onboarding" or old.version != task.version:
            return Plan(None)
        if old.tenant != task.tenant:
            raise PermissionError(f"task {task.name!r} belongs to tenant {old.tenant!r}, not {task.tenant!r}")
        before = r._read_cluster(pipe, cluster.cluster_id)
        if before is not None and cluster.version <= before.version:
            raise ValueError(f"cluster {cluster.cluster_id!r}: staged version {cluster.version} is not newer than "
                             f"stored version {before.version} (a concurrent onboarding changed it)")
        current = r._current_base(pipe)
        now = time.time()
        new_cluster = replace(cluster, members=(*cluster.members, task.name), updated_at=now, revision=rev)
        new_task = replace(old, adapter_uri=task.adapter_uri, adapter_sha256=task.adapter_sha256, rank=task.rank,
                           target_modules=task.target_modules, base_model=task.base_model or old.base_model,
                           extra=task.extra, cluster=cluster.cluster_id, updated_at=now, revision=rev)
        plan: Plan[Staged | None] = Plan(None)
        staged_base, stored_previous = None, False
        if base is not None and not _same_base(base, current):
            if current is not None and base.version <= current.version:
                raise ValueError(f"base version {base.version} is not newer than the current {current.version} "
                                 f"({current.uri}); a concurrent onboarding re-quantized the base")
            if pipe.hexists(r._bases_key, str(base.version)):
                raise ValueError(f"base version {base.version} already exists")
            staged_base = replace(base, revision=rev)
            plan.hset.append((r._bases_key, str(base.version), to_json(staged_base)))
            plan.set.append((r._base_key, to_json(staged_base)))
            plan.events.append(BaseVersionChanged(base=staged_base, revision=rev))
            key = str(previous_base.version) if previous_base is not None else ""
            if current is None and previous_base is not None and not pipe.hexists(r._bases_key, key):
                stored_previous = True
                plan.hset.append((r._bases_key, key, to_json(replace(previous_base, revision=rev))))
        if old.cluster and old.cluster != cluster.cluster_id:
            r._membership_change(pipe, plan, old.cluster, rev, remove=task.name)
        plan.hset.append((r._clusters_key, new_cluster.cluster_id, to_json(new_cluster)))
        plan.events.append(ClusterUpdated(cluster=new_cluster, revision=rev))
        plan.hset.append((r._tasks_key, new_task.name, to_json(new_task)))
        plan.events.append(TaskUpdated(task=new_task, revision=rev))
        first = staged_base is not None and current is None
        plan.result = Staged(new_task, new_cluster, before, staged_base, previous_base if first else current,
                             first_base=first, stored_previous=stored_previous)
        return plan

    return r._transact(f"stage_onboarding {task.name}", body)


def activate_onboarding(registry: TaskRegistry, name: str, version: int) -> TaskRecord | None:
    """`onboarding -> live` for the staged attempt `version`; publishes task_added. None if the task
    is not onboarding at that version any more."""
    r = registry

    def body(pipe, rev: int) -> Plan[TaskRecord | None]:
        old = r._read_task(pipe, name)
        if old is None:
            raise TaskNotFound(f"task {name!r} is not registered (namespace {r.namespace!r})")
        if old.status != "onboarding" or old.version != version:
            return Plan(None)
        extra = {k: v for k, v in old.extra.items() if k != "error"}
        new = replace(old, status="live", extra=extra, updated_at=time.time(), revision=rev)
        return Plan(new, hset=[(r._tasks_key, name, to_json(new))], events=[TaskAdded(task=new, revision=rev)])

    return r._transact(f"activate_onboarding {name}", body)


def rollback_onboarding(registry: TaskRegistry, name: str, version: int, reason: str,
                        staged: Staged | None = None) -> TaskRecord | None:
    """One transaction: the attempt `version` of `name` -> `failed` (reason in extra["error"]), and
    what `staged` wrote undone (see the module docstring). Returns the failed record, or None if
    the task had left that attempt already (retired, or another attempt owns it); the cluster and
    base are restored in either case."""
    r = registry

    def body(pipe, rev: int) -> Plan[TaskRecord | None]:
        old = r._read_task(pipe, name)
        if old is None:
            raise TaskNotFound(f"task {name!r} is not registered (namespace {r.namespace!r})")
        plan: Plan[TaskRecord | None] = Plan(None)
        ours = old.version == version and old.status in ("onboarding", "live")
        if ours:
            new = replace(old, status="failed", cluster=None, extra={**old.extra, "error": reason},
                          updated_at=time.time(), revision=rev)
            plan.result = new
            plan.hset.append((r._tasks_key, name, to_json(new)))
            plan.events.append(TaskUpdated(task=new, revision=rev))
        if staged is not None:
            _undo_cluster(r, pipe, plan, rev, staged, name)
            current = r._current_base(pipe)
            if staged.base is not None and _same_base(current, staged.base):
                plan.hdel.append((r._bases_key, str(staged.base.version)))
                back = replace(staged.base_before, revision=rev) if staged.base_before is not None else None
                if staged.first_base:  # no base was current: none is again
                    plan.delete.append(r._base_key)
                    if staged.stored_previous and back is not None:
                        plan.hdel.append((r._bases_key, str(back.version)))
                elif back is not None:
                    plan.hset.append((r._bases_key, str(back.version), to_json(back)))
                    plan.set.append((r._base_key, to_json(back)))
                if back is not None:  # routers switch back at once (after a first base: to the unquantized one)
                    plan.events.append(BaseVersionChanged(base=back, revision=rev))
        elif ours and old.cluster:
            r._membership_change(pipe, plan, old.cluster, rev, remove=name)
        return plan

    return r._transact(f"rollback_onboarding {name}", body)


def _undo_cluster(r: TaskRegistry, pipe, plan: Plan, rev: int, staged: Staged, name: str) -> None:
    stored = r._read_cluster(pipe, staged.cluster.cluster_id)
    if stored is None:
        return
    before = staged.cluster_before
    if stored.revision == staged.cluster.revision:  # untouched since our stage: restore it exactly
        if before is None:
            plan.hdel.append((r._clusters_key, stored.cluster_id))
            plan.events.append(ClusterRemoved(cluster_id=stored.cluster_id, revision=rev))
        else:
            back = replace(before, updated_at=time.time(), revision=rev)
            plan.hset.append((r._clusters_key, back.cluster_id, to_json(back)))
            plan.events.append(ClusterUpdated(cluster=back, revision=rev))
        return
    # Written after us (a retire, another onboarding): leave it, minus our task and our bank.
    members = tuple(m for m in stored.members if m != name)
    bank_uri, version = stored.bank_uri, stored.version
    if stored.bank_uri == staged.cluster.bank_uri and bank_uri:
        bank_uri, version = (before.bank_uri if before else ""), stored.version + 1
    if not members and before is None:
        plan.hdel.append((r._clusters_key, stored.cluster_id))
        plan.events.append(ClusterRemoved(cluster_id=stored.cluster_id, revision=rev))
        return
    if (members, bank_uri, version) == (stored.members, stored.bank_uri, stored.version):
        return
    back = replace(stored, members=members, bank_uri=bank_uri, version=version, updated_at=time.time(), revision=rev)
    plan.hset.append((r._clusters_key, back.cluster_id, to_json(back)))
    plan.events.append(ClusterUpdated(cluster=back, revision=rev))


def heartbeat_onboarding(registry: TaskRegistry, name: str, version: int) -> bool:
    """Refresh `updated_at` of the onboarding record at `version` (its job is alive, so
    `fail_stale_onboarding` leaves it); False once it left onboarding or another attempt owns it.
    No event: nothing serves an onboarding task, routers need not hear of it."""
    r = registry

    def body(pipe, rev: int) -> Plan[bool]:
        old = r._read_task(pipe, name)
        if old is None or old.status != "onboarding" or old.version != version:
            return Plan(False)
        new = replace(old, updated_at=time.time(), revision=rev)
        return Plan(True, hset=[(r._tasks_key, name, to_json(new))])

    return r._transact(f"heartbeat_onboarding {name}", body)


def fail_stale_onboarding(registry: TaskRegistry, name: str, older_than_s: float, reason: str) -> TaskRecord | None:
    """`onboarding -> failed` if the record was last written more than `older_than_s` ago (its job
    died without rolling back); None if it is not onboarding or still fresh."""
    r = registry

    def body(pipe, rev: int) -> Plan[TaskRecord | None]:
        old = r._read_task(pipe, name)
        if old is None or old.status != "onboarding" or time.time() - old.updated_at < older_than_s:
            return Plan(None)
        new = replace(old, status="failed", extra={**old.extra, "error": reason}, updated_at=time.time(), revision=rev)
        plan: Plan[TaskRecord | None] = Plan(new, hset=[(r._tasks_key, name, to_json(new))],
                                             events=[TaskUpdated(task=new, revision=rev)])
        if old.cluster:
            r._membership_change(pipe, plan, old.cluster, rev, remove=name)
        return plan

    return r._transact(f"fail_stale_onboarding {name}", body)
