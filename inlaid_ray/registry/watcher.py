"""A local, thread-safe cache of the registry (tasks, clusters, current base version) kept
fresh by rollout events plus a periodic full snapshot, so a router looks tasks up without a
Redis round trip.

Events and snapshots can arrive in either order (a snapshot read before an event may be
applied after it), so every cached record keeps the registry revision of the write that
produced it and is only replaced by a record with a higher-or-equal revision. Hence once a
`task_retired` event at revision r has been applied, no snapshot older than r can bring
the `live` record back. Removed clusters leave a tombstone (id -> revision) for the same
reason. The subscription is opened before the first snapshot so no event falls in a gap;
events lost while disconnected are repaired by the next snapshot."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from inlaid_ray.registry.events import (
    BaseVersionChanged,
    ClusterRemoved,
    ClusterUpdated,
    Event,
    EventsMissed,
    EventSubscription,
    TaskAdded,
    TaskRetired,
    TaskUpdated,
)
from inlaid_ray.registry.records import BaseVersion, ClusterRecord, TaskRecord
from inlaid_ray.registry.store import Snapshot, TaskRegistry

log = logging.getLogger(__name__)


class RegistryWatcher:
    """Cache of the registry refreshed by events and every `refresh_interval_s` seconds."""

    def __init__(self, registry: TaskRegistry, refresh_interval_s: float = 30.0, poll_s: float = 0.25,
                 on_event: Callable[[Event], None] | None = None, supervise: bool = False) -> None:
        if refresh_interval_s <= 0 or poll_s <= 0:
            raise ValueError(f"refresh_interval_s={refresh_interval_s} and poll_s={poll_s} must be > 0")
        self.registry = registry
        self.refresh_interval_s = refresh_interval_s
        self.poll_s = poll_s  # how often the thread wakes to check for stop()
        self.on_event = on_event  # called on the watcher thread after each applied event
        # The owner of an embedded server restarts it when it stops answering (embedded.py).
        self.supervise = supervise
        self.num_server_restarts = 0
        self._cond = threading.Condition()
        self._tasks: dict[str, TaskRecord] = {}
        self._clusters: dict[str, ClusterRecord] = {}
        self._cluster_tombstones: dict[str, int] = {}
        self._base: BaseVersion | None = None
        self._revision = 0
        self._sub: EventSubscription | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_events = 0
        self.num_refreshes = 0
        self.num_errors = 0
        self.num_resyncs = 0  # reconnects repaired by a snapshot
        # False from a failed read of the registry until a snapshot is read again; the cache
        # keeps serving the last known state meanwhile
        self.connected = True

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> "RegistryWatcher":
        """Subscribe, load a snapshot, and start the background thread."""
        if self._thread is not None:
            raise RuntimeError("RegistryWatcher already started")
        self._sub = self.registry.subscribe()
        self.refresh()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="inlaid-registry-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and close the subscription."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def __enter__(self) -> "RegistryWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        next_refresh = time.monotonic() + self.refresh_interval_s
        while not self._stop.is_set():
            try:
                if self._sub is None:  # reconnect after an error; events may have been missed
                    self._sub = self.registry.subscribe()
                    self.refresh()
                    next_refresh = time.monotonic() + self.refresh_interval_s
                    if not self.connected:
                        log.warning("registry watcher (namespace %r) reconnected", self.registry.namespace)
                    self.connected = True
                wait = min(self.poll_s, max(0.0, next_refresh - time.monotonic()))
                try:
                    event = self._sub.get(timeout=wait)
                except EventsMissed:
                    self.num_resyncs += 1
                    log.warning("registry watcher (namespace %r) reconnected; refreshing", self.registry.namespace)
                    self.refresh()
                    continue
                if event is not None:
                    self.apply(event)
                if time.monotonic() >= next_refresh:
                    self.refresh()
                    next_refresh = time.monotonic() + self.refresh_interval_s
            except Exception as exc:  # background loop: log with context, resubscribe, go on
                self.num_errors += 1
                self.connected = False
                log.exception("registry watcher (namespace %r) failed; resubscribing", self.registry.namespace)
                if self._sub is not None:
                    try:
                        self._sub.close()
                    except Exception:  # the connection is already broken; nothing to release
                        pass
                    self._sub = None
                if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                    self._supervise()  # the server may be gone; a listener's bug is not the server's
                self._stop.wait(min(5.0, self.poll_s * 4))

    def _supervise(self) -> None:
        ensure_server = getattr(self.registry.client, "ensure_server", None) if self.supervise else None
        if ensure_server is None:
            return
        try:
            if ensure_server():
                self.num_server_restarts += 1
        except Exception:  # noqa: BLE001 - retried on the next failure; serving goes on from the cache
            log.exception("restarting the embedded registry server failed")

    # ---- merging --------------------------------------------------------------------------

    def refresh(self) -> int:
        """Read a full snapshot now and merge it; returns its revision."""
        snapshot = self.registry.snapshot()
        self.apply_snapshot(snapshot)
        return snapshot.revision

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Merge a snapshot: newer cached records (from events) win over older snapshot ones."""
        with self._cond:
            for name, rec in snap.tasks.items():
                cur = self._tasks.get(name)
                if cur is None or cur.revision <= rec.revision:
                    self._tasks[name] = rec
            for name in [n for n, cur in self._tasks.items() if n not in snap.tasks and cur.revision <= snap.revision]:
                del self._tasks[name]
            for cid, rec in snap.clusters.items():
                cur = self._clusters.get(cid)
                removed_at = self._cluster_tombstones.get(cid, -1)
                if removed_at < rec.revision and (cur is None or cur.revision <= rec.revision):
                    self._clusters[cid] = rec
            gone = [c for c, cur in self._clusters.items() if c not in snap.clusters and cur.revision <= snap.revision]
            for cid in gone:
                del self._clusters[cid]
            self._cluster_tombstones = {c: r for c, r in self._cluster_tombstones.items() if r > snap.revision}
            if snap.base_version is not None:
                if self._base is None or self._base.revision <= snap.base_version.revision:
                    self._base = snap.base_version
            elif self._base is not None and self._base.revision <= snap.revision:
                self._base = None
            self._revision = max(self._revision, snap.revision)
            self.num_refreshes += 1
            self._cond.notify_all()

    def apply(self, event: Event) -> bool:
        """Merge one event; False if the cache already held something newer."""
        with self._cond:
            changed = self._merge_event(event)
            self._revision = max(self._revision, event.revision)
            self.num_events += 1
            self._cond.notify_all()
        if changed and self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a listener bug must not stop cache updates
                log.exception("registry watcher listener failed on %s at revision %d", event.type, event.revision)
        return changed

    def _merge_event(self, event: Event) -> bool:
        if isinstance(event, (TaskAdded, TaskUpdated, TaskRetired)):
            cur = self._tasks.get(event.task.name)
            if cur is not None and cur.revision > event.task.revision:
                return False
            self._tasks[event.task.name] = event.task
            return True
        if isinstance(event, ClusterUpdated):
            cid = event.cluster.cluster_id
            cur = self._clusters.get(cid)
            removed_at = self._cluster_tombstones.get(cid, -1)
            if removed_at >= event.cluster.revision or (cur is not None and cur.revision > event.cluster.revision):
                return False
            self._clusters[cid] = event.cluster
            return True
        if isinstance(event, ClusterRemoved):
            cur = self._clusters.get(event.cluster_id)
            if cur is not None and cur.revision > event.revision:
                return False
            self._clusters.pop(event.cluster_id, None)
            self._cluster_tombstones[event.cluster_id] = event.revision
            return True
        if isinstance(event, BaseVersionChanged):
            if self._base is not None and self._base.revision > event.base.revision:
                return False
            self._base = event.base
            return True
        raise TypeError(f"unhandled registry event {event!r}")

    # ---- lookups (no Redis round trip) ----------------------------------------------------

    def get_task(self, name: str) -> TaskRecord | None:
        """The cached record of `name` (any status), or None."""
        with self._cond:
            return self._tasks.get(name)

    def live_task(self, name: str) -> TaskRecord | None:
        """The cached record of `name` if it is live, else None."""
        task = self.get_task(name)
        return task if task is not None and task.status == "live" else None

    def tasks(self) -> list[TaskRecord]:
        """All cached tasks, sorted by name."""
        with self._cond:
            return sorted(self._tasks.values(), key=lambda t: t.name)

    def get_cluster(self, cluster_id: str) -> ClusterRecord | None:
        """The cached cluster `cluster_id`, or None."""
        with self._cond:
            return self._clusters.get(cluster_id)

    def clusters(self) -> list[ClusterRecord]:
        """All cached clusters, sorted by id."""
        with self._cond:
            return sorted(self._clusters.values(), key=lambda c: c.cluster_id)

    @property
    def base_version(self) -> BaseVersion | None:
        """The cached current base version."""
        with self._cond:
            return self._base

    @property
    def revision(self) -> int:
        """Highest registry revision merged so far."""
        with self._cond:
            return self._revision

    def wait_for(self, predicate: Callable[["RegistryWatcher"], bool], timeout_s: float) -> bool:
        """Block until `predicate(self)` holds (checked after every merge) or `timeout_s` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout_s)
