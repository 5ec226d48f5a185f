"""Turn a replica's chunk stream into OpenAI responses: one JSON body, or SSE events
(`data: {...}` lines, an error event if the stream fails after it started, then
`data: [DONE]`), while timing the request for the metrics (TTFT, inter-token latency, e2e,
tokens, finish reason, SLO, predicted-vs-actual length).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from inlaid_ray.serve.http_errors import OpenAIHTTPError, from_exception
from inlaid_ray.serve.metrics import ServeMetrics
from inlaid_ray.serve.openai_protocol import Usage, chat_body, chat_chunk, completion_body, usage_chunk
from inlaid_ray.serve.tool_calls import ToolCallParsing, content_before_calls, parse_tool_calls

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


@dataclass
class ResponseContext:
    """What the router decided about one request, needed to answer and to account for it."""

    kind: Literal["completion", "chat"]
    request_id: str
    model: str  # as the client named it (task or base id); also the metrics `task` label
    task: str | None
    prompt_text: str
    prompt_token_ids: tuple[int, ...]
    predicted_len: float | None
    slo_s: float | None
    include_usage: bool
    return_token_ids: bool
    arrival: float = field(default_factory=time.perf_counter)  # when the router got the request
    tokenize_s: float = 0.0  # router work before the replica: the prompt's tokenization ...
    predict_s: float = 0.0  # ... and its output-length prediction
    token_text: Callable[[int], str] | None = None  # set when the client asked for logprobs
    echo_text: str = ""  # completions with echo: the prompt, sent before the completion
    tool_calls: ToolCallParsing | None = None  # chat with tools (tool_choice not "none"): calls are parsed out


def logprobs_object(ctx: ResponseContext, entries: list[list[Any]], text_offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's `logprobs` of one choice for `entries` ([token id, logprob, [[id, logprob], ...]] per
    token, replica_protocol.merge_outputs): chat's `{"content": [...]}` or completions' parallel lists."""
    if ctx.token_text is None:
        return None
    text = ctx.token_text
    if ctx.kind == "chat":
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            s = text(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        return {"content": [item(t, lp) | {"top_logprobs": [item(a, alp) for a, alp in top]}
                            for t, lp, top in entries]}
    tokens = [text(t) for t, _, _ in entries]
    offsets = []
    for s in tokens:
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text(a): alp for a, alp in top} for _, _, top in entries], "text_offset": offsets}


