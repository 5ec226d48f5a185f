"""Which adapter clusters a replica holds and when it may let go of them (the multiplex pattern
of Ray Serve's `serve.multiplexed`, docs/style.md rule 18); its base versions are `base_residency.py`'s.

Adapter clusters. Ray Serve's multiplexer owns the LRU over cluster ids: on a miss it evicts the
least recently used cluster (calling the evicted object's `__del__`) and then calls our load.
Eviction here is *deferred*: an evicted cluster stops owning its adapters at once, but an
adapter leaves the bank only when no resident cluster owns it AND no request in flight uses it,
because the engine reads a request's slot on every step until the request ends. Example with
max_clusters_per_replica = 1: a long request of task `email` (cluster B) is decoding when a
request for cluster A arrives; Ray evicts B, A's adapters load into free slots, and `email`'s
slot is released only when its last request finishes. A load that finds too few free slots
waits for such releases (up to `drain_timeout_s`), then fails with NoFreeSlot. A member that
left its cluster (retired, failed) is dropped the same way when a request brings the cluster's
new spec (`reconcile`): its requests in flight finish on it, new ones cannot name it.

Compressed clusters. A spec of format "jd_bank" loads its members from the cluster bank at
`bank_uri` into a compressed cluster slot of the bank (`AdapterBank.add_cluster`), one slot per
bank cluster whose members all need loading; every other member (absent from the bank, or the
replica has no cluster slots, or the bank is unreadable) loads raw, so one replica mixes both.
A compressed member leaves the bank by the same deferred rule (`bank.remove` frees its row, and
the cluster slot once its last row is gone). A member whose version moves on, or whose cluster
names another bank, is reloaded on its next request: the whole cluster from the new bank (a
cluster slot is taken before the old one empties), or that member alone raw (exact).

All methods run on one asyncio loop; loads are serialised by one lock with a re-check after
acquiring it. The residency never writes the bank: it submits adapter commands to the engine
(`engine/adapters.py`), which applies them between steps in its worker thread, and it reads the
bank's published `BankView`. A new *version* of a resident adapter replaces its slot in place and
takes effect from the next step on. Evictions are queued in order with loads, so an adapter
evicted and then wanted again is evicted first and loaded after.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from inlaid_ray.engine.adapters import AdapterHost, AdapterInUse, EvictAdapter, LoadAdapter, LoadCluster
from inlaid_ray.engine.async_engine import EngineShutdown
from inlaid_ray.errors import NoFreeSlot, TaskNotFound
from inlaid_ray.lora.bank import BankView
from inlaid_ray.serve.replica_protocol import AdapterEntry, ClusterSpec

log = logging.getLogger(__name__)

_EVICT_RETRY_S = 0.05  # an eviction refused because a request was still finishing is tried again after this

# (entry) -> LoRAAdapter named entry.task; runs off the loop (file I/O, tensor conversion)
AdapterLoader = Callable[[AdapterEntry], Awaitable[Any]]
# (bank_uri) -> ClusterBanks (lora/cluster_bank.py) on the bank's dtype and device; off the loop
BankLoader = Callable[[str], Awaitable[Any]]


@dataclass
class _AdapterState:
    entry: AdapterEntry
    owners: set[str] = field(default_factory=set)  # resident cluster ids that list this adapter
    in_flight: int = 0  # requests holding a lease on it
    bank_uri: str = ""  # the compressed bank it was loaded from; "" = raw PEFT

    def serves(self, entry: AdapterEntry, bank_uri: str) -> bool:
        """Whether the resident copy is `entry`'s version for a cluster served from `bank_uri`
        ("" = raw): raw always qualifies (exact), a compressed copy only from that bank."""
        same = self.entry.version == entry.version and self.entry.uri == entry.uri
        return same and (not self.bank_uri or self.bank_uri == bank_uri)


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

    def __init__(self, host: AdapterHost, load_adapter: AdapterLoader, drain_timeout_s: float = 120.0,
                 load_bank: BankLoader | None = None) -> None:
        self._host = host
        self._load_adapter = load_adapter
        self._load_bank = load_bank  # None: "jd_bank" clusters load raw
        self.drain_timeout_s = drain_timeout_s
        self._clusters: dict[str, _Cluster] = {}
        self._adapters: dict[str, _AdapterState] = {}
        self._loading: set[str] = set()
        self._evicting: dict[str, asyncio.Future[Any]] = {}  # evictions submitted, not yet applied
        self._orphaned: set[str] = set()  # loads whose caller was cancelled, not yet delivered (draining)
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

    def compressed_from(self, task: str) -> str:
        """The bank a resident adapter was loaded from ("" raw or absent)."""
        state = self._adapters.get(task)
        return state.bank_uri if state else ""

    def in_flight(self, task: str) -> int:
        state = self._adapters.get(task)
        return state.in_flight if state else 0

    @property
    def view(self) -> BankView:
        return self._host.adapter_view

    async def settled(self) -> None:
        """Wait until every eviction submitted so far has been applied (or failed)."""
        while self._evicting:
            await asyncio.gather(*self._evicting.values(), return_exceptions=True)

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
                await self._load_entries(cid, spec.adapters, spec.compressed_bank)
                cluster.spec = spec
                return ClusterToken(cid, cluster.generation, on_unload)
            started = time.perf_counter()
            self._loading.add(cid)
            try:
                await self._load_entries(cid, spec.adapters, spec.compressed_bank)
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
        spec = self._clusters[token.cluster_id].spec
        if state is None or token.cluster_id not in state.owners or not state.serves(entry, spec.compressed_bank):
            async with self._lock:
                if not self.is_current(token):
                    return None
                spec = self._clusters[token.cluster_id].spec
                # A cluster now served from another bank reloads as a whole (compressed where it can).
                whole = spec.compressed_bank and spec.entry(entry.task) == entry
                await self._load_entries(token.cluster_id, spec.adapters if whole else (entry,), spec.compressed_bank)
            state = self._adapters[entry.task]
        state.in_flight += 1
        return Lease(self, entry.task)

    def reconcile(self, spec: ClusterSpec) -> None:
        """Adopt a resident cluster's newer spec: members it no longer lists (retired, failed) stop
        being owned by it and leave the bank once their last request ends."""
        cluster = self._clusters.get(spec.cluster_id)
        if cluster is None or cluster.spec == spec:
            return
        listed = {e.task for e in spec.adapters}
        for task in [t for t, s in self._adapters.items() if spec.cluster_id in s.owners and t not in listed]:
            self._adapters[task].owners.discard(spec.cluster_id)
            self._maybe_remove(task)
        cluster.spec = spec

    # ---- internals -------------------------------------------------------------------------

    async def _load_entries(self, cid: str, entries: tuple[AdapterEntry, ...], bank_uri: str = "") -> None:
        """Own `entries` for cluster `cid`, loading those missing or at another version, compressed
        from `bank_uri` where it can ("" = raw; see module docstring). Holds the lock."""
        todo = []
        for entry in entries:
            state = self._adapters.get(entry.task)
            if state is not None and state.serves(entry, bank_uri):
                state.owners.add(cid)
            else:
                todo.append(entry)
        # While loading anyway, members resident raw may move into the bank's cluster with the others.
        candidates = todo + [e for e in entries if e not in todo and not self._adapters[e.task].bank_uri]
        clusters = await self._compressed_plan(cid, bank_uri, candidates) if bank_uri and todo else []
        room = self._free_clusters() + self._draining_clusters()
        if len(clusters) > room:  # every cluster slot held by a resident cluster: the rest load raw
            log.info("cluster %s: %d of %d bank clusters load raw (cluster slots in use)", cid, len(clusters) - room,
                     len(clusters))
            clusters = clusters[:room]
        in_bank = {name for cl in clusters for name in cl.members}
        raw = [e for e in todo if e.task not in in_bank]
        # A compressed resident (or one being evicted) replaced by raw needs a raw slot too.
        await self._wait_for_capacity(lambda: sum(1 for e in raw if e.task not in self.view.raw or e.task in self._evicting),
                                      len(clusters), cid)
        for cl in clusters:  # members resident elsewhere are replaced
            await self._apply_load(LoadCluster(cl, f"{cid}/{cl.cluster_id}"), list(cl.members))
            for entry in (e for e in candidates if e.task in cl.members):
                self._own(cid, entry, bank_uri)
        for entry in raw:
            adapter = await self._load_adapter(entry)
            await self._apply_load(LoadAdapter(adapter), [entry.task])  # same name: in place; else a free slot
            self._own(cid, entry, "")

    async def _apply_load(self, command: Any, names: list[str]) -> None:
        """Submit a load and wait for it; if the caller is cancelled meanwhile, the engine still
        applies it, so adapters that then belong to no cluster are evicted as soon as it lands."""
        future = self._host.submit_adapter_command(command)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            # Counted as draining until the callback runs: the bank's view may show the landed
            # adapter before the loop delivers the future (it is updated on the engine's thread).
            self._orphaned.update(names)
            future.add_done_callback(lambda f: self._landed_unowned(f, names))
            raise

    def _landed_unowned(self, future: asyncio.Future[Any], names: list[str]) -> None:
        self._orphaned.difference_update(names)
        self._freed.set()
        if future.cancelled() or future.exception() is not None:
            return
        for name in names:
            if name not in self._adapters and name not in self._evicting:
                self._submit_eviction(name)

    def _own(self, cid: str, entry: AdapterEntry, bank_uri: str) -> None:
        state = self._adapters.setdefault(entry.task, _AdapterState(entry))
        state.entry, state.bank_uri = entry, bank_uri
        state.owners.add(cid)

    async def _compressed_plan(self, cid: str, bank_uri: str, todo: list[AdapterEntry]) -> list[Any]:
        """The bank clusters of `bank_uri` to load compressed: those whose members are all in `todo`
        and that fit the bank's cluster capacity; [] (all raw) when the bank cannot be used."""
        view = self.view
        if self._load_bank is None or view.max_clusters == 0:
            return []
        try:
            banks = await self._load_bank(bank_uri)
        except Exception as exc:  # noqa: BLE001 - raw adapters are the exact fallback
            log.warning("cluster %s: compressed bank %s unusable (%s); loading its members raw", cid, bank_uri, exc)
            return []
        wanted = {e.task for e in todo}
        chosen = []
        for cl in banks.clusters:
            if not cl.members or not set(cl.members) <= wanted:
                continue  # unlisted (retired) or already resident members: the listed ones load raw
            rank = max(cl.ranks.values(), default=0)
            if len(cl.members) > view.max_cluster_size or rank > view.max_cluster_rank:
                log.warning("cluster %s: bank %s cluster %d (%d members, rank %d) exceeds the bank's cluster "
                            "capacity (size %d, rank %d); loading it raw", cid, bank_uri, cl.cluster_id,
                            len(cl.members), rank, view.max_cluster_size, view.max_cluster_rank)
                continue
            chosen.append(cl)
        return chosen[:view.max_clusters]

    def _free_clusters(self) -> int:
        return self.view.free_clusters

    def _draining_clusters(self) -> int:
        """Used cluster slots that no resident cluster owns a row of (they free as requests end)."""
        def owned(name: str) -> bool:
            state = self._adapters.get(name)
            return state is not None and bool(state.owners)

        return sum(1 for members in self.view.clusters.values() if not any(owned(n) for n in members))

    async def _wait_for_capacity(self, slots_needed: Callable[[], int], clusters: int, cid: str) -> None:
        """Wait until `slots_needed()` raw slots (recounted as evictions land) and `clusters`
        compressed cluster slots are free."""
        view = self.view
        needed = slots_needed()
        if needed > view.max_slots:
            raise NoFreeSlot(f"cluster {cid!r} needs {needed} adapter slots but the bank has "
                             f"{view.max_slots}; raise max_adapters_per_replica")
        deadline = time.monotonic() + self.drain_timeout_s
        while (view := self.view).free_slots < (needed := slots_needed()) or view.free_clusters < clusters:
            draining = [t for t, s in self._adapters.items() if not s.owners] + list(self._evicting) + \
                sorted(self._orphaned)
            remaining = deadline - time.monotonic()
            if not draining or remaining <= 0:
                raise NoFreeSlot(
                    f"cluster {cid!r} needs {needed} free adapter slots and {clusters} cluster slots, "
                    f"{view.free_slots} free of {view.max_slots} and {view.free_clusters} of "
                    f"{view.max_clusters}; resident clusters {self.resident_clusters}, "
                    f"adapters draining {sorted(draining)}"
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
        self._submit_eviction(task)

    def _submit_eviction(self, task: str) -> None:
        future = self._host.submit_adapter_command(EvictAdapter(task))  # queued now: ordered before later loads
        self._evicting[task] = future
        future.add_done_callback(lambda f: self._evicted(task, f))

    def _evicted(self, task: str, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else None
        # A request of the engine still held it (its abort was not applied yet), or the engine it
        # was sent to shut down in a base swap: try again after a step, on the current engine. It
        # stays in `_evicting` meanwhile, so loads keep counting it as draining.
        if isinstance(exc, (AdapterInUse, EngineShutdown)) and task not in self._adapters:
            loop = asyncio.get_running_loop()
            placeholder: asyncio.Future[Any] = loop.create_future()
            self._evicting[task] = placeholder
            loop.call_later(_EVICT_RETRY_S, self._retry_eviction, task, placeholder)
            return
        if self._evicting.get(task) is future:
            del self._evicting[task]
        if exc is not None and not isinstance(exc, TaskNotFound):  # TaskNotFound: a failed load never reached it
            log.warning("eviction of adapter %r failed: %s", task, exc)
        self._freed.set()

    def _retry_eviction(self, task: str, placeholder: asyncio.Future[Any]) -> None:
        if self._evicting.get(task) is placeholder:
            del self._evicting[task]
            if task not in self._adapters:  # not wanted again meanwhile
                self._submit_eviction(task)
        placeholder.set_result(None)
        self._freed.set()


# ---- base versions ---------------------------------------------------------------------------
