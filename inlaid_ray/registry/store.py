"""The task registry: tasks, clusters and base versions as JSON in Redis hashes, with
atomic optimistic transactions (WATCH/MULTI/EXEC) and rollout events published inside the
same EXEC, so a subscriber sees an event only once the write it announces is visible.

Layout under namespace `ns` (all values are JSON, never pickle):
    ns:rev                   int, bumped by every task/cluster/base write (the WATCH key)
    ns:tasks                 hash  task name  -> TaskRecord
    ns:clusters              hash  cluster id -> ClusterRecord
    ns:base_versions         hash  str(version) -> BaseVersion
    ns:base_version          string, the current BaseVersion
    ns:tenants / ns:api_keys see tenants.py
    ns:events                pub/sub channel (events.py)
Every write is a `transaction.run_transaction` on the WATCH key `ns:rev`, so registry writes
are serialised and event revisions give one total order."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import redis

from inlaid_ray.config import DEFAULT_NAMESPACE
from inlaid_ray.errors import TaskNotFound
from inlaid_ray.registry.events import (
    BaseVersionChanged,
    ClusterRemoved,
    ClusterUpdated,
    Event,
    EventSubscription,
    TaskAdded,
    TaskRetired,
    TaskUpdated,
    encode_event,
)
from inlaid_ray.registry.records import (
    ACTIVE_STATUSES,
    TASK_STATUSES,
    BaseVersion,
    ClusterRecord,
    ServiceLocation,
    TaskRecord,
    TaskStatus,
    check_name,
    from_json,
    to_json,
)
from inlaid_ray.registry.tenants import TenantKeysMixin
from inlaid_ray.registry.transaction import Plan, run_transaction, text

T = TypeVar("T")
# Fields a caller may not set through transition(): identity and bookkeeping.
_PROTECTED_FIELDS = frozenset({"name", "created_at", "updated_at", "revision", "status"})


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of the registry at one revision (read in one MULTI)."""

    revision: int
    tasks: dict[str, TaskRecord]
    clusters: dict[str, ClusterRecord]
    base_version: BaseVersion | None


