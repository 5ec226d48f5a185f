"""The replica deployment: a thin Ray Serve shell over an injectable engine (docs/style.md rule 15).

Each replica builds its engine with a factory (`engine_builder.build_engine` unless an import
path is given), multiplexes adapter *clusters* with `serve.multiplexed` (the multiplexed model
id of a request is its task's cluster id, LRU-bounded by `max_clusters`; eviction is deferred
until no request in flight uses an adapter, see residency.py; a "jd_bank" cluster loads as a
compressed cluster bank, others as raw PEFT adapters, side by side), streams each request's deltas,
and reports routing stats (resident clusters, running/waiting, KV usage, distinct adapters in
the last step, predicted outstanding tokens) for `ClusterAffinityRouter`.

Base versions: every request also carries the base version the registry names (`BaseRef`);
`base_residency.BaseResidency` loads a new one beside the running engine (same adapter bank) and
swaps when it is ready, each request finishing on the engine it started on (see base_residency.py).
The first chunk names the base version that serves the request (`base_version`).

Streaming coalesces: a pump task moves engine deltas into a queue, and each yield carries
every delta that arrived since the last one, so a slow consumer costs fewer Ray messages
instead of a growing backlog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve

from inlaid_ray.engine import AsyncLLMEngine
from inlaid_ray.engine.adapters import AdapterCommand
from inlaid_ray.errors import InvalidRequest, ModelLoadError, NoFreeSlot, TaskNotFound
from inlaid_ray.lora.bank import BankView
from inlaid_ray.model import ModelConfig
from inlaid_ray.devices import resolve_device, resolve_dtype
from inlaid_ray.engine.builder import engine_on_base
from inlaid_ray.serve.engine_builder import EngineBundle, ReplicaSpec, build_engine, load_bank, load_cluster_adapter
from inlaid_ray.serve.http_errors import error_chunk
from inlaid_ray.serve.imports import import_object
from inlaid_ray.serve.replica_protocol import ENGINE_DEPLOYMENT, AdapterEntry, ReplicaRequest, merge_outputs
from inlaid_ray.serve.base_residency import BaseRef, BaseResidency, EngineSlot
from inlaid_ray.serve.residency import ClusterResidency, ClusterToken, Lease

log = logging.getLogger(__name__)
# How long a request waits for the registry's base when the replica still runs the base it
# started on (BaseResidency.settle); past it the request is served on that base, with a warning.
FIRST_BASE_WAIT_S = 120.0

_END = object()  # the pump's end-of-stream marker
_ACQUIRE_ATTEMPTS = 3  # a cluster evicted between load and lease is loaded again, this often
# Fields that must agree between two bases sharing one adapter bank and one tokenizer.
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim")


@dataclass
class _InFlight:
    prompt_tokens: int
    predicted_len: float
    generated: int = 0

    @property
    def outstanding(self) -> float:
        """Predicted tokens of work left: the prompt until it is prefilled, then the rest of the output."""
        prefill = self.prompt_tokens if self.generated == 0 else 0
        return prefill + max(self.predicted_len - self.generated, 1.0)


def engine_for_base(uri: str, spec: ReplicaSpec, bank: Any, model_config: ModelConfig) -> AsyncLLMEngine:
    """A ready engine on the base at `uri` sharing `bank` (blocking: call it off the event loop)."""
    new = ModelConfig.from_dir(uri)
    diff = {f: (getattr(model_config, f), getattr(new, f)) for f in _SHAPE_FIELDS
            if getattr(model_config, f) != getattr(new, f)}
    if diff:
        raise ModelLoadError(f"base {uri} does not fit this replica's adapter bank and tokenizer: "
                             f"(field: (serving, new)) {diff}")
    device = resolve_device(spec.device)
    dtype = bank.dtype if bank is not None else resolve_dtype(spec.dtype, device)
    return AsyncLLMEngine(engine_on_base(uri, bank, spec.engine, dtype=dtype, device=device,
                                         gptq_cache_dequantized=spec.gptq_cache_dequantized))


class _CurrentEngine:
    """The adapter host of a replica's residency: its current engine (all engines share one bank)."""

    def __init__(self, bases: BaseResidency) -> None:
        self._bases = bases

    @property
    def adapter_view(self) -> BankView:
        return self._bases.current.engine.adapter_view

    def submit_adapter_command(self, command: AdapterCommand) -> asyncio.Future[int | None]:
        return self._bases.current.engine.submit_adapter_command(command)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # built outside a Serve replica (plain tests)
        return "local"


