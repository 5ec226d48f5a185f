"""The one place where failures become HTTP statuses and OpenAI error bodies.

Before a response has started, the router raises `OpenAIHTTPError` and the app's exception
handler turns it into `{"error": {...}}` with the status. Once a stream has started, the same
body travels as an SSE event (docs/style.md rule 19). Replicas never raise across Ray for expected
failures: they yield an error chunk built by `error_chunk`, which carries the same fields.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from ray.exceptions import RayActorError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from inlaid_ray.engine import EngineShutdown
from inlaid_ray.errors import AdapterError, InvalidRequest, ModelLoadError, NoFreeSlot, TaskNotFound
from inlaid_ray.serve.openai_protocol import error_body

log = logging.getLogger(__name__)

REPLICA_UNAVAILABLE = "replica_unavailable"  # the code of a retryable replica failure
RETRY_AFTER_S = 1  # what 503s tell clients (Retry-After): a replica restarts in seconds
# Ray's errors for a replica that died or is restarting. Their messages carry actor
# ids, pids and node addresses, which never reach a client.
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
REGISTRY_UNAVAILABLE = "registry_unavailable"
# The registry (Redis) is unreachable: reads fall back to the last known state, writes fail with a 503.
REGISTRY_ERRORS = (RedisConnectionError, RedisTimeoutError)

# OpenAI's SDK maps statuses to exception classes (400 BadRequest, 401 Authentication,
# 403 PermissionDenied, 404 NotFound, 5xx InternalServer); `type` is informational.
_TYPE_OF_STATUS = {401: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error"}


@dataclass
class OpenAIHTTPError(Exception):
    """An error to answer with `status` and the OpenAI error JSON."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    err_type: str | None = None
    retry_after_s: int | None = None  # sent as Retry-After (503s)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.err_type is None:
            self.err_type = _TYPE_OF_STATUS.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None

    def body(self) -> dict[str, Any]:
        assert self.err_type is not None
        return error_body(self.message, self.err_type, self.code, self.param)

    def to_chunk(self) -> dict[str, Any]:
        """The replica-to-router form (see `error_chunk`)."""
        return {"error": {"status": self.status, "message": self.message, "type": self.err_type,
                          "code": self.code, "param": self.param, "retry_after_s": self.retry_after_s}}

    @classmethod
    def from_chunk(cls, chunk: dict[str, Any]) -> "OpenAIHTTPError":
        e = chunk["error"]
        return cls(int(e["status"]), str(e["message"]), e.get("code"), e.get("param"), e.get("type"),
                   e.get("retry_after_s"))


def from_exception(exc: BaseException) -> OpenAIHTTPError:
    """Map a project exception (or anything else) to its HTTP error."""
    if isinstance(exc, OpenAIHTTPError):
        return exc
    if isinstance(exc, TaskNotFound):
        return OpenAIHTTPError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, InvalidRequest):
        return OpenAIHTTPError(400, str(exc))
    if isinstance(exc, NoFreeSlot):
        return OpenAIHTTPError(503, str(exc), code="no_free_slot", err_type="server_error")
    if isinstance(exc, (AdapterError, ModelLoadError)):
        return OpenAIHTTPError(500, str(exc), code="adapter_error", err_type="server_error")
    if isinstance(exc, EngineShutdown):
        return OpenAIHTTPError(503, str(exc), code="engine_shutdown", err_type="server_error", retry_after_s=RETRY_AFTER_S)
    if isinstance(exc, BackPressureError):  # load shedding: retrying at once would add load
        return OpenAIHTTPError(503, "the service is overloaded; retry shortly", code="overloaded",
                               err_type="server_error", retry_after_s=RETRY_AFTER_S)
    if isinstance(exc, REGISTRY_ERRORS):
        log.warning("registry unavailable: %r", exc)
        return registry_unavailable()
    if isinstance(exc, _REPLICA_GONE):
        log.warning("engine replica unavailable: %r", exc)
        return OpenAIHTTPError(503, "the engine replica serving this request is unavailable; retry shortly",
                               code=REPLICA_UNAVAILABLE, err_type="server_error", retry_after_s=RETRY_AFTER_S)
    reference = uuid.uuid4().hex[:12]  # the client quotes it; the log has the details
    log.error("internal error %s", reference, exc_info=exc)
    return OpenAIHTTPError(500, f"internal error (reference {reference})", code="internal_error", err_type="server_error")


def registry_unavailable() -> OpenAIHTTPError:
    """503 for what needs the registry while it is unreachable (a new key, a write)."""
    return OpenAIHTTPError(503, "the task registry is unavailable; retry shortly", code=REGISTRY_UNAVAILABLE,
                           err_type="server_error", retry_after_s=RETRY_AFTER_S)


def error_chunk(exc: BaseException) -> dict[str, Any]:
    """What a replica yields instead of raising: `{"error": {status, message, type, code, param}}`."""
    return from_exception(exc).to_chunk()


def from_validation_error(exc: ValidationError) -> OpenAIHTTPError:
    """A pydantic error as a 400 naming the first offending field (OpenAI `param`)."""
    errors = exc.errors(include_url=False)
    parts, param = [], None
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
        if param is None and loc:
            param = loc
    return OpenAIHTTPError(400, "; ".join(parts) or "invalid request", param=param)
