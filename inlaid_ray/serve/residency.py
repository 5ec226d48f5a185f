"""Which adapter clusters a replica holds, which requests use them, and when their bank slots
may be freed (the multiplex pattern of Ray Serve's `serve.multiplexed`, STYLE rule 18).

Ray Serve's multiplexer owns the LRU over cluster ids: on a miss it evicts the least recently
used cluster (calling the evicted object's `__del__`) and then calls our load. Eviction here is
*deferred*: an evicted cluster stops owning its adapters at once, but an adapter leaves the
bank only when no resident cluster owns it AND no request in flight uses it, because the
engine reads a request's slot on every step until the request ends. Example with
max_clusters_per_replica = 1: a long request of task `email` (cluster B) is decoding when a
request for cluster A arrives; Ray evicts B, A's adapters load into free slots, and `email`'s
slot is released only when its last request finishes. A load that finds too few free slots
waits for such releases (up to `drain_timeout_s`), then fails with NoFreeSlot.

All methods run on one asyncio loop; loads are serialised by one lock with a re-check after
acquiring it. Bank writes touch only slots no scheduled request uses (a new adapter gets a free
slot, a freed slot has no user), so they may overlap an engine step; a new *version* of a
resident adapter replaces its slot in place and takes effect from the next step on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from inlaid_ray.errors import NoFreeSlot, TaskNotFound
from inlaid_ray.serve.replica_protocol import AdapterEntry, ClusterSpec

log = logging.getLogger(__name__)

# (entry) -> LoRAAdapter named entry.task; runs off the loop (file I/O, tensor conversion)
AdapterLoader = Callable[[AdapterEntry], Awaitable[Any]]


@dataclass
class _AdapterState:
    entry: AdapterEntry
    owners: set[str] = field(default_factory=set)  # resident cluster ids that list this adapter
    in_flight: int = 0  # requests holding a lease on it


@dataclass
class _Cluster:
    spec: ClusterSpec
    generation: int


class ClusterToken:
    """What the Ray multiplexer caches per cluster; its `__del__` (called by Ray on LRU
    eviction, from a worker thread) hands the eviction to the residency's loop."""

    def __init__(self, cluster_id: str, generation: int, on_unload: Callable[[str, int], None]) -> None:
        self.cluster_id = cluster_id
        self.generation = generation
        self._on_unload = on_unload
        self._unloaded = False

    def __del__(self) -> None:
        # Ray calls this explicitly, and the garbage collector calls it again later.
        if self._unloaded:
            return
        self._unloaded = True
        try:
            self._on_unload(self.cluster_id, self.generation)
        except Exception:  # interpreter shutdown / closed loop: nothing left to release
            pass


class Lease:
    """One request's hold on one adapter; `release()` exactly once when the request ends."""

    def __init__(self, residency: "ClusterResidency", task: str) -> None:
        self._residency, self.task, self._released = residency, task, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._residency._release(self.task)


