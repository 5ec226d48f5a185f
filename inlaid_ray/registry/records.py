"""Value records kept in the registry (tasks, clusters, base versions, tenants) and their JSON
form. Records are frozen; the registry writes new ones with `dataclasses.replace`. JSON is
strict both ways: unknown keys are an error, so a schema drift between writer and reader
fails loudly instead of silently dropping fields on the next rewrite."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args

from inlaid_ray.errors import InvalidRequest

TaskStatus = Literal["onboarding", "live", "failed", "retired"]
TASK_STATUSES: tuple[str, ...] = get_args(TaskStatus)
# Statuses a task can leave for `retired`; `retired` itself is terminal for retire().
ACTIVE_STATUSES: tuple[str, ...] = ("onboarding", "live", "failed")

# Names travel in URLs, Redis hash fields, file paths and Ray multiplexed model ids.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid task/tenant/cluster name, else raise InvalidRequest (a ValueError)."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidRequest(f"invalid {kind} name {value!r}: use 1-128 of [A-Za-z0-9._-], starting alphanumeric")
    return value


# Task names a request's `model` field must never resolve to: words of the API's own routes.
RESERVED_TASK_NAMES = frozenset({"admin", "default", "health", "metrics", "models", "v1"})


def check_task_name(value: str, reserved: tuple[str, ...] = ()) -> str:
    """`check_name` for a task, also refusing RESERVED_TASK_NAMES and `reserved` (the served base
    model id: a task of that name would never be reachable), compared case-insensitively."""
    check_name("task", value)
    if value.lower() in RESERVED_TASK_NAMES | {r.lower() for r in reserved}:
        raise InvalidRequest(f"the task name {value!r} is reserved (the base model id or a word of the API)")
    return value


@dataclass(frozen=True)
class TaskRecord:
    """One task (a LoRA adapter) as the registry knows it."""

    name: str
    tenant: str
    adapter_uri: str
    base_model: str = ""
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    cluster: str | None = None  # cluster id whose bank holds the compressed adapter
    version: int = 1  # adapter version, bumped by each (re-)onboarding
    status: TaskStatus = "onboarding"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    adapter_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    revision: int = 0  # registry revision of the last write; set by the registry

    def __post_init__(self) -> None:
        check_name("task", self.name)
        check_name("tenant", self.tenant)
        if self.cluster is not None:
            check_name("cluster", self.cluster)
        if self.status not in TASK_STATUSES:
            raise ValueError(f"task {self.name!r}: status {self.status!r} not in {TASK_STATUSES}")
        if self.rank < 0 or self.version < 0:
            raise ValueError(f"task {self.name!r}: rank={self.rank} and version={self.version} must be >= 0")
        # JSON gives lists; keep the record hashable-ish and immutable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


CLUSTER_FORMATS = ("peft", "jd_bank")


@dataclass(frozen=True)
class ClusterRecord:
    """A cluster of tasks sharing one compressed bank (shared U, V; per-task Sigma)."""

    cluster_id: str
    bank_uri: str = ""
    version: int = 1  # bank version; a commit must move it forward
    members: tuple[str, ...] = ()
    updated_at: float = field(default_factory=time.time)
    revision: int = 0
    # How replicas serve it: "peft" = each member's raw adapter; "jd_bank" = the compressed bank
    # at `bank_uri` (members missing from it, or every member while bank_uri is "", are served raw).
    format: str = "peft"

    def __post_init__(self) -> None:
        check_name("cluster", self.cluster_id)
        object.__setattr__(self, "members", tuple(sorted(set(self.members))))
        if self.format not in CLUSTER_FORMATS:
            raise ValueError(f"cluster {self.cluster_id!r}: format {self.format!r} is not one of {CLUSTER_FORMATS}")


@dataclass(frozen=True)
class BaseVersion:
    """One quantized base model version (MLGPTQ output) stored in the artifact store."""

    version: int
    uri: str
    quant_method: str = "mlgptq"
    created_at: float = field(default_factory=time.time)
    revision: int = 0

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"base version must be >= 0, got {self.version}")


@dataclass(frozen=True)
class Tenant:
    """A tenant owns tasks; an admin tenant may act on every task."""

    name: str
    admin: bool = False
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        check_name("tenant", self.name)


@dataclass(frozen=True)
class Principal:
    """Who an API key authenticates as (stored under the key's sha256, never the key)."""

    tenant: str
    admin: bool = False
    label: str = ""
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ServiceLocation:
    """Where a running `inlaid-ray serve` answers, recorded for the onboarding job: the URL its
    probe calls, and the Ray dashboard that `inlaid-ray onboard --submit` sends the job to."""

    url: str  # base URL of the OpenAI API, as reachable from the serving host
    ray_dashboard: str | None = None  # job submission address; None when Ray runs without a dashboard
    pid: int = 0  # the serving process ...
    host: str = ""  # ... on this host (socket.gethostname()), so a record left by a crash is recognised there
    started_at: float = field(default_factory=time.time)


Record = TypeVar("Record", TaskRecord, ClusterRecord, BaseVersion, Tenant, Principal, ServiceLocation)


def to_json(record: TaskRecord | ClusterRecord | BaseVersion | Tenant | Principal | ServiceLocation) -> str:
    """Compact, key-sorted JSON of a record (stable bytes for equal records)."""
    return json.dumps(asdict(record), sort_keys=True, separators=(",", ":"))


def from_dict(cls: type[Record], data: dict[str, Any]) -> Record:
    """Build `cls` from a decoded JSON object; unknown keys raise ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown} (known: {sorted(known)})")
    return cls(**data)


def from_json(cls: type[Record], text: str | bytes) -> Record:
    """Inverse of `to_json`."""
    return from_dict(cls, json.loads(text))
