"""Optimistic Redis transactions for the registry: WATCH one revision key, read in immediate
mode, decide a `Plan`, then MULTI/EXEC the plan's writes together with `rev := rev + 1` and
the PUBLISH of its events. A concurrent writer bumps the revision, so our EXEC aborts
(WatchError) and the body runs again from fresh reads. Redis does not roll back a command
that fails inside EXEC, so bodies do every check (existence, status, versions) before
returning a plan; the EXEC then contains only writes that cannot fail."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis

from inlaid_ray.registry.events import Event, encode_event

log = logging.getLogger(__name__)
T = TypeVar("T")


def text(value: bytes | str) -> str:
    """Values come back as bytes unless the client was built with decode_responses=True."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Plan(Generic[T]):
    """What a transaction body decided: the result, and the writes/events to apply."""

    result: T
    hset: list[tuple[str, str, str]] = field(default_factory=list)  # (key, field, json)
    hdel: list[tuple[str, str]] = field(default_factory=list)
    set: list[tuple[str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # plain keys to remove (e.g. the current base version)

    @property
    def writes(self) -> bool:
        return bool(self.hset or self.hdel or self.set or self.delete)


def run_transaction(client: redis.Redis, rev_key: str, channel: str, op: str,
                    body: Callable[[redis.client.Pipeline, int], Plan[T]], max_attempts: int,
                    before_exec: Callable[[str], None] = lambda op: None) -> T:
    """Run `body(pipe, next_revision)` until its plan commits atomically; returns its result.

    A plan without writes returns at once (nothing to commit). `before_exec(op)` runs between
    the reads and EXEC (a seam for fault injection). Raises WatchError after `max_attempts`
    conflicting attempts; exceptions from `body` propagate with nothing written."""
    for attempt in range(max_attempts):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(rev_key)
                rev = int(text(pipe.get(rev_key) or "0")) + 1
                plan = body(pipe, rev)
                if not plan.writes:
                    return plan.result
                before_exec(op)
                pipe.multi()
                pipe.set(rev_key, rev)
                for key, fld, value in plan.hset:
                    pipe.hset(key, fld, value)
                for key, fld in plan.hdel:
                    pipe.hdel(key, fld)
                for key, value in plan.set:
                    pipe.set(key, value)
                for key in plan.delete:
                    pipe.delete(key)
                for event in plan.events:
                    pipe.publish(channel, encode_event(event))
                pipe.execute()
                return plan.result
            except redis.WatchError:
                log.debug("registry %s: concurrent write, retry %d", op, attempt + 1)
    raise redis.WatchError(f"registry {op}: still conflicting after {max_attempts} attempts")
