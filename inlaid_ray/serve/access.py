"""Who is calling, which models they may use, and what a task resolves to (its cluster).

API keys map to tenants through the registry (stored hashed); a successful lookup is cached
for `cache_s` seconds (so revoking a key takes effect within that time), failures are never
cached (a key created a moment ago works at once). While the registry is unreachable, a key
seen before keeps its last known principal (serving goes on; a revocation waits for the
registry), and an unknown key gets a 503 `registry_unavailable` (it cannot be checked). A failed
lookup costs seconds (the Redis client's retries), so after one the registry is not asked again
for `cache_s`: requests meanwhile answer from the cache at once. Task lookups read the registry watcher's
local cache, never Redis. Tenancy: a tenant sees and uses only its own live tasks; an admin
uses every task. Another tenant's task, and a task that is not live, answer 404 exactly like a
missing one (a 403 would confirm that the name exists).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.security.utils import get_authorization_scheme_param

from inlaid_ray.registry import RegistryWatcher, TaskRecord, TaskRegistry, hash_api_key
from inlaid_ray.serve.http_errors import REGISTRY_ERRORS, OpenAIHTTPError, registry_unavailable
from inlaid_ray.serve.replica_protocol import AdapterEntry, ClusterSpec, solo_cluster_id


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """An authenticated API key's principal."""

    tenant: str
    admin: bool = False

    def may_use(self, task: TaskRecord) -> bool:
        return self.admin or task.tenant == self.tenant


class Authenticator:
    """`Authorization: Bearer <key>` -> Caller, or 401."""

    def __init__(self, registry: TaskRegistry, cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry, self.cache_s, self.clock = registry, cache_s, clock
        self._cache: dict[str, tuple[Caller, float]] = {}  # sha256(key) -> (caller, expiry)
        self._unreachable_until = float("-inf")  # after a failed lookup, skip the registry until then

    async def authenticate(self, authorization: str | None) -> Caller:
        key = _bearer(authorization)
        digest = hash_api_key(key)
        hit = self._cache.get(digest)
        now = self.clock()
        if hit is not None and (hit[1] > now or now < self._unreachable_until):
            return hit[0]
        if now < self._unreachable_until:
            raise registry_unavailable()
        try:
            principal = await asyncio.to_thread(self.registry.principal_for_key, key)
        except REGISTRY_ERRORS as exc:
            self._unreachable_until = self.clock() + self.cache_s
            if hit is not None:  # last known state: keep serving this key
                log.warning("registry unreachable (%s); using the last known principal of a key", type(exc).__name__)
                return hit[0]
            raise registry_unavailable() from exc
        if principal is None:
            self._cache.pop(digest, None)
            raise OpenAIHTTPError(401, "invalid API key", code="invalid_api_key")
        caller = Caller(principal.tenant, principal.admin)
        self._cache[digest] = (caller, self.clock() + self.cache_s)
        return caller


def _bearer(authorization: str | None) -> str:
    # FastAPI's own header parsing (what its HTTPBearer uses); not HTTPBearer itself, whose
    # refusals are 403s in FastAPI's shape where OpenAI clients expect a 401 in OpenAI's.
    scheme, key = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not key:
        raise OpenAIHTTPError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    return key


def resolve_model(model: str, caller: Caller, watcher: RegistryWatcher, base_model_id: str) -> TaskRecord | None:
    """The live task `model` names (None for the base model), or a 404 OpenAIHTTPError."""
    if model == base_model_id:
        return None
    if model.startswith(base_model_id + ":"):  # "base:adapter", Ray Serve LLM's form (task names hold no ':')
        model = model[len(base_model_id) + 1:]
    task = watcher.get_task(model)
    if task is None or task.status != "live" or not caller.may_use(task):
        detail = f" (status {task.status})" if task is not None and caller.may_use(task) else ""
        raise OpenAIHTTPError(404, f"the model {model!r} does not exist{detail}", code="model_not_found", param="model")
    return task


def visible_tasks(caller: Caller, watcher: RegistryWatcher) -> list[TaskRecord]:
    """Live tasks the caller may use, sorted by name."""
    return [t for t in watcher.tasks() if t.status == "live" and caller.may_use(t)]


def _entry(task: TaskRecord) -> AdapterEntry:
    return AdapterEntry(task.name, task.adapter_uri, task.version, task.adapter_sha256)


def cluster_spec_for(task: TaskRecord, watcher: RegistryWatcher) -> ClusterSpec:
    """The adapters a replica loads to serve `task`: its cluster's live members (or it alone)."""
    if task.cluster is None:
        return ClusterSpec(solo_cluster_id(task.name), task.version, (_entry(task),))
    cluster = watcher.get_cluster(task.cluster)
    members = {task.name: task}
    for name in cluster.members if cluster is not None else ():
        member = watcher.get_task(name)
        if member is not None and member.status == "live" and member.cluster == task.cluster:
            members[name] = member
    version = cluster.version if cluster is not None else 0
    return ClusterSpec(task.cluster, version, tuple(_entry(members[n]) for n in sorted(members)),
                       format=cluster.format if cluster is not None else "peft",
                       bank_uri=cluster.bank_uri if cluster is not None else "")
