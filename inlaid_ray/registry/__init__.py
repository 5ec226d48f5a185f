"""Redis task registry: task/cluster/base-version records, tenants and API keys, atomic
onboarding commits, rollout events on `<namespace>:events`, a local watcher cache, and
`connect_redis` (REDIS_URL or a shared embedded redis-server)."""

from inlaid_ray.registry.embedded import EmbeddedRedis, connect_redis
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
    decode_event,
    encode_event,
)
from inlaid_ray.registry.records import (
    ACTIVE_STATUSES,
    TASK_STATUSES,
    BaseVersion,
    ClusterRecord,
    Principal,
    ServiceLocation,
    TaskRecord,
    TaskStatus,
    Tenant,
)
from inlaid_ray.registry.rollout import (
    Staged,
    activate_onboarding,
    fail_stale_onboarding,
    heartbeat_onboarding,
    rollback_onboarding,
    stage_onboarding,
)
from inlaid_ray.registry.store import Snapshot, TaskRegistry
from inlaid_ray.registry.task_views import list_tasks, retire_task, show_task, task_detail, task_row, task_rows
from inlaid_ray.registry.tenants import hash_api_key, new_api_key
from inlaid_ray.registry.watcher import RegistryWatcher

__all__ = [
    "ACTIVE_STATUSES",
    "TASK_STATUSES",
    "BaseVersion",
    "BaseVersionChanged",
    "ClusterRecord",
    "ClusterRemoved",
    "ClusterUpdated",
    "EmbeddedRedis",
    "Event",
    "EventsMissed",
    "EventSubscription",
    "Principal",
    "RegistryWatcher",
    "ServiceLocation",
    "Snapshot",
    "Staged",
    "TaskAdded",
    "TaskRecord",
    "TaskRegistry",
    "TaskRetired",
    "TaskStatus",
    "TaskUpdated",
    "Tenant",
    "activate_onboarding",
    "connect_redis",
    "decode_event",
    "encode_event",
    "fail_stale_onboarding",
    "hash_api_key",
    "heartbeat_onboarding",
    "list_tasks",
    "new_api_key",
    "retire_task",
    "rollback_onboarding",
    "show_task",
    "stage_onboarding",
    "task_detail",
    "task_row",
    "task_rows",
]
