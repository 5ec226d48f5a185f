"""Streaming front of `LLMEngine` for asyncio servers (vLLM's AsyncLLMEngine pattern).

A background task owns the engine: it applies queued adds and aborts between steps and
runs each `step()` in one worker thread, so the event loop keeps serving while the model
computes and the engine is never touched by two threads at once. Adapter commands
(`submit_adapter_command`, engine/adapters.py) run in that worker too, between steps and after
the adds and aborts queued before them. `stats()` is the snapshot the worker took after the
last step or command, so readers on the loop never race a step. Each `generate()` call
is an async iterator of `RequestOutput` deltas ending with one that carries
`finish_reason`. A step that raises fails the requests in flight with that exception
(their streams re-raise it) and the loop goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from inlaid_ray.engine.adapters import AdapterCommand
from inlaid_ray.engine.config import EngineStats
from inlaid_ray.engine.engine import LLMEngine
from inlaid_ray.engine.request import Request, RequestOutput, SamplingParams
from inlaid_ray.errors import InvalidRequest
from inlaid_ray.lora.bank import BankView

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
        self._pending_commands: list[tuple[AdapterCommand, asyncio.Future[int | None]]] = []
        self._stats = engine.stats()
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
        """The engine's counters as of its last step or adapter command."""
        return self._stats

    @property
    def adapter_view(self) -> BankView:
        """What the adapter bank holds (TaskNotFound-free reads from any thread)."""
        if self.engine.adapter_bank is None:
            raise ValueError("this engine serves the base model only; it has no adapter bank")
        return self.engine.adapter_bank.view

    def submit_adapter_command(self, command: AdapterCommand) -> asyncio.Future[int | None]:
        """Queue a load/evict for the engine's worker (in submission order, between steps); the
        future holds the command's result or error. Call from the engine's event loop."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(EngineShutdown("the engine is shut down"))
            return future
        self._pending_commands.append((command, future))
        self._start()
        return future

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
        self._fail_commands(EngineShutdown("the engine was shut down before this adapter command ran"))
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
            self._fail_commands(EngineShutdown("the engine loop was cancelled"))
            raise
        except BaseException as exc:  # a bug in the loop itself: no stream may hang on it
            log.exception("engine loop crashed; failing %d open streams", len(self._streams))
            self._fail(list(self._streams), exc)
            self._pending_adds.clear()
            self._fail_commands(exc)
            raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while not self._closed:
            self._apply_pending()
            if self._pending_commands:
                await self._run_commands()
                continue
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                if not (self._pending_adds or self._pending_aborts or self._pending_commands or self._closed):
                    await self._wakeup.wait()
                continue
            in_flight = [rid for rid in self._streams if rid not in self._pending_adds]
            try:
                outputs, self._stats = await loop.run_in_executor(self._executor, self._step)
            except Exception as exc:  # noqa: BLE001 - delivered to the streams, then the loop goes on
                log.exception("engine step failed; failing %d requests in flight", len(in_flight))
                self._fail(in_flight, exc)
                continue
            for out in outputs:
                self._deliver(out)
            if not outputs:
                await asyncio.sleep(0.001)  # nothing schedulable: let adds/aborts arrive

    def _step(self) -> tuple[list[RequestOutput], EngineStats]:
        """One step and the stats it leaves (worker thread)."""
        outputs = self.engine.step()
        return outputs, self.engine.stats()

    async def _run_commands(self) -> None:
        """Apply the queued adapter commands in the worker, in order, each with its own outcome."""
        commands, self._pending_commands = self._pending_commands, []

        def apply() -> tuple[list[tuple[bool, object]], EngineStats]:
            results: list[tuple[bool, object]] = []
            for command, _ in commands:
                try:
                    results.append((True, self.engine.apply_adapter_command(command)))
                except Exception as exc:  # noqa: BLE001 - returned to the submitter
                    results.append((False, exc))
            return results, self.engine.stats()

        try:
            results, self._stats = await asyncio.get_running_loop().run_in_executor(self._executor, apply)
        except BaseException as exc:  # the loop is going away (cancelled): no submitter may wait forever
            for _, future in commands:
                if not future.done():
                    future.set_exception(EngineShutdown(f"the engine loop stopped before this command finished: {exc!r}"))
            raise
        for (_, future), (ok, value) in zip(commands, results):
            if future.done():  # the submitter stopped waiting
                continue
            if ok:
                future.set_result(value)  # type: ignore[arg-type]
            else:
                future.set_exception(value)  # type: ignore[arg-type]

    def _fail_commands(self, exc: BaseException) -> None:
        commands, self._pending_commands = self._pending_commands, []
        for _, future in commands:
            if not future.done():
                future.set_exception(exc)

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
        if adds or aborts:
            self._stats = self.engine.stats()  # no step runs now: the loop is between steps

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