class ClusterResidency:
    """Adapter residency of one replica's bank, keyed by cluster (see module docstring)."""

    def __init__(self, bank: Any, load_adapter: AdapterLoader, drain_timeout_s: float = 120.0) -> None:
        self.bank = bank
        self._load_adapter = load_adapter
        self.drain_timeout_s = drain_timeout_s
        self._clusters: dict[str, _Cluster] = {}
        self._adapters: dict[str, _AdapterState] = {}
        self._loading: set[str] = set()
        self._lock = asyncio.Lock()
        self._freed = asyncio.Event()
        self._generations = itertools.count(1)
        # Load/unload latency histograms are exported by Ray's multiplexer around our load
        # (serve_multiplexed_model_load_latency_ms); these counters go into routing stats.
        self.num_loads = 0
        self.num_evictions = 0
        self.last_load_s: float | None = None

    # ---- queries ---------------------------------------------------------------------------

    @property
    def resident_clusters(self) -> list[str]:
        return sorted(self._clusters)

    @property
    def loading_clusters(self) -> list[str]:
        return sorted(self._loading)

    def in_flight(self, task: str) -> int:
        state = self._adapters.get(task)
        return state.in_flight if state else 0

    def is_current(self, token: ClusterToken) -> bool:
        cluster = self._clusters.get(token.cluster_id)
        return cluster is not None and cluster.generation == token.generation

    # ---- load / evict ----------------------------------------------------------------------

    async def load(self, spec: ClusterSpec, on_unload: Callable[[str, int], None]) -> ClusterToken:
        """Make every adapter of `spec` resident (Ray's multiplexer calls this on a miss)."""
        async with self._lock:
            cid = spec.cluster_id
            if cid in self._clusters:  # re-check: loaded while we waited for the lock
                cluster = self._clusters[cid]
                await self._load_entries(cid, spec.adapters)
                cluster.spec = spec
                return ClusterToken(cid, cluster.generation, on_unload)
            started = time.perf_counter()
            self._loading.add(cid)
            try:
                await self._load_entries(cid, spec.adapters)
            except BaseException:
                self._drop_owner(cid)
                raise
            finally:
                self._loading.discard(cid)
            generation = next(self._generations)
            self._clusters[cid] = _Cluster(spec, generation)
            self.num_loads += 1
            self.last_load_s = time.perf_counter() - started
            log.info("cluster %s resident (%d adapters, %.2fs)", cid, len(spec.adapters), self.last_load_s)
            return ClusterToken(cid, generation, on_unload)

    def evict(self, cluster_id: str, generation: int) -> None:
        """Ray dropped `cluster_id` from its LRU: release its ownership (stale tokens are ignored)."""
        cluster = self._clusters.get(cluster_id)
        if cluster is None or cluster.generation != generation:
            return
        del self._clusters[cluster_id]
        self.num_evictions += 1
        self._drop_owner(cluster_id)

    async def acquire(self, token: ClusterToken, entry: AdapterEntry) -> Lease | None:
        """A lease on `entry`'s adapter in the cluster of `token`; None if that cluster was evicted
        meanwhile (the caller loads it again). Loads the adapter if it joined the cluster or
        changed version since the cluster was loaded."""
        if not self.is_current(token):
            return None
        state = self._adapters.get(entry.task)
        if state is None or token.cluster_id not in state.owners or state.entry.version != entry.version:
            async with self._lock:
                if not self.is_current(token):
                    return None
                await self._load_entries(token.cluster_id, (entry,))
            state = self._adapters[entry.task]
        state.in_flight += 1
        return Lease(self, entry.task)

    # ---- internals -------------------------------------------------------------------------

    async def _load_entries(self, cid: str, entries: tuple[AdapterEntry, ...]) -> None:
        """Own `entries` for cluster `cid`, loading those missing or at another version (holds the lock)."""
        todo = []
        for entry in entries:
            state = self._adapters.get(entry.task)
            if state is not None and state.entry.version == entry.version and state.entry.uri == entry.uri:
                state.owners.add(cid)
            else:
                todo.append(entry)
        new_slots = sum(1 for e in todo if e.task not in self.bank)
        await self._wait_for_slots(new_slots, cid)
        for entry in todo:
            adapter = await self._load_adapter(entry)
            self.bank.add(adapter)  # same name: replaced in place; else a free slot
            state = self._adapters.setdefault(entry.task, _AdapterState(entry))
            state.entry = entry
            state.owners.add(cid)

    async def _wait_for_slots(self, needed: int, cid: str) -> None:
        if needed > self.bank.max_slots:
            raise NoFreeSlot(f"cluster {cid!r} needs {needed} adapter slots but the bank has "
                             f"{self.bank.max_slots}; raise max_adapters_per_replica")
        deadline = time.monotonic() + self.drain_timeout_s
        while self.bank.max_slots - len(self.bank) < needed:
            draining = [t for t, s in self._adapters.items() if not s.owners]
            remaining = deadline - time.monotonic()
            if not draining or remaining <= 0:
                raise NoFreeSlot(
                    f"cluster {cid!r} needs {needed} free adapter slots, "
                    f"{self.bank.max_slots - len(self.bank)} free of {self.bank.max_slots}; resident "
                    f"clusters {self.resident_clusters}, adapters draining {sorted(draining)}"
                )
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                continue

    def _drop_owner(self, cid: str) -> None:
        """`cid` owns nothing any more (scans all: members may have joined after its load)."""
        for task in [t for t, s in self._adapters.items() if cid in s.owners]:
            self._adapters[task].owners.discard(cid)
            self._maybe_remove(task)

    def _release(self, task: str) -> None:
        state = self._adapters.get(task)
        assert state is not None and state.in_flight > 0, f"release of {task!r} without a lease"
        state.in_flight -= 1
        self._maybe_remove(task)

    def _maybe_remove(self, task: str) -> None:
        state = self._adapters[task]
        if state.owners or state.in_flight:
            return
        del self._adapters[task]
        try:
            self.bank.remove(task)
        except TaskNotFound:  # a failed load never reached the bank
            pass
        self._freed.set()