class TaskRegistry(TenantKeysMixin):
    """Redis-backed registry of tasks, clusters, base versions, tenants and API keys."""

    def __init__(self, client: redis.Redis, namespace: str = DEFAULT_NAMESPACE, max_attempts: int = 100) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.namespace = check_name("namespace", namespace)  # prefixes every key: no spaces or colons
        self.max_attempts = max_attempts
        self.channel = f"{namespace}:events"
        self._rev_key = f"{namespace}:rev"
        self._tasks_key = f"{namespace}:tasks"
        self._clusters_key = f"{namespace}:clusters"
        self._bases_key = f"{namespace}:base_versions"
        self._base_key = f"{namespace}:base_version"
        self._tenants_key = f"{namespace}:tenants"
        self._api_keys_key = f"{namespace}:api_keys"
        self._service_key = f"{namespace}:service"

    # ---- transactions -------------------------------------------------------------------

    def _before_exec(self, op: str) -> None:
        """Seam between a transaction's reads and its EXEC (fault-injection tests override it)."""

    def _transact(self, op: str, body: Callable[[redis.client.Pipeline, int], Plan[T]]) -> T:
        """Run `body(pipe, next_revision)` under WATCH ns:rev and apply its plan atomically."""
        return run_transaction(self.client, self._rev_key, self.channel, op, body, self.max_attempts, self._before_exec)

    def _read_task(self, pipe: redis.client.Pipeline, name: str) -> TaskRecord | None:
        raw = pipe.hget(self._tasks_key, name)
        return None if raw is None else from_json(TaskRecord, text(raw))

    def _read_cluster(self, pipe: redis.client.Pipeline, cluster_id: str) -> ClusterRecord | None:
        raw = pipe.hget(self._clusters_key, cluster_id)
        return None if raw is None else from_json(ClusterRecord, text(raw))

    def _membership_change(self, pipe, plan: Plan, cluster_id: str, rev: int, add: str | None = None,
                           remove: str | None = None) -> None:
        """Queue a members update of a stored cluster (no-op if it is absent or unchanged)."""
        cluster = self._read_cluster(pipe, cluster_id)
        if cluster is None:
            return
        members = (set(cluster.members) | ({add} if add else set())) - ({remove} if remove else set())
        if members == set(cluster.members):
            return
        new = replace(cluster, members=tuple(members), updated_at=time.time(), revision=rev)
        plan.hset.append((self._clusters_key, cluster_id, to_json(new)))
        plan.events.append(ClusterUpdated(cluster=new, revision=rev))

    # ---- tasks ----------------------------------------------------------------------------

    def get_task(self, name: str) -> TaskRecord | None:
        """The task named `name`, or None."""
        raw = self.client.hget(self._tasks_key, name)
        return None if raw is None else from_json(TaskRecord, text(raw))

    def require_task(self, name: str) -> TaskRecord:
        """The task named `name`; raises TaskNotFound."""
        task = self.get_task(name)
        if task is None:
            raise TaskNotFound(f"task {name!r} is not registered (namespace {self.namespace!r})")
        return task

    def list_tasks(self, tenant: str | None = None,
                   status: TaskStatus | Iterable[str] | None = None) -> list[TaskRecord]:
        """All tasks, optionally only one tenant's and/or those in `status`, sorted by name."""
        statuses = {status} if isinstance(status, str) else (set(status) if status is not None else None)
        if statuses is not None and not statuses <= set(TASK_STATUSES):
            raise ValueError(f"unknown statuses {sorted(statuses - set(TASK_STATUSES))}; allowed {TASK_STATUSES}")
        tasks = [from_json(TaskRecord, text(v)) for v in self.client.hvals(self._tasks_key)]
        return sorted(
            (t for t in tasks if (tenant is None or t.tenant == tenant) and (statuses is None or t.status in statuses)),
            key=lambda t: t.name,
        )

    def upsert_task(self, task: TaskRecord) -> TaskRecord:
        """Create or overwrite a task record as given (keeps the stored created_at)."""

        def body(pipe, rev: int) -> Plan[TaskRecord]:
            old = self._read_task(pipe, task.name)
            created = old.created_at if old else task.created_at
            new = replace(task, created_at=created, updated_at=time.time(), revision=rev)
            plan = Plan(new, hset=[(self._tasks_key, new.name, to_json(new))],
                         events=[TaskUpdated(task=new, revision=rev)])
            if old is not None and old.cluster and old.cluster != new.cluster:
                self._membership_change(pipe, plan, old.cluster, rev, remove=new.name)
            return plan

        return self._transact("upsert_task", body)

    def create_task(self, task: TaskRecord, replaceable: Sequence[str] = ("retired",)) -> TaskRecord | None:
        """Atomically create `task` unless a record of its name exists with a status outside
        `replaceable`; returns the new record, or None (the existing one stays) when it exists.
        Of concurrent creators of one name exactly one wins. The version moves past a replaced one."""

        def body(pipe, rev: int) -> Plan[TaskRecord | None]:
            old = self._read_task(pipe, task.name)
            if old is not None and old.status not in replaceable:
                return Plan(None)
            version = max(task.version, old.version + 1) if old is not None else task.version
            new = replace(task, version=version, updated_at=time.time(), revision=rev)
            plan = Plan(new, hset=[(self._tasks_key, new.name, to_json(new))], events=[TaskUpdated(task=new, revision=rev)])
            if old is not None and old.cluster and old.cluster != new.cluster:
                self._membership_change(pipe, plan, old.cluster, rev, remove=new.name)
            return plan

        return self._transact("create_task", body)

    def transition(self, name: str, from_statuses: Sequence[str], to_status: TaskStatus, /,
                   **fields_: Any) -> TaskRecord | None:
        """Atomically move `name` from one of `from_statuses` to `to_status`, setting `fields_`.

        Returns the new record, or None if the stored status is not in `from_statuses` (so of
        concurrent callers exactly one wins). Raises TaskNotFound if the task does not exist.
        Moving to "retired" also drops the task from its cluster's members."""
        bad = set(from_statuses) - set(TASK_STATUSES) | ({to_status} - set(TASK_STATUSES))
        if bad:
            raise ValueError(f"unknown statuses {sorted(bad)}; allowed {TASK_STATUSES}")
        allowed = {f.name for f in fields(TaskRecord)} - _PROTECTED_FIELDS
        if set(fields_) - allowed:
            raise ValueError(f"transition cannot set {sorted(set(fields_) - allowed)}; settable: {sorted(allowed)}")

        return self._transition(name, tuple(from_statuses), to_status, lambda old: fields_)

    def _transition(self, name: str, from_statuses: tuple[str, ...], to_status: TaskStatus,
                    update: Callable[[TaskRecord], dict[str, Any]]) -> TaskRecord | None:
        """transition() with the new field values computed from the stored record, atomically."""

        def body(pipe, rev: int) -> Plan[TaskRecord | None]:
            old = self._read_task(pipe, name)
            if old is None:
                raise TaskNotFound(f"task {name!r} is not registered (namespace {self.namespace!r})")
            if old.status not in from_statuses:
                return Plan(None)
            new = replace(old, **update(old), status=to_status, updated_at=time.time(), revision=rev)
            event = TaskRetired if to_status == "retired" else TaskUpdated
            plan = Plan(new, hset=[(self._tasks_key, name, to_json(new))], events=[event(task=new, revision=rev)])
            if old.cluster and (to_status == "retired" or new.cluster != old.cluster):
                self._membership_change(pipe, plan, old.cluster, rev, remove=name)
            return plan

        return self._transact(f"transition {name}->{to_status}", body)

    def begin_onboarding(self, task: TaskRecord) -> TaskRecord | None:
        """Register `task` as onboarding: new, or re-onboarding a failed/retired one (version+1).

        Returns None if the task is already onboarding or live (someone else owns the slot).
        Raises PermissionError if the task exists under a different tenant."""

        def body(pipe, rev: int) -> Plan[TaskRecord | None]:
            old = self._read_task(pipe, task.name)
            if old is not None and old.tenant != task.tenant:
                raise PermissionError(f"task {task.name!r} belongs to tenant {old.tenant!r}, not {task.tenant!r}")
            if old is not None and old.status in ("onboarding", "live"):
                return Plan(None)
            now = time.time()
            new = replace(
                task, status="onboarding", cluster=None, version=old.version + 1 if old else task.version,
                created_at=old.created_at if old else now, updated_at=now, revision=rev,
            )
            plan = Plan(new, hset=[(self._tasks_key, new.name, to_json(new))],
                         events=[TaskUpdated(task=new, revision=rev)])
            if old is not None and old.cluster:  # a failed task may still sit in a bank's members
                self._membership_change(pipe, plan, old.cluster, rev, remove=new.name)
            return plan

        return self._transact(f"begin_onboarding {task.name}", body)

    def fail_onboarding(self, name: str, reason: str) -> TaskRecord | None:
        """onboarding -> failed, recording `reason` in extra["error"]; None if not onboarding."""
        return self._transition(name, ("onboarding",), "failed", lambda old: {"extra": {**old.extra, "error": reason}})

    def commit_onboarding(self, task: TaskRecord, cluster: ClusterRecord,
                          base_version: BaseVersion) -> TaskRecord | None:
        """One transaction: task -> live in `cluster`, cluster record (bank, version, members)
        written, `base_version` made current; then task_added and related events.

        The stored task must be onboarding (else None: it was retired or failed meanwhile).
        `cluster.version` must exceed the stored cluster's and `base_version.version` must not
        go below the current one; otherwise ValueError (a concurrent onboarding won)."""

        def body(pipe, rev: int) -> Plan[TaskRecord | None]:
            old = self._read_task(pipe, task.name)
            if old is None:
                raise TaskNotFound(f"task {task.name!r} is not registered (namespace {self.namespace!r})")
            if old.status != "onboarding":
                return Plan(None)
            if old.tenant != task.tenant:
                raise PermissionError(f"task {task.name!r} belongs to tenant {old.tenant!r}, not {task.tenant!r}")
            stored_cluster = self._read_cluster(pipe, cluster.cluster_id)
            if stored_cluster is not None and cluster.version <= stored_cluster.version:
                raise ValueError(
                    f"cluster {cluster.cluster_id!r}: commit version {cluster.version} is not newer than "
                    f"stored version {stored_cluster.version}"
                )
            current = self._current_base(pipe)
            if current is not None and base_version.version < current.version:
                raise ValueError(f"base version {base_version.version} is older than current {current.version}")
            if current is not None and base_version.version == current.version and base_version.uri != current.uri:
                raise ValueError(
                    f"base version {base_version.version}: uri {base_version.uri!r} differs from stored {current.uri!r}"
                )
            now = time.time()
            new_cluster = replace(cluster, members=(*cluster.members, task.name), updated_at=now, revision=rev)
            new_task = replace(
                task, status="live", cluster=cluster.cluster_id, created_at=old.created_at, updated_at=now, revision=rev
            )
            plan: Plan[TaskRecord | None] = Plan(new_task)
            if current is None or base_version.version > current.version:
                base = replace(base_version, revision=rev)
                plan.hset.append((self._bases_key, str(base.version), to_json(base)))
                plan.set.append((self._base_key, to_json(base)))
                plan.events.append(BaseVersionChanged(base=base, revision=rev))
            if old.cluster and old.cluster != cluster.cluster_id:
                self._membership_change(pipe, plan, old.cluster, rev, remove=task.name)
            plan.hset.append((self._clusters_key, new_cluster.cluster_id, to_json(new_cluster)))
            plan.events.append(ClusterUpdated(cluster=new_cluster, revision=rev))
            plan.hset.append((self._tasks_key, new_task.name, to_json(new_task)))
            plan.events.append(TaskAdded(task=new_task, revision=rev))
            return plan

        return self._transact(f"commit_onboarding {task.name}", body)

    def retire(self, name: str) -> TaskRecord | None:
        """Retire a task (from onboarding, live or failed); None if it was already retired."""
        return self.transition(name, ACTIVE_STATUSES, "retired")

    # ---- clusters -------------------------------------------------------------------------

    def get_cluster(self, cluster_id: str) -> ClusterRecord | None:
        """The cluster `cluster_id`, or None."""
        raw = self.client.hget(self._clusters_key, cluster_id)
        return None if raw is None else from_json(ClusterRecord, text(raw))

    def list_clusters(self) -> list[ClusterRecord]:
        """All clusters, sorted by id."""
        records = [from_json(ClusterRecord, text(v)) for v in self.client.hvals(self._clusters_key)]
        return sorted(records, key=lambda c: c.cluster_id)

    def upsert_cluster(self, cluster: ClusterRecord) -> ClusterRecord:
        """Create or overwrite a cluster record; publishes cluster_updated."""

        def body(pipe, rev: int) -> Plan[ClusterRecord]:
            new = replace(cluster, updated_at=time.time(), revision=rev)
            return Plan(new, hset=[(self._clusters_key, new.cluster_id, to_json(new))],
                         events=[ClusterUpdated(cluster=new, revision=rev)])

        return self._transact(f"upsert_cluster {cluster.cluster_id}", body)

    def delete_cluster(self, cluster_id: str) -> bool:
        """Delete an empty cluster; False if absent, ValueError if it still has members."""

        def body(pipe, rev: int) -> Plan[bool]:
            old = self._read_cluster(pipe, cluster_id)
            if old is None:
                return Plan(False)
            if old.members:
                raise ValueError(f"cluster {cluster_id!r} still has members {list(old.members)}")
            return Plan(True, hdel=[(self._clusters_key, cluster_id)],
                         events=[ClusterRemoved(cluster_id=cluster_id, revision=rev)])

        return self._transact(f"delete_cluster {cluster_id}", body)

    # ---- base versions --------------------------------------------------------------------

    def _current_base(self, reader: redis.Redis | redis.client.Pipeline) -> BaseVersion | None:
        raw = reader.get(self._base_key)
        return None if raw is None else from_json(BaseVersion, text(raw))

    def current_base_version(self) -> BaseVersion | None:
        """The base version replicas should run, or None before the first one."""
        return self._current_base(self.client)

    def get_base_version(self, version: int) -> BaseVersion | None:
        """A stored base version by number, or None."""
        raw = self.client.hget(self._bases_key, str(version))
        return None if raw is None else from_json(BaseVersion, text(raw))

    def list_base_versions(self) -> list[BaseVersion]:
        """All stored base versions, oldest first."""
        records = [from_json(BaseVersion, text(v)) for v in self.client.hvals(self._bases_key)]
        return sorted(records, key=lambda b: b.version)

    def add_base_version(self, base: BaseVersion, make_current: bool = True) -> BaseVersion:
        """Store a base version (and make it current); the version number must be new."""

        def body(pipe, rev: int) -> Plan[BaseVersion]:
            if pipe.hexists(self._bases_key, str(base.version)):
                raise ValueError(f"base version {base.version} already exists")
            new = replace(base, revision=rev)
            plan = Plan(new, hset=[(self._bases_key, str(new.version), to_json(new))])
            if make_current:
                plan.set.append((self._base_key, to_json(new)))
                plan.events.append(BaseVersionChanged(base=new, revision=rev))
            return plan

        return self._transact(f"add_base_version {base.version}", body)

    def set_current_base_version(self, version: int) -> BaseVersion:
        """Make a stored base version current (also used to roll back)."""

        def body(pipe, rev: int) -> Plan[BaseVersion]:
            raw = pipe.hget(self._bases_key, str(version))
            if raw is None:
                raise ValueError(f"base version {version} is not stored")
            new = replace(from_json(BaseVersion, text(raw)), revision=rev)
            return Plan(new, hset=[(self._bases_key, str(version), to_json(new))],
                         set=[(self._base_key, to_json(new))], events=[BaseVersionChanged(base=new, revision=rev)])

        return self._transact(f"set_current_base_version {version}", body)

    # ---- the serving process -------------------------------------------------------------

    def set_service_location(self, location: ServiceLocation | None) -> None:
        """Record where `inlaid-ray serve` answers (None: it stopped). Not a revisioned write."""
        if location is None:
            self.client.delete(self._service_key)
        else:
            self.client.set(self._service_key, to_json(location))

    def service_location(self) -> ServiceLocation | None:
        """What `inlaid-ray serve` recorded, or None (not running, or served another way)."""
        raw = self.client.get(self._service_key)
        return None if raw is None else from_json(ServiceLocation, text(raw))

    # ---- snapshot and events --------------------------------------------------------------

    def revision(self) -> int:
        """The registry revision (number of task/cluster/base writes so far)."""
        return int(text(self.client.get(self._rev_key) or "0"))

    def snapshot(self) -> Snapshot:
        """Tasks, clusters and the current base version, read atomically with their revision."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self._rev_key).hgetall(self._tasks_key).hgetall(self._clusters_key).get(self._base_key)
            rev, tasks, clusters, base = pipe.execute()
        return Snapshot(
            revision=int(text(rev or "0")),
            tasks={text(k): from_json(TaskRecord, text(v)) for k, v in tasks.items()},
            clusters={text(k): from_json(ClusterRecord, text(v)) for k, v in clusters.items()},
            base_version=None if base is None else from_json(BaseVersion, text(base)),
        )

    def publish(self, event: Event) -> int:
        """Publish an event outside a transaction; returns the number of receivers."""
        return int(self.client.publish(self.channel, encode_event(event)))

    def subscribe(self) -> EventSubscription:
        """Subscribe to this namespace's events; returns once the subscription is active."""
        return EventSubscription(self.client, self.channel)