class StreamTracker:
    """Accumulates one request's chunks; `finish()` records its metrics once."""

    def __init__(self, ctx: ResponseContext, metrics: ServeMetrics,
                 on_finished: Callable[[ResponseContext, "StreamTracker"], None] | None = None) -> None:
        self.ctx, self.metrics, self.on_finished = ctx, metrics, on_finished
        self.replica: str | None = None
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[list[Any]] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.stats: dict[str, Any] | None = None
        self.queue_time_s: float | None = None  # reported by the replica's engine
        self.engine_time_s: float | None = None  # likewise: its arrival at the engine -> its end
        self.first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._recorded = False

    def add(self, chunk: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.replica = chunk.get("replica", self.replica)
        tokens = chunk.get("token_ids", ())
        if tokens:
            if self.first_token_at is None:
                self.first_token_at = now
            elif self._last_token_at is not None:
                # A coalesced chunk of k tokens spreads its gap over the k tokens.
                gap = (now - self._last_token_at) / len(tokens)
                for _ in tokens:
                    self.metrics.itl.labels(self.ctx.model).observe(gap)
            self._last_token_at = now
        self.text_parts.append(chunk.get("text", ""))
        self.token_ids.extend(tokens)
        self.logprobs.extend(chunk.get("logprobs") or ())
        self.completion_tokens = chunk.get("num_completion_tokens", self.completion_tokens)
        self.finish_reason = chunk.get("finish_reason") or self.finish_reason
        if chunk.get("queue_time_s") is not None:
            self.queue_time_s = chunk["queue_time_s"]
        if chunk.get("engine_time_s") is not None:
            self.engine_time_s = chunk["engine_time_s"]
        if chunk.get("stats") is not None:
            self.stats = chunk["stats"]

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def usage(self) -> Usage:
        n = len(self.ctx.prompt_token_ids)
        return Usage(prompt_tokens=n, completion_tokens=self.completion_tokens, total_tokens=n + self.completion_tokens)

    def finish(self, failed: bool = False) -> None:
        """Record metrics (once); a failed or aborted request counts under its finish reason."""
        if self._recorded:
            return
        self._recorded = True
        reason = "error" if failed else (self.finish_reason or "abort")
        e2e = time.perf_counter() - self.ctx.arrival
        ttft = None if self.first_token_at is None else self.first_token_at - self.ctx.arrival
        done = reason in ("stop", "length")
        self.metrics.record_finished(
            self.ctx.model, reason, len(self.ctx.prompt_token_ids), self.completion_tokens, e2e, ttft,
            self.queue_time_s,
            self.ctx.slo_s if done else None,
            self.ctx.predicted_len if done and self.completion_tokens else None,
        )
        if self.stats is not None and self.replica is not None:
            self.metrics.record_replica_stats(self.replica, self.stats)
        if done and self.on_finished is not None:
            try:
                self.on_finished(self.ctx, self)
            except Exception:  # a predictor bug must not fail a finished request
                log.exception("on_finished hook failed for %s", self.ctx.request_id)


def server_timing(ctx: ResponseContext, trackers: Sequence[StreamTracker]) -> str:
    """A W3C `Server-Timing` value (ms) for a finished request: the router's tokenization and
    length prediction, the engine's time (the slowest choice), and the router's whole time; the
    rest of the router's time is the hop to the replica and back, the rest of the client's is
    HTTP and Serve's proxy."""
    parts = [("tokenize", ctx.tokenize_s), ("predict", ctx.predict_s)]
    engine = [t.engine_time_s for t in trackers if t.engine_time_s is not None]
    if engine:
        parts.append(("engine", max(engine)))
    parts.append(("router", time.perf_counter() - ctx.arrival))
    return ", ".join(f"{name};dur={seconds * 1e3:.2f}" for name, seconds in parts)


async def next_chunk(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The next chunk; an error chunk or an early end raises OpenAIHTTPError."""
    try:
        chunk = await stream.__anext__()
    except StopAsyncIteration:
        raise OpenAIHTTPError(500, "the replica ended the stream without a finish reason",
                              code="internal_error", err_type="server_error") from None
    except OpenAIHTTPError:
        raise
    except Exception as exc:  # replica died, Ray errors
        raise from_exception(exc) from exc
    if "error" in chunk:
        raise OpenAIHTTPError.from_chunk(chunk)
    return chunk


class ChoiceStreams:
    """One replica stream carrying every choice of a request (chunks tagged "index", replica.py)
    split into one stream per choice. An error ends every choice; `cancel()` stops the generation."""

    def __init__(self, first: dict[str, Any], stream: Any, num_choices: int) -> None:
        self._stream = stream
        self._queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(num_choices)]
        self._open = set(range(num_choices))
        self._unseen = set(range(num_choices))  # choices whose first chunk has not arrived yet
        self._replica = first.get("replica")  # only the stream's first chunk names it: every choice's tracker needs it
        self._route(first)
        self._task = asyncio.get_running_loop().create_task(self._pump()) if self._open else None

    def _route(self, chunk: dict[str, Any]) -> None:
        index = int(chunk.get("index", 0))
        if index in self._unseen:
            self._unseen.discard(index)
            chunk = {"replica": self._replica, **chunk}
        self._queues[index].put_nowait(chunk)
        if chunk.get("finish_reason"):
            self._open.discard(index)

    async def _pump(self) -> None:
        try:
            while self._open:
                self._route(await next_chunk(self._stream))
        except Exception as exc:  # noqa: BLE001 - raised in every choice's stream
            for queue in self._queues:
                queue.put_nowait(exc)

    async def choice(self, index: int) -> AsyncIterator[dict[str, Any]]:
        """The chunks of choice `index`, up to the one with its finish reason."""
        while True:
            item = await self._queues[index].get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.get("finish_reason"):
                return

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._stream.cancel()


@dataclass
class Choice:
    """One choice of a response: its chunks and its tracker."""

    stream: AsyncIterator[dict[str, Any]]
    tracker: StreamTracker


async def _drain(choice: Choice) -> None:
    async for chunk in choice.stream:
        choice.tracker.add(chunk)


def _cumulative_logprob(choice: Choice) -> float:
    return sum(lp for _, lp, _ in choice.tracker.logprobs)


def _usage(ctx: ResponseContext, choices: list[Choice]) -> Usage:
    """Prompt tokens once; completion tokens of every candidate generated (best_of ones included)."""
    n, generated = len(ctx.prompt_token_ids), sum(c.tracker.completion_tokens for c in choices)
    return Usage(prompt_tokens=n, completion_tokens=generated, total_tokens=n + generated)


def assistant_message(ctx: ResponseContext, tracker: StreamTracker) -> tuple[dict[str, Any], str | None]:
    """A chat choice's message (content, and tool_calls parsed out of a finished answer) and its
    finish reason (OpenAI's for an answer with calls, else the engine's)."""
    parsing = ctx.tool_calls
    if parsing is not None and tracker.finish_reason == "stop":
        content, calls = parse_tool_calls(tracker.text, parsing.names, parsing.parallel)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, parsing.finish_reason
    return {"role": "assistant", "content": tracker.text}, tracker.finish_reason


def _choice_body(ctx: ResponseContext, index: int, tracker: StreamTracker) -> dict[str, Any]:
    finish_reason = tracker.finish_reason
    if ctx.kind == "completion":
        body = {"index": index, "text": ctx.echo_text + tracker.text}
    else:
        message, finish_reason = assistant_message(ctx, tracker)
        body = {"index": index, "message": message}
    body |= {"logprobs": logprobs_object(ctx, tracker.logprobs), "finish_reason": finish_reason}
    if ctx.return_token_ids:
        body["token_ids"] = list(tracker.token_ids)
    return body


async def collect(choices: list[Choice], n: int) -> dict[str, Any]:
    """Drain every choice and build the non-streaming OpenAI body: all of them, or the `n` with
    the highest cumulative log-probability when more candidates were generated (best_of)."""
    await asyncio.gather(*(_drain(c) for c in choices))
    ctx = choices[0].tracker.ctx
    kept = choices if len(choices) == n else sorted(choices, key=_cumulative_logprob, reverse=True)[:n]
    build = completion_body if ctx.kind == "completion" else chat_body
    body = build(ctx.request_id, ctx.model, "", None, _usage(ctx, choices))
    body["choices"] = [_choice_body(ctx, i, c.tracker) for i, c in enumerate(kept)]
    if ctx.return_token_ids:
        body["prompt_token_ids"] = list(ctx.prompt_token_ids)
    return body


def _event(obj: dict[str, Any]) -> str:
    # OpenAI's SSE framing is this one line; sse-starlette would add a dependency for it and for
    # what it adds beyond framing: disconnects (Starlette already cancels this generator, which
    # aborts the generation: tests/test_serve_app.py) and keep-alive comments (`with_keepalive`).
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _delta(ctx: ResponseContext, index: int, text: str, token_ids: list[int] | None, finish_reason: str | None,
           logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if ctx.kind == "completion":
        obj = completion_body(ctx.request_id, ctx.model, text, finish_reason, None)
    else:
        obj = chat_chunk(ctx.request_id, ctx.model, {"content": text} if text or token_ids else {}, finish_reason)
    obj["choices"][0] |= {"index": index, "logprobs": logprobs}
    if token_ids is not None:
        obj["choices"][0]["token_ids"] = token_ids
    if ctx.include_usage:
        obj["usage"] = None
    return obj


async def _choice_chunks(index: int, choice: Choice) -> AsyncIterator[dict[str, Any]]:
    """The stream chunks of one choice: (chat) its role, (echo) the prompt, the deltas, the finish."""
    tracker = choice.tracker
    ctx = tracker.ctx
    want_ids = ctx.return_token_ids
    if ctx.kind == "chat":
        role = chat_chunk(ctx.request_id, ctx.model, {"role": "assistant", "content": ""}, None)
        role["choices"][0]["index"] = index
        if want_ids:
            role["prompt_token_ids"] = list(ctx.prompt_token_ids)
        yield role | ({"usage": None} if ctx.include_usage else {})
    elif ctx.echo_text:
        yield _delta(ctx, index, ctx.echo_text, None, None)
    if ctx.tool_calls is not None:  # calls are known only once the answer is complete
        async for chunk in _tool_call_chunks(index, choice):
            yield chunk
        return
    offset = 0
    async for chunk in choice.stream:
        tracker.add(chunk)
        text, ids, reason = chunk.get("text", ""), list(chunk.get("token_ids", ())), chunk.get("finish_reason")
        final_here = ctx.kind == "completion" and reason is not None
        entries = chunk.get("logprobs") or []
        logprobs = logprobs_object(ctx, entries, offset) if entries else None
        if text or (want_ids and ids) or final_here or logprobs is not None:
            yield _delta(ctx, index, text, ids if want_ids else None, reason if final_here else None, logprobs)
            if logprobs is not None and ctx.kind == "completion":
                offset += sum(len(t) for t in logprobs["tokens"])
    if ctx.kind == "chat":
        yield _delta(ctx, index, "", None, tracker.finish_reason)


async def _tool_call_chunks(index: int, choice: Choice) -> AsyncIterator[dict[str, Any]]:
    """A chat choice that may call tools: its text streams as content up to where a tool call
    could begin (a suffix that may be the start of `<tool_call>` is held back); the rest waits for
    the end, then one delta carries the calls (each with its `index`, OpenAI's streaming shape)
    or, when none parses, the held text as content, with the choice's logprobs; then the finish."""
    tracker = choice.tracker
    ctx = tracker.ctx
    sent = 0  # characters of the text already sent as content
    async for chunk in choice.stream:
        tracker.add(chunk)
        safe = content_before_calls(tracker.text)
        if safe > sent:
            yield _delta(ctx, index, tracker.text[sent:safe], None, None)
            sent = safe
    message, finish_reason = assistant_message(ctx, tracker)
    if message.get("tool_calls"):
        delta: dict[str, Any] = {"tool_calls": [{"index": i} | call for i, call in enumerate(message["tool_calls"])]}
    else:
        delta = {"content": tracker.text[sent:]} if tracker.text[sent:] else {}
    obj = chat_chunk(ctx.request_id, ctx.model, delta, None)
    obj["choices"][0] |= {"index": index, "logprobs": logprobs_object(ctx, tracker.logprobs) if tracker.logprobs else None}
    if ctx.return_token_ids:
        obj["choices"][0]["token_ids"] = list(tracker.token_ids)
    yield obj | ({"usage": None} if ctx.include_usage else {})
    yield _delta(ctx, index, "", None, finish_reason)


async def _merged(sources: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Items of several async iterators in arrival order; the first failure is raised."""
    if len(sources) == 1:
        async for item in sources[0]:
            yield item
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    async def pump(source: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
            queue.put_nowait(end)
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait(exc)

    tasks = [asyncio.get_running_loop().create_task(pump(src)) for src in sources]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it (the openai SDK's decoder does)


async def with_keepalive(events: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """`events`, plus a `KEEPALIVE` comment whenever `interval_s` passes without one: a request
    queued or paused by the scheduler is silent, and proxies close idle connections (nginx and
    cloud load balancers after 60 s by default). Waiting never cancels the pending event."""
    it = events.__aiter__()
    pending: asyncio.Future[str] = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        if not pending.done():  # the client went away: stop the source where it waits
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await it.aclose()


async def sse_events(choices: list[Choice]) -> AsyncIterator[str]:
    """SSE events of started choices (index order within a choice, interleaved across choices); a
    failure becomes an error event (the status is already 200)."""
    ctx = choices[0].tracker.ctx
    failed = False
    try:
        async for obj in _merged([_choice_chunks(i, c) for i, c in enumerate(choices)]):
            yield _event(obj)
        if ctx.include_usage:
            obj_name = "text_completion" if ctx.kind == "completion" else "chat.completion.chunk"
            yield _event(usage_chunk(ctx.request_id, ctx.model, obj_name, _usage(ctx, choices)))
    except Exception as exc:  # noqa: BLE001 - after the 200 went out, errors travel as values
        failed = True
        err = from_exception(exc)
        choices[0].tracker.metrics.errors.labels(str(err.status)).inc()
        yield _event(err.body() | {"status": err.status})
    finally:
        for choice in choices:
            choice.tracker.finish(failed=failed)
    yield DONE
