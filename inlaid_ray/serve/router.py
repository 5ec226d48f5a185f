"""The ingress deployment: OpenAI-compatible HTTP API over the engine replicas (FastAPI through
`serve.ingress`, docs/style.md rule 16).

Per request: authenticate the API key (tenant), parse and validate the JSON body (400 with the
OpenAI error body, never FastAPI's 422), resolve `model` to the base model or a live task the
tenant may use (404 otherwise), apply the chat template and tokenize, enforce max_model_len,
predict the output length, then call `EngineReplica.generate` with the task's cluster as the
multiplexed model id so `ClusterAffinityRouter` can prefer replicas holding it. The first
chunk is awaited before answering, so failures up to the first token are real HTTP errors and
the `x-inlaid-replica` header names the replica that serves the request; later failures
arrive as an SSE error event. A non-streamed answer carries a `Server-Timing` header: the
router's tokenization, length prediction and whole time, and the engine's time, in ms; a silent
stream gets an SSE keep-alive comment every `sse_keepalive_s`. Routes: /v1/completions,
/v1/chat/completions, /v1/models, /health, /metrics, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (admin key;
serve/runtime_adapters.py), and admin routes under /v1/admin (admin key only): tasks (list,
show, retire), tenants, keys, replicas.

Every request also carries the registry's current base version (`BaseRef`), which replicas
swap to in the background (base_residency.py); the `x-inlaid-base-version` header names the base
version that served the request. The onboarding job probes a staged task before it goes live
with the admin key and `x-inlaid-probe: 1`: only then may a task still `onboarding` be used.
Such a probe may also send `x-inlaid-probe-avoid: <replica id>,...`: the request router then
passes those replicas over while another one runs, so the job reaches every replica in turn.
A retired task answers 404 as soon as the registry event arrives (the retire route waits for
it, so the next request through this router already gets 404); its requests in flight finish.
"""

# No `from __future__ import annotations` here: Serve's FastAPI class-based views rebuild the
# route signatures and need real (not string) annotations such as `Request`.
import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from inlaid_ray.config import DEFAULT_NAMESPACE
from inlaid_ray.lora.validation import AdapterLimits
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.errors import TaskNotFound
from inlaid_ray.registry import (
    RegistryWatcher,
    TaskRecord,
    TaskRegistry,
    connect_redis,
    task_rows,
    new_api_key,
    retire_task,
    show_task,
)
from inlaid_ray.serve.admin_protocol import TenantRequest
from inlaid_ray.serve.access import Authenticator, Caller, cluster_spec_for, resolve_model, visible_tasks
from inlaid_ray.serve.http_errors import (
    REGISTRY_ERRORS,
    REPLICA_UNAVAILABLE,
    OpenAIHTTPError,
    from_exception,
    from_validation_error,
)
from inlaid_ray.serve.length_prediction import PredictionBatcher, bounded_prediction, make_predictor
from inlaid_ray.serve.metrics import ServeMetrics
from inlaid_ray.serve.tool_calls import ToolCallParsing
from inlaid_ray.serve.openai_protocol import (
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    unsupported_field,
)
from inlaid_ray.serve.prompts import PreparedPrompt, prepare_chat, prepare_completion
from inlaid_ray.serve.replica_liveness import live_replica_ids
from inlaid_ray.serve.replica_protocol import ENGINE_DEPLOYMENT, ReplicaRequest
from inlaid_ray.serve.request_body import read_json_body
from inlaid_ray.serve.base_residency import BaseRef
from inlaid_ray.serve.responses import (
    Choice,
    ChoiceStreams,
    ResponseContext,
    StreamTracker,
    collect,
    next_chunk,
    server_timing,
    sse_events,
    with_keepalive,
)
from inlaid_ray.serve.openapi_doc import document_request_bodies
from inlaid_ray.serve.runtime_adapters import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest, load_adapter
from inlaid_ray.serve.seed import RegistrySeed, seed_registry

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-inlaid-replica"
BASE_VERSION_HEADER = "x-inlaid-base-version"
SERVER_TIMING_HEADER = "server-timing"  # non-streamed responses: where the request's time went (responses.server_timing)
PROBE_HEADER = "x-inlaid-probe"  # admin only: lets the onboarding job use a staged (onboarding) task
PROBE_AVOID_HEADER = "x-inlaid-probe-avoid"  # admin probe only: replica ids that already answered it
RETIRE_WAIT_S = 5.0  # how long the retire route waits for this router's cache to apply the retirement
HEALTH_PROBE_S = 5.0  # how long /health waits for an engine replica's first answer
LIVENESS_TIMEOUT_S = 2.0  # how long /metrics waits for Ray's list of live replicas
REPLICA_RETRIES = 2  # re-sends of a request whose replica failed before it streamed anything
REPLICA_RETRY_BACKOFF_S = 0.2  # times the attempt number: a restarting replica is not hammered

