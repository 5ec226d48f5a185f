"""The base model version(s) a replica holds.

Every request carries the base version the registry names (`BaseRef`). When it differs from the replica's, the new base is loaded in the background into
a second engine (own weights and KV cache, the SAME adapter bank, so slots and residency do not
change) while the current engine keeps serving. When it is ready the two swap between steps:
requests that arrive from then on start on the new engine, and each request in flight finishes
on the engine, hence the weights, it started with, because a request is bound to one engine for
its whole life (its KV cache lives there). The old engine is shut down once its last request
ends. A base that fails to load is logged and retried only after `retry_s`; the replica keeps
serving on the base it has, so a bad base version never fails a request. A request for a base
the replica still has draining swaps back to it at once (a rolled-back base version). Until the
registry has named the base a replica started on, requests wait for the named one (`settle`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseRef:
    """A base model version as the registry names it; sent by the router with every request."""

    version: int
    uri: str  # model directory (HF safetensors or GPTQ checkpoint) every replica can read


@dataclass(eq=False)
class EngineSlot:
    """One engine of a replica and the base it runs; `in_flight` counts the requests bound to it."""

    engine: Any  # AsyncLLMEngine
    uri: str
    version: int | None = None  # None until the registry names this base
    in_flight: int = 0
    started: bool = False  # produced an output (its background loop runs)


# (base) -> a ready AsyncLLMEngine on that base sharing the replica's adapter bank; off the loop
EngineLoader = Callable[[BaseRef], Awaitable[Any]]


@functools.lru_cache(maxsize=256)
def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def _same_dir(a: str, b: str) -> bool:
    """Whether two base URIs name one directory (asked on every request, hence the cache)."""
    return a == b or _resolved(a) == _resolved(b)


class BaseResidency:
    """The engines of one replica by base version (see module docstring, "Base versions")."""

    def __init__(self, engine: Any, uri: str, load_engine: EngineLoader, retry_s: float = 30.0) -> None:
        self.current = EngineSlot(engine, uri)
        self.draining: list[EngineSlot] = []
        self._load_engine = load_engine
        self.retry_s = retry_s
        self._wanted: BaseRef | None = None
        self._loader: asyncio.Task[None] | None = None
        self._failed: dict[BaseRef, float] = {}  # base -> monotonic time its load failed
        self.num_swaps = 0
        self.last_load_s: float | None = None

    @property
    def loading(self) -> BaseRef | None:
        return self._wanted if self._loader is not None and not self._loader.done() else None

    def slots(self) -> list[EngineSlot]:
        return [self.current, *self.draining]

    def want(self, ref: BaseRef | None) -> None:
        """The registry names `ref` now: adopt it, swap back to it, or load it in the background."""
        if ref is None:
            return
        self._wanted = ref
        if _same_dir(self.current.uri, ref.uri):
            self.current.version = ref.version
            return
        back = next((s for s in self.draining if _same_dir(s.uri, ref.uri)), None)
        if back is not None:  # a rolled-back version whose engine is still draining: swap back now
            self.draining.remove(back)
            back.version = ref.version
            self._swap_to(back)
            return
        failed_at = self._failed.get(ref)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_s:
            return
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_loop(), name="inlaid-base-load")

    async def settle(self, ref: BaseRef | None, timeout_s: float) -> None:
        """`want(ref)`; and while this replica still runs the base it started on, which the
        registry has never named (after a restart: the unquantized model directory), wait up to
        `timeout_s` for the named base to load, so no request is served by a base the registry
        does not name. Once a version was named, later swaps load in the background as usual."""
        self.want(ref)
        loader = self._loader
        if ref is None or self.current.version is not None or loader is None or loader.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(loader), timeout_s)
        except asyncio.TimeoutError:
            log.warning("base version %d still loading after %.0fs; serving this request on %s",
                        ref.version, timeout_s, self.current.uri)

    def acquire(self) -> EngineSlot:
        """The engine a new request starts on; `release(slot)` exactly once when it ends."""
        self.current.in_flight += 1
        return self.current

    def release(self, slot: EngineSlot) -> None:
        assert slot.in_flight > 0, f"release of the engine on {slot.uri} without a request"
        slot.in_flight -= 1
        self._close_if_drained(slot)

    async def _load_loop(self) -> None:
        while self._wanted is not None and not _same_dir(self.current.uri, self._wanted.uri):
            ref = self._wanted
            started = time.perf_counter()
            try:
                engine = await self._load_engine(ref)
            except Exception:  # noqa: BLE001 - keep serving on the current base; retried after retry_s
                log.exception("loading base version %d from %s failed; still serving %s", ref.version, ref.uri,
                              self.current.uri)
                self._failed[ref] = time.monotonic()
                return
            self.last_load_s = time.perf_counter() - started
            if self._wanted != ref:  # superseded while loading (e.g. rolled back): never used
                await engine.shutdown()
                continue
            self._swap_to(EngineSlot(engine, ref.uri, ref.version))
            log.info("base version %d (%s) loaded in %.1fs and swapped in", ref.version, ref.uri, self.last_load_s)

    def _swap_to(self, slot: EngineSlot) -> None:
        old, self.current = self.current, slot
        self.draining.append(old)
        self.num_swaps += 1
        self._close_if_drained(old)

    def _close_if_drained(self, slot: EngineSlot) -> None:
        if slot is self.current or slot.in_flight or slot not in self.draining:
            return
        self.draining.remove(slot)
        log.info("engine on %s drained; shutting it down", slot.uri)
        asyncio.get_running_loop().create_task(slot.engine.shutdown(), name="inlaid-engine-shutdown")