@serve.deployment(name=ENGINE_DEPLOYMENT)
class EngineReplica:
    """Engine replica; build_app sets num_replicas, resources and the request router."""

    def __init__(self, spec: ReplicaSpec, engine_factory: str | None = None) -> None:
        factory: Callable[[ReplicaSpec], EngineBundle] = import_object(engine_factory) if engine_factory else build_engine
        bundle = factory(spec)
        self._spec = spec
        self._model_config = bundle.model_config
        self._bank = bundle.bank
        # Base swaps build engines the default way; an injected factory's engine stays as it is.
        self._swaps_bases = engine_factory is None
        self._bases = BaseResidency(bundle.engine, spec.model_dir, self._load_base)
        self._replica_id = _replica_id()
        self._inflight: dict[str, _InFlight] = {}
        self._specs: dict[str, Any] = {}  # cluster id -> latest ClusterSpec seen (read by the loader)
        self._num_cancelled = 0  # streams the consumer left before they finished (client went away)
        self._residency = None if self._bank is None else \
            ClusterResidency(_CurrentEngine(self._bases), self._read_adapter, spec.drain_timeout_s, self._read_bank)
        # Decorated here, not on the class, so that the LRU bound comes from the spec.
        self._load_cluster = serve.multiplexed(max_num_models_per_replica=spec.max_clusters_per_replica)(self._make_cluster_loader())

    # ---- Ray Serve hooks -----------------------------------------------------------------

    async def check_health(self) -> None:
        """Fail once an engine's background loop has died (Serve then replaces this replica)."""
        for slot in self._bases.slots():
            if slot.started and not slot.engine.is_running:
                raise RuntimeError(f"replica {self._replica_id}: the engine loop on {slot.uri} is not running")

    async def record_routing_stats(self) -> dict[str, Any]:
        """Pushed to the controller every request_routing_stats_period_s; read by the router."""
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Routing stats (advisory), from the snapshots each engine took after its last step."""
        bases = self._bases
        s = bases.current.engine.stats()
        others = [slot.engine.stats() for slot in bases.draining]
        residency = self._residency
        loading = bases.loading
        return {
            "replica": self._replica_id,
            "ts": time.time(),
            "loaded_clusters": residency.resident_clusters if residency else [],
            "loading_clusters": residency.loading_clusters if residency else [],
            "running": s.num_running + s.num_paused + sum(o.num_running + o.num_paused for o in others),
            "waiting": s.num_waiting + sum(o.num_waiting for o in others),
            "base_version": bases.current.version,
            "base_uri": bases.current.uri,
            "base_versions_draining": [slot.version for slot in bases.draining],
            "base_loading": loading.version if loading is not None else None,
            "base_swaps": bases.num_swaps,
            "kv_usage": s.kv_usage,
            "distinct_adapters_last_step": s.last_step_num_adapters,
            "running_adapters": sorted({a for e in (s, *others) for a in e.running_adapters}),
            "waiting_adapters": sorted({a for e in (s, *others) for a in e.waiting_adapters}),
            "max_adapters": self._spec.max_adapters_per_replica,
            "predicted_outstanding_tokens": sum(f.outstanding for f in self._inflight.values()),
            "in_flight": len(self._inflight),
            "adapters_resident": s.num_adapters_resident,
            "adapters_compressed": s.num_adapters_compressed,
            "cancelled": self._num_cancelled,
            "cluster_loads": residency.num_loads if residency else 0,
            "cluster_evictions": residency.num_evictions if residency else 0,
            "last_cluster_load_s": residency.last_load_s if residency else None,
        }

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, request: ReplicaRequest,
                       base: BaseRef | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Stream chunks (replica_protocol.py) on the current base, noting `base` (the registry's
        current version) for a background swap; failures arrive as one error chunk, never raised."""
        lease: Lease | None = None
        first = True
        try:
            if self._swaps_bases:
                await self._bases.settle(base, FIRST_BASE_WAIT_S)
            if request.task is not None:
                lease = await self._lease(request)
            async for chunk in self._stream(request):
                if first:
                    chunk["replica"], first = self._replica_id, False
                yield chunk
        except Exception as exc:  # noqa: BLE001 - delivered to the router as an error value
            if not isinstance(exc, (InvalidRequest, TaskNotFound)):
                log.exception("request %s (task %s) failed on replica %s", request.request_id, request.task, self._replica_id)
            yield {**error_chunk(exc), "replica": self._replica_id}
        finally:
            if lease is not None:
                lease.release()

    async def _lease(self, request: ReplicaRequest) -> Lease:
        cluster = request.cluster
        cid = serve.get_multiplexed_model_id()
        if cluster is None or cid != cluster.cluster_id:
            raise InvalidRequest(f"request {request.request_id}: multiplexed model id {cid!r} does not match "
                                 f"the cluster {cluster.cluster_id if cluster else None!r} of task {request.task!r}")
        entry = cluster.entry(request.task)  # type: ignore[arg-type]
        if entry is None:
            raise TaskNotFound(f"task {request.task!r} is not a member of cluster {cid!r}")
        if self._residency is None:
            raise TaskNotFound(f"task {request.task!r}: this replica serves the base model only")
        self._specs[cid] = cluster
        self._residency.reconcile(cluster)
        for _ in range(_ACQUIRE_ATTEMPTS):
            token: ClusterToken = await self._load_cluster(cid)
            lease = await self._residency.acquire(token, entry)
            if lease is not None:
                return lease
        raise NoFreeSlot(f"cluster {cid!r} was evicted {_ACQUIRE_ATTEMPTS} times before request "
                         f"{request.request_id} could use it; raise max_clusters_per_replica")

    async def _stream(self, request: ReplicaRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Chunks of every choice of `request` (one engine request each, same engine), coalesced
        per choice; the stream ends when every choice has finished."""
        n = request.num_choices
        flights = [_InFlight(len(request.prompt_token_ids), request.predicted_len or request.params.max_tokens)
                   for _ in range(n)]
        keys = [request.choice(i)[0] for i in range(n)]
        self._inflight.update(zip(keys, flights))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        slot = self._bases.acquire()  # the request lives on this engine (its weights, its KV cache) to the end
        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(self._pump(request, i, slot, queue)) for i in range(n)]
        ended, finished, first = 0, 0, True
        try:
            while ended < n:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                outputs: dict[int, list[Any]] = {}
                failure = None
                for index, item in items:
                    if item is _END:
                        ended += 1
                    elif isinstance(item, BaseException):
                        failure = failure or item
                    else:
                        outputs.setdefault(index, []).append(item)
                for index, outs in outputs.items():
                    flights[index].generated = outs[-1].num_completion_tokens
                    chunk = merge_outputs(outs, index)
                    if first:
                        chunk["base_version"], first = slot.version, False
                    if outs[-1].finished:
                        finished += 1
                        self._inflight.pop(keys[index], None)  # the stats describe what is left
                        if finished == n:
                            chunk["stats"] = self.stats()
                    yield chunk
                if failure is not None:
                    raise failure
        finally:
            for key in keys:
                self._inflight.pop(key, None)
            if finished < n:
                self._num_cancelled += 1
            for pump in pumps:
                if not pump.done():
                    pump.cancel()  # leaving the engine's iterator aborts the request there
            self._bases.release(slot)

    async def _pump(self, request: ReplicaRequest, index: int, slot: EngineSlot, queue: asyncio.Queue[Any]) -> None:
        request_id, params = request.choice(index)
        try:
            async for out in slot.engine.generate(
                request.prompt_token_ids, params, request.task, request_id, request.predicted_len
            ):
                slot.started = True  # its loop runs from the first output on (health checks it)
                queue.put_nowait((index, out))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, _END))

    # ---- adapters ------------------------------------------------------------------------

    def _make_cluster_loader(self) -> Callable[[str], Any]:
        async def load_cluster(cluster_id: str) -> ClusterToken:
            assert self._residency is not None
            loop = asyncio.get_running_loop()
            residency = self._residency

            def on_unload(cid: str, generation: int) -> None:  # from Ray's executor thread
                loop.call_soon_threadsafe(residency.evict, cid, generation)

            return await residency.load(self._specs[cluster_id], on_unload)

        return load_cluster

    async def _load_base(self, ref: BaseRef) -> AsyncLLMEngine:
        log.info("replica %s: loading base version %d from %s beside %s", self._replica_id, ref.version, ref.uri,
                 self._bases.current.uri)
        return await asyncio.to_thread(engine_for_base, ref.uri, self._spec, self._bank, self._model_config)

    async def _read_bank(self, uri: str) -> Any:
        assert self._bank is not None
        bank = self._bank
        return await asyncio.to_thread(load_bank, uri, self._model_config, bank.dtype, bank.device,
                                       self._spec.artifact_dir)

    async def _read_adapter(self, entry: AdapterEntry) -> Any:
        assert self._bank is not None
        bank = self._bank
        return await asyncio.to_thread(
            load_cluster_adapter, entry, self._model_config, bank.dtype, bank.device, self._spec.artifact_dir
        )