api = FastAPI(title="inlaid-ray", description="OpenAI-compatible multi-LoRA serving", docs_url=None, redoc_url=None)


document_request_bodies(api, {
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/load_lora_adapter", "post"): LoadLoRAAdapterRequest,
    ("/v1/unload_lora_adapter", "post"): UnloadLoRAAdapterRequest,
    ("/v1/admin/tenants", "post"): TenantRequest,
    ("/v1/admin/keys", "post"): TenantRequest,
})


@api.exception_handler(OpenAIHTTPError)
async def _openai_error(request: Request, exc: OpenAIHTTPError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _registry_error(request: Request, exc: Exception) -> JSONResponse:
    """A registry read or write that found Redis unreachable (admin routes, key checks): 503."""
    return await _openai_error(request, from_exception(exc))


for _registry_error_type in REGISTRY_ERRORS:
    api.add_exception_handler(_registry_error_type, _registry_error)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = OpenAIHTTPError(400, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")
    return JSONResponse(err.body(), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = OpenAIHTTPError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


@dataclass(frozen=True)
class RouterSpec:
    """The ingress's settings (derived from AppArgs by `serve.app.app_specs`)."""

    model_dir: str
    base_model_id: str
    max_model_len: int
    redis_url: str | None
    data_dir: str
    namespace: str = DEFAULT_NAMESPACE
    predictor: str = "task_quantile"
    predictor_max_batch: int = 16
    default_slo_s: float | None = None
    auth_cache_s: float = 5.0
    registry_refresh_s: float = 30.0
    registry_seed: RegistrySeed | None = None  # keys and manifest tasks registered at start
    max_request_bytes: int = 2 << 20
    sse_keepalive_s: float = 15.0
    max_json_depth: int = 64
    metrics_need_admin_key: bool = True
    max_lora_rank: int = 16  # what the replicas' banks hold: the runtime adapter endpoint's rank limit
    chat_template: str | None = None  # Jinja text replacing the model's chat template


def _log_observe_failure(done: Future) -> None:
    if done.exception() is not None:
        log.error("length predictor failed to learn from a finished request", exc_info=done.exception())


def _tool_call_parsing(req: Any) -> ToolCallParsing | None:
    """How calls are read back from a chat answer that may make them (None: it may not)."""
    if not (isinstance(req, ChatCompletionRequest) and req.calls_tools):
        return None
    return ToolCallParsing(frozenset(t.function.name for t in req.tools), parallel=req.parallel_tool_calls,
                           finish_reason="stop" if req.named_tool_choice else "tool_calls")


async def _list_response(rows: Callable[[], list[dict[str, Any]]]) -> Response:
    """An OpenAI list object of `rows()`, built and serialised off the event loop: 10,000 entries
    take tens of ms, and FastAPI's own encoder would take longer, on the loop."""
    body = await asyncio.to_thread(lambda: json.dumps({"object": "list", "data": rows()}).encode())
    return Response(body, media_type="application/json")


def _probe_avoid(caller: Caller, request: Request) -> tuple[str, ...]:
    """The replica ids an admin probe asks the request router to pass over."""
    if not (caller.admin and request.headers.get(PROBE_HEADER) == "1"):
        return ()
    return tuple(r.strip() for r in request.headers.get(PROBE_AVOID_HEADER, "").split(",") if r.strip())


def _validated_body(model: type[BaseModel], body: Any) -> Any:
    """An admin route's JSON body as `model` (unknown fields refused); 400 naming the field."""
    if not isinstance(body, dict):
        raise OpenAIHTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _validate(model: type[CompletionRequest] | type[ChatCompletionRequest], body: Any) -> Any:
    if not isinstance(body, dict):
        raise OpenAIHTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    name = unsupported_field(body)
    if name is not None:
        raise OpenAIHTTPError(400, f"{name} is not supported by this server; leave it unset or at its default",
                              code="unsupported_parameter", param=name)
    body = {k: v for k, v in body.items() if k not in UNSUPPORTED_FIELDS}  # what is left of them is "off"
    return _validated_body(model, body)


@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    """Ingress deployment; one instance per ingress replica."""

    def __init__(self, replica: DeploymentHandle, spec: RouterSpec) -> None:
        self._replica = replica
        self._spec = spec
        self._tokenizer = load_tokenizer(spec.model_dir)
        if spec.chat_template is not None:
            self._tokenizer.chat_template = spec.chat_template
        self._model_config = ModelConfig.from_dir(spec.model_dir)
        self._vocab_size = self._model_config.vocab_size
        self._redis = connect_redis(spec.redis_url, spec.data_dir)
        self._registry = TaskRegistry(self._redis, spec.namespace)
        if spec.registry_seed is not None:
            tasks = seed_registry(self._registry, spec.registry_seed)
            log.info("registry seeded: tasks %s live", tasks)
        self._watcher = RegistryWatcher(self._registry, refresh_interval_s=spec.registry_refresh_s,
                                        supervise=True).start()
        self._auth = Authenticator(self._registry, spec.auth_cache_s)
        self._predictor = make_predictor(spec.predictor)
        # A blocking predictor (MiniLM) is neither thread-safe nor allowed on the loop: one worker,
        # which predicts the requests that wait for it together.
        self._batcher = PredictionBatcher(self._predictor, spec.predictor_max_batch) if self._predictor.blocking else None
        # Tokenizing a long prompt takes seconds: never on the event loop (/health must answer meanwhile).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inlaid-tokenizer")
        self._metrics = ServeMetrics(spec.base_model_id)
        self._app_name = serve.get_replica_context().app_name
        self._replicas_ready = False

    def __del__(self) -> None:
        """Serve calls this when the replica stops: end the watcher, release the Redis lease."""
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.stop()
        redis_client = getattr(self, "_redis", None)
        if redis_client is not None:
            redis_client.close()
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.shutdown()

    # ---- service routes --------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        """200 once an engine replica has answered (the proxy may route here before replicas run)."""
        if not self._replicas_ready:
            try:
                await asyncio.wait_for(self._replica.stats.remote(), timeout=HEALTH_PROBE_S)
            except Exception as exc:  # noqa: BLE001 - not ready yet, whatever the reason
                raise OpenAIHTTPError(503, f"engine replicas are not ready: {type(exc).__name__}",
                                      code="not_ready", err_type="server_error") from None
            self._replicas_ready = True  # from now on Serve's own health checks replace replicas
        registry = "ok" if self._watcher.connected else "unavailable"  # serving goes on from the last known state
        return {"status": "ok" if registry == "ok" else "degraded", "registry": registry,
                "registry_revision": self._watcher.revision}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition; admin key only by default, since series are labelled with task
        names (scrape with `authorization: {credentials: <admin key>}`)."""
        if self._spec.metrics_need_admin_key:
            await self._admin(request)
        self._take_published_stats()
        await self._forget_stopped_replicas()
        return Response(self._metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        caller = await self._caller(request)
        return await _list_response(
            lambda: [self._model_entry(None)] + [self._model_entry(t) for t in visible_tasks(caller, self._watcher)])

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model (the SDK's models.retrieve); 404 exactly as a request naming it would get."""
        caller = await self._caller(request)
        return self._model_entry(resolve_model(model_id, caller, self._watcher, self._spec.base_model_id))

    def _model_entry(self, task: TaskRecord | None) -> dict[str, Any]:
        base = self._spec.base_model_id
        if task is None:
            return {"id": base, "object": "model", "created": 0, "owned_by": "inlaid-ray", "root": base, "parent": None}
        return {"id": task.name, "object": "model", "created": int(task.created_at), "owned_by": task.tenant,
                "root": base, "parent": base}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    # ---- admin routes ----------------------------------------------------------------------

    @api.get("/v1/admin/tasks")
    async def admin_tasks(self, request: Request) -> Response:
        """Every task (query: `tenant=T`, `status=S` repeatable), as `inlaid-ray tasks list`, from
        the router's copy of the registry (current to the last event; the last known state while
        the registry is away), so a listing of 10,000 tasks costs no Redis scan."""
        await self._admin(request)
        tenant = request.query_params.get("tenant")
        statuses = [v for s in request.query_params.getlist("status") for v in s.split(",") if v] or None
        try:
            return await _list_response(lambda: task_rows(self._watcher.tasks(), tenant, statuses))
        except ValueError as exc:
            raise OpenAIHTTPError(400, str(exc), param="status") from None

    @api.get("/v1/admin/tasks/{name}")
    async def admin_task(self, name: str, request: Request) -> dict[str, Any]:
        """One task's record and its cluster's, as `inlaid-ray tasks show`."""
        await self._admin(request)
        try:
            return await asyncio.to_thread(show_task, self._registry, name)
        except TaskNotFound:
            raise OpenAIHTTPError(404, f"the model {name!r} does not exist", code="model_not_found") from None

    @api.post("/v1/admin/tasks/{name}/retire")
    async def admin_retire(self, name: str, request: Request) -> dict[str, Any]:
        """Retire a task, as `inlaid-ray tasks retire`: 404 for new requests, requests in flight finish."""
        await self._admin(request)
        return await self._retire(name)

    async def _retire(self, name: str, param: str | None = None) -> dict[str, Any]:
        """Retire a task and wait until this router's cache has applied it."""
        try:
            result = await asyncio.to_thread(retire_task, self._registry, name)
        except TaskNotFound:
            raise OpenAIHTTPError(404, f"the model {name!r} does not exist", code="model_not_found",
                                  param=param) from None

        def applied(w: RegistryWatcher) -> bool:
            task = w.get_task(name)
            return task is None or task.status == "retired"

        await asyncio.to_thread(self._watcher.wait_for, applied, RETIRE_WAIT_S)
        return result

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's runtime adapter load (admin key; serve/runtime_adapters.py); answers once this
        router serves it."""
        await self._admin(request)
        req = _validated_body(LoadLoRAAdapterRequest, await self._json_body(request))
        limits = AdapterLimits(max_rank=self._spec.max_lora_rank)
        record = await asyncio.to_thread(load_adapter, self._registry, req, self._model_config, limits,
                                         self._spec.base_model_id, self._spec.model_dir)

        def applied(w: RegistryWatcher) -> bool:
            task = w.get_task(record.name)
            return task is not None and task.status == "live" and task.version == record.version

        await asyncio.to_thread(self._watcher.wait_for, applied, RETIRE_WAIT_S)
        return PlainTextResponse(f"Success: LoRA adapter '{record.name}' added successfully.")

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's runtime adapter unload (admin key): the task is retired, requests in flight finish."""
        await self._admin(request)
        req = _validated_body(UnloadLoRAAdapterRequest, await self._json_body(request))
        await self._retire(req.lora_name, param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @api.post("/v1/admin/tenants")
    async def admin_add_tenant(self, request: Request) -> dict[str, Any]:
        """Body {"tenant": name}: create the tenant (if new) and return a fresh API key for it."""
        name = await self._admin_tenant_body(request)
        key = new_api_key()
        try:
            await asyncio.to_thread(self._registry.add_tenant, name)
            await asyncio.to_thread(self._registry.add_api_key, name, key, "admin-api")
        except ValueError as exc:
            raise OpenAIHTTPError(400, str(exc), param="tenant") from None
        return {"tenant": name, "api_key": key}

    @api.get("/v1/admin/keys")
    async def admin_keys(self, request: Request) -> dict[str, Any]:
        """Registered keys by hash, tenant and label (?tenant= filters); never the keys."""
        await self._admin(request)
        rows = await asyncio.to_thread(self._registry.list_api_keys, request.query_params.get("tenant"))
        return {"object": "list", "data": rows}

    @api.post("/v1/admin/keys")
    async def admin_create_key(self, request: Request) -> dict[str, Any]:
        """Body {"tenant": name}: a new API key for an existing tenant (rotation: create, then revoke
        the old one); the key is shown once."""
        name = await self._admin_tenant_body(request)
        if await asyncio.to_thread(self._registry.get_tenant, name) is None:
            raise OpenAIHTTPError(404, f"the tenant {name!r} does not exist", code="tenant_not_found", param="tenant")
        key = new_api_key()
        digest = await asyncio.to_thread(self._registry.add_api_key, name, key, "admin-api")
        return {"tenant": name, "api_key": key, "key_hash": digest}

    @api.delete("/v1/admin/keys/{key_hash}")
    async def admin_revoke_key(self, key_hash: str, request: Request) -> dict[str, Any]:
        """Revoke a key by its hash; it stops working within auth_cache_s."""
        await self._admin(request)
        if not await asyncio.to_thread(self._registry.revoke_key_hash, key_hash):
            raise OpenAIHTTPError(404, "no API key has this hash", code="key_not_found", param="key_hash")
        return {"key_hash": key_hash, "revoked": True}

    async def _admin_tenant_body(self, request: Request) -> str:
        """The tenant named by an admin request's body {"tenant": name}."""
        await self._admin(request)
        return _validated_body(TenantRequest, await self._json_body(request)).tenant

    @api.get("/v1/admin/replicas")
    async def admin_replicas(self, request: Request) -> dict[str, Any]:
        """The newest routing stats of each replica: from Serve's periodic broadcast, or from a
        finished request's last chunk (`ServeMetrics.replica_stats`)."""
        await self._admin(request)
        self._take_published_stats()
        await self._forget_stopped_replicas()
        stats = self._metrics.replica_stats
        return {"object": "list", "data": [stats[r] for r in sorted(stats)]}

    def _take_published_stats(self) -> None:
        """Engine gauges and replica stats from the routing stats Serve last broadcast to this
        process (about every routing_stats_period_s), where newer than a finished request's."""
        # Imported here: Serve ships this class by value (the ingress decorator makes it a new
        # class), so a module-level name would be a pickled copy of the board, not this process's.
        from inlaid_ray.serve.routing_stats_board import ROUTING_STATS

        for replica, stats in (ROUTING_STATS.read(self._app_name, ENGINE_DEPLOYMENT) or {}).items():
            self._metrics.record_replica_stats(replica, stats)

    async def _forget_stopped_replicas(self) -> None:
        """Drop the stats and gauges of engine replicas that no longer run (killed, scaled down).
        Best effort: a scrape never fails because Ray's control store did not answer."""
        known = set(self._metrics.replica_stats)
        if not known:
            return
        try:
            live = await asyncio.wait_for(asyncio.to_thread(live_replica_ids, self._app_name, ENGINE_DEPLOYMENT),
                                          timeout=LIVENESS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - keep the last stats; the next scrape tries again
            log.warning("could not list live engine replicas: %r", exc)
            return
        for replica in known - live:
            self._metrics.forget_replica(replica)

    # ---- generation ------------------------------------------------------------------------

    async def _json_body(self, request: Request) -> Any:
        return await read_json_body(request, self._spec.max_request_bytes, self._spec.max_json_depth)

    async def _caller(self, request: Request) -> Caller:
        try:
            return await self._auth.authenticate(request.headers.get("authorization"))
        except OpenAIHTTPError as err:
            self._metrics.errors.labels(str(err.status)).inc()
            raise

    def _resolve(self, model: str, caller: Caller, request: Request) -> TaskRecord | None:
        """The task `model` names for this caller; an admin probe may also use a staged onboarding task."""
        if caller.admin and request.headers.get(PROBE_HEADER) == "1":
            task = self._watcher.get_task(model)
            if task is not None and task.status == "onboarding" and task.cluster is not None:
                return task
        return resolve_model(model, caller, self._watcher, self._spec.base_model_id)

    async def _admin(self, request: Request) -> Caller:
        caller = await self._caller(request)
        if not caller.admin:
            raise OpenAIHTTPError(403, "this route needs an admin API key", code="admin_required")
        return caller

    async def _generate(self, request: Request, kind: Literal["completion", "chat"]) -> Response:
        arrival = time.perf_counter()
        try:
            caller = await self._auth.authenticate(request.headers.get("authorization"))
            req = _validate(CompletionRequest if kind == "completion" else ChatCompletionRequest,
                            await self._json_body(request))
            task = self._resolve(req.model, caller, request)
            loop = asyncio.get_running_loop()
            tokenize_start = time.perf_counter()
            if kind == "completion":
                prepared = await loop.run_in_executor(self._tokenize_pool, prepare_completion, req, self._tokenizer,
                                                      self._vocab_size, self._spec.max_model_len)
            else:
                prepared = await loop.run_in_executor(self._tokenize_pool, prepare_chat, req, self._tokenizer,
                                                      self._vocab_size, self._spec.max_model_len)
            ctx = await self._context(kind, req, task, prepared, arrival, time.perf_counter() - tokenize_start)
            cluster = cluster_spec_for(task, self._watcher) if task is not None else None
            handle = self._replica.options(stream=True, multiplexed_model_id=cluster.cluster_id if cluster else "")
            params = prepared.params
            if req.num_candidates > req.n and params.logprobs is None:  # best_of ranks by log-probability
                params = dataclasses.replace(params, logprobs=0)
            replica_req = ReplicaRequest(ctx.request_id, prepared.prompt_token_ids, params, task.name if task else None,
                                         cluster, ctx.predicted_len, _probe_avoid(caller, request),
                                         num_choices=req.num_candidates)
            stream, first = await self._open(handle, replica_req)
        except OpenAIHTTPError as err:
            self._metrics.errors.labels(str(err.status)).inc()
            raise
        streams, choices, headers = self._choices(ctx, req.num_candidates, stream, first)
        if req.stream:
            return StreamingResponse(self._sse(choices, streams), media_type="text/event-stream", headers=headers)
        for attempt in range(1 + REPLICA_RETRIES):
            try:
                body = await collect(choices, req.n)
                break
            except OpenAIHTTPError as exc:
                streams.cancel()
                if exc.code != REPLICA_UNAVAILABLE or attempt == REPLICA_RETRIES:
                    self._fail(choices, exc)
                    raise
            except BaseException as exc:
                streams.cancel()
                self._fail(choices, exc)
                raise
            # A non-streaming client has received nothing yet: its replica failed mid-generation,
            # so the whole request runs again, under a new engine id (an "unavailable" replica may
            # still run the first copy). Only the failed attempt's inter-token latencies stay recorded.
            log.warning("request %s: replica failed mid-generation, running it again", replica_req.request_id)
            replica_req = dataclasses.replace(replica_req, request_id=f"{ctx.request_id}-retry{attempt + 1}")
            try:
                stream, first = await self._open(handle, replica_req)
            except BaseException as err:
                self._fail(choices, err)
                raise
            streams, choices, headers = self._choices(ctx, req.num_candidates, stream, first)
        for choice in choices:
            choice.tracker.finish()
        headers[SERVER_TIMING_HEADER] = server_timing(ctx, [choice.tracker for choice in choices])
        return JSONResponse(body, headers=headers)

    def _choices(self, ctx: ResponseContext, num_candidates: int, stream: Any,
                 first: dict[str, Any]) -> tuple[ChoiceStreams, list[Choice], dict[str, str]]:
        """One generation's per-choice streams and trackers, and the response headers naming its replica."""
        streams = ChoiceStreams(first, stream, num_candidates)
        choices = [Choice(streams.choice(i), StreamTracker(ctx, self._metrics, self._on_finished))
                   for i in range(num_candidates)]
        headers = {REPLICA_HEADER: str(first.get("replica", ""))}
        if first.get("base_version") is not None:
            headers[BASE_VERSION_HEADER] = str(first["base_version"])
        return streams, choices, headers

    def _fail(self, choices: list[Choice], exc: BaseException) -> None:
        """Record a non-streaming request's failure once."""
        for choice in choices:
            choice.tracker.finish(failed=True)
        if isinstance(exc, OpenAIHTTPError):
            self._metrics.errors.labels(str(exc.status)).inc()

    async def _open(self, handle: Any, replica_req: ReplicaRequest) -> tuple[Any, dict[str, Any]]:
        """Start one generation on a replica: (its stream, its first chunk), re-sent while nothing has streamed."""
        for attempt in range(1 + REPLICA_RETRIES):
            base = self._watcher.base_version
            stream = handle.generate.remote(replica_req, BaseRef(base.version, base.uri) if base is not None else None)
            try:
                return stream, await next_chunk(stream)
            except OpenAIHTTPError as err:
                stream.cancel()
                # Nothing has streamed yet: a replica that died (or is restarting) costs the
                # client nothing; Serve routes the retry to a live replica. (A replica that was
                # only unreachable may still finish the first copy: the client gets one answer.)
                if err.code != REPLICA_UNAVAILABLE or attempt == REPLICA_RETRIES:
                    raise
                log.warning("request %s: replica unavailable before its first token, retrying", replica_req.request_id)
                await asyncio.sleep(REPLICA_RETRY_BACKOFF_S * (attempt + 1))
            except BaseException:
                stream.cancel()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _sse(self, choices: list[Choice], streams: ChoiceStreams):
        try:
            async for event in with_keepalive(sse_events(choices), self._spec.sse_keepalive_s):
                yield event
        finally:  # the client went away, or a choice failed: stop whatever still generates (no-op when done)
            streams.cancel()

    async def _context(self, kind: Literal["completion", "chat"], req: Any, task: TaskRecord | None,
                       prepared: PreparedPrompt, arrival: float, tokenize_s: float) -> ResponseContext:
        extra = task.extra if task is not None else {}
        prior = extra.get("expected_output_tokens")
        name = task.name if task is not None else None
        predict_start = time.perf_counter()
        if self._batcher is not None:
            predicted = await self._batcher.predict(name, prepared.prompt_text, prior, prepared.params.max_tokens)
        else:
            predict = functools.partial(self._predictor.predict, name, prepared.prompt_text, prior)
            predicted = bounded_prediction(predict, prepared.params.max_tokens, name)
        return ResponseContext(
            kind=kind, request_id=new_id("cmpl" if kind == "completion" else "chatcmpl"), model=req.model, task=name,
            prompt_text=prepared.prompt_text, prompt_token_ids=prepared.prompt_token_ids, predicted_len=predicted,
            slo_s=extra.get("slo_s", self._spec.default_slo_s), include_usage=req.include_usage_in_stream,
            return_token_ids=req.return_token_ids,
            token_text=self._token_text if req.engine_logprobs is not None else None,
            echo_text=prepared.prompt_text if isinstance(req, CompletionRequest) and req.echo else "",
            tool_calls=_tool_call_parsing(req), arrival=arrival, tokenize_s=tokenize_s,
            predict_s=time.perf_counter() - predict_start,
        )

    def _token_text(self, token_id: int) -> str:
        """One token's text as OpenAI's logprobs show it."""
        return self._tokenizer.decode([token_id])

    def _on_finished(self, ctx: ResponseContext, tracker: StreamTracker) -> None:
        # (the tracker already gave the replica's stats to the metrics, which own them)
        if tracker.completion_tokens < 1:
            return
        if self._batcher is not None:
            done = self._batcher.observe(ctx.task, ctx.prompt_text, tracker.completion_tokens)
            done.add_done_callback(_log_observe_failure)  # the pool would keep the exception to itself
        else:
            self._predictor.observe(ctx.task, ctx.prompt_text, tracker.completion_tokens)
