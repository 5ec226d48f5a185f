"""Rollout events on the Redis pub/sub channel `<namespace>:events`, as typed records and
their JSON form, plus a subscription that yields decoded events in publish order.

Each event carries the registry revision of the write that produced it. Pub/sub is
fire-and-forget (a disconnected subscriber misses events), so consumers pair it with a
periodic full snapshot and use revisions to merge the two (see `watcher.py`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

import redis

from inlaid_ray.registry.records import BaseVersion, ClusterRecord, TaskRecord, from_dict


@dataclass(frozen=True)
class TaskAdded:
    """A task went live (onboarding committed)."""

    type: ClassVar[str] = "task_added"
    task: TaskRecord
    revision: int


@dataclass(frozen=True)
class TaskUpdated:
    """A task record changed in any other way (created, transitioned, upserted)."""

    type: ClassVar[str] = "task_updated"
    task: TaskRecord
    revision: int


@dataclass(frozen=True)
class TaskRetired:
    """A task was retired; routers must stop serving it."""

    type: ClassVar[str] = "task_retired"
    task: TaskRecord
    revision: int


@dataclass(frozen=True)
class BaseVersionChanged:
    """A new quantized base version became current."""

    type: ClassVar[str] = "base_version"
    base: BaseVersion
    revision: int


@dataclass(frozen=True)
class ClusterUpdated:
    """A cluster's bank or membership changed."""

    type: ClassVar[str] = "cluster_updated"
    cluster: ClusterRecord
    revision: int


@dataclass(frozen=True)
class ClusterRemoved:
    """An (empty) cluster was deleted."""

    type: ClassVar[str] = "cluster_removed"
    cluster_id: str
    revision: int


Event = Union[TaskAdded, TaskUpdated, TaskRetired, BaseVersionChanged, ClusterUpdated, ClusterRemoved]
EVENT_TYPES: dict[str, type] = {
    cls.type: cls for cls in (TaskAdded, TaskUpdated, TaskRetired, BaseVersionChanged, ClusterUpdated, ClusterRemoved)
}
# Which payload key holds which record type (absent = plain JSON value).
_PAYLOAD_TYPES: dict[str, type] = {"task": TaskRecord, "base": BaseVersion, "cluster": ClusterRecord}


def encode_event(event: Event) -> str:
    """JSON of an event: {"type": ..., "revision": ..., <payload>}."""
    body: dict[str, Any] = {"type": event.type}
    body.update(asdict(event))
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def decode_event(text: str | bytes) -> Event:
    """Inverse of `encode_event`; unknown types or fields raise ValueError."""
    body = json.loads(text)
    kind = body.pop("type", None)
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown registry event type {kind!r} (known: {sorted(EVENT_TYPES)})")
    kwargs = {}
    for key, value in body.items():
        record_cls = _PAYLOAD_TYPES.get(key)
        kwargs[key] = from_dict(record_cls, value) if record_cls is not None else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"malformed {kind!r} event {sorted(body)}: {exc}") from exc


class EventsMissed(redis.ConnectionError):
    """The subscription lost its connection (redis-py reconnected and resubscribed by itself);
    events published in between are gone, so the consumer must re-read the registry."""


class EventSubscription:
    """A live subscription to the events channel; events arrive in publish order.

    `get` raises EventsMissed after a silent reconnect, so a consumer can never skip events
    without noticing; the subscription stays usable after that error."""

    def __init__(self, client: redis.Redis, channel: str, confirm_timeout_s: float = 10.0) -> None:
        self.channel = channel
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(channel)
        # Wait for the server's confirmation so that anything published after this
        # constructor returns is guaranteed to reach us.
        deadline = time.monotonic() + confirm_timeout_s
        while True:
            msg = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "subscribe":
                break
            if time.monotonic() >= deadline:
                self._pubsub.close()
                raise TimeoutError(f"no subscribe confirmation for channel {channel!r} within {confirm_timeout_s}s")

    def get(self, timeout: float | None = 0.0) -> Event | None:
        """Next event, waiting up to `timeout` seconds (None = forever); None if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # redis-py treats timeout=None as "block forever" only when given explicitly.
            msg = self._pubsub.get_message(timeout=remaining if remaining is not None else 3600.0)
            if msg is not None and msg["type"] == "message":
                return decode_event(msg["data"])
            if msg is not None and msg["type"] == "subscribe":
                # Only a reconnect re-sends the confirmation we consumed in __init__.
                raise EventsMissed(f"subscription to {self.channel!r} reconnected; events may have been missed")
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def __iter__(self):
        while True:
            yield self.get(timeout=None)

    def close(self) -> None:
        """Unsubscribe and release the connection."""
        self._pubsub.close()

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
