"""Streaming front of `LLMEngine` for asyncio servers (vLLM's AsyncLLMEngine pattern).

A background task owns the engine: it applies queued adds and aborts between steps and
runs each `step()` in one worker thread, so the event loop keeps serving while the model
computes and the engine is never touched by two threads at once. Each `generate()` call
is an async iterator of `RequestOutput` deltas ending with one that carries
`finish_reason`. A step that raises fails the requests in flight with that exception
(their streams re-raise it) and the loop goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from inlaid_ray.engine.config import EngineStats
from inlaid_ray.engine.engine import LLMEngine
from inlaid_ray.engine.request import Request, RequestOutput, SamplingParams
from inlaid_ray.errors import InvalidRequest

log = logging.getLogger(__name__)

_StreamItem = RequestOutput | BaseException


class EngineShutdown(RuntimeError):
    """The engine was shut down while the request was in flight."""


class AsyncLLMEngine:
    """Runs an `LLMEngine` in the background of an asyncio loop and streams its outputs."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[_StreamItem]] = {}
        self._pending_adds: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inlaid-engine")
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        task: str | None = None,
        request_id: str | None = None,
        predicted_output_len: float | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's deltas; bad input raises (InvalidRequest, TaskNotFound) on first iteration.

        Leaving the iteration early (break, cancel, error) aborts the request.
        """
        if self._closed:
            raise EngineShutdown("the engine is shut down")
        if request_id is not None and (request_id in self._streams):
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        req = self.engine.make_request(
            prompt_token_ids, params, task, request_id, predicted_output_len, arrival_time
        )
        rid = req.request_id
        queue: asyncio.Queue[_StreamItem] = asyncio.Queue()
        self._streams[rid] = queue
        self._pending_adds[rid] = req
        self._start()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._request_abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" (no-op if unknown)."""
        self._request_abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Finish the current step, end every open stream with EngineShutdown, stop the worker."""
        self._closed = True
        if self._loop_task is not None:
            self._wake()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        exc = EngineShutdown("the engine was shut down while this request was in flight")
        self._pending_adds.clear()
        self._pending_aborts.clear()
        self.engine.abort_all()
        for queue in self._streams.values():
            queue.put_nowait(exc)
        self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------- internals
    def _start(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="inlaid-engine-loop")
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _request_abort(self, request_id: str) -> None:
        self._pending_aborts.add(request_id)
        self._wake()

    async def _run(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            # The event loop is going away; a step may still run in the worker, so leave the engine alone.
            self._closed = True
            self._fail_streams(list(self._streams), EngineShutdown("the engine loop was cancelled"))
            raise
        except BaseException as exc:  # a bug in the loop itself: no stream may hang on it
            log.exception("engine loop crashed; failing %d open streams", len(self._streams))
            self._fail(list(self._streams), exc)
            self._pending_adds.clear()
            raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while not self._closed:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                if not (self._pending_adds or self._pending_aborts or self._closed):
                    await self._wakeup.wait()
                continue
            in_flight = [rid for rid in self._streams if rid not in self._pending_adds]
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:  # noqa: BLE001 - delivered to the streams, then the loop goes on
                log.exception("engine step failed; failing %d requests in flight", len(in_flight))
                self._fail(in_flight, exc)
                continue
            for out in outputs:
                self._deliver(out)
            if not outputs:
                await asyncio.sleep(0.001)  # nothing schedulable: let adds/aborts arrive

    def _apply_pending(self) -> None:
        """Queue new requests and apply aborts; only between steps, on the loop's thread."""
        adds, self._pending_adds = self._pending_adds, {}
        aborts, self._pending_aborts = self._pending_aborts, set()
        for rid, req in adds.items():
            if rid in aborts:
                continue
            try:
                self.engine.add(req)
            except Exception as exc:  # noqa: BLE001 - e.g. an id reused meanwhile
                self._deliver_error(rid, exc)
        for rid in aborts:
            out = self.engine.abort(rid)
            if out is None and rid in adds:
                req = adds[rid]
                out = RequestOutput(rid, "", (), True, "abort", req.num_prompt_tokens, 0, req.task, req.arrival_time)
            if out is not None:
                self._deliver(out)

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        """After a failed step the engine state is suspect: abort everything, raise in each stream."""
        try:
            self.engine.abort_all()
        except Exception:  # noqa: BLE001 - the streams must still hear about `exc`
            log.exception("could not abort requests after a failed step")
        self._fail_streams(request_ids, exc)

    def _fail_streams(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            self._deliver_error(rid, exc)

    def _deliver(self, out: RequestOutput) -> None:
        queue = self._streams.get(out.request_id)
        if queue is not None:
            queue.put_nowait(out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(exc)
