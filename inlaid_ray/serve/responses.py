"""Turn a replica's chunk stream into OpenAI responses: one JSON body, or SSE events
(`data: {...}` lines, an error event if the stream fails after it started, then
`data: [DONE]`), while timing the request for the metrics (TTFT, inter-token latency, e2e,
tokens, finish reason, SLO, predicted-vs-actual length).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from inlaid_ray.serve.http_errors import OpenAIHTTPError, from_exception
from inlaid_ray.serve.metrics import ServeMetrics
from inlaid_ray.serve.openai_protocol import Usage, chat_body, chat_chunk, completion_body, usage_chunk

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
    arrival: float = field(default_factory=time.perf_counter)


class StreamTracker:
    """Accumulates one request's chunks; `finish()` records its metrics once."""

    def __init__(self, ctx: ResponseContext, metrics: ServeMetrics,
                 on_finished: Callable[[ResponseContext, "StreamTracker"], None] | None = None) -> None:
        self.ctx, self.metrics, self.on_finished = ctx, metrics, on_finished
        self.replica: str | None = None
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.stats: dict[str, Any] | None = None
        self.queue_time_s: float | None = None  # reported by the replica's engine
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
        self.completion_tokens = chunk.get("num_completion_tokens", self.completion_tokens)
        self.finish_reason = chunk.get("finish_reason") or self.finish_reason
        if chunk.get("queue_time_s") is not None:
            self.queue_time_s = chunk["queue_time_s"]
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


async def collect(first: dict[str, Any], stream: AsyncIterator[dict[str, Any]], tracker: StreamTracker) -> dict[str, Any]:
    """Drain the stream and build the non-streaming OpenAI body."""
    chunk = first
    while True:
        tracker.add(chunk)
        if chunk.get("finish_reason"):
            break
        chunk = await next_chunk(stream)
    ctx = tracker.ctx
    build = completion_body if ctx.kind == "completion" else chat_body
    body = build(ctx.request_id, ctx.model, tracker.text, tracker.finish_reason, tracker.usage)
    if ctx.return_token_ids:
        body["prompt_token_ids"] = list(ctx.prompt_token_ids)
        body["choices"][0]["token_ids"] = list(tracker.token_ids)
    return body


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _delta_event(ctx: ResponseContext, text: str, token_ids: list[int] | None, finish_reason: str | None) -> str:
    if ctx.kind == "completion":
        obj = completion_body(ctx.request_id, ctx.model, text, finish_reason, None)
    else:
        obj = chat_chunk(ctx.request_id, ctx.model, {"content": text} if text or token_ids else {}, finish_reason)
    if token_ids is not None:
        obj["choices"][0]["token_ids"] = token_ids
    if ctx.include_usage:
        obj["usage"] = None
    return _event(obj)


async def sse_events(first: dict[str, Any], stream: AsyncIterator[dict[str, Any]], tracker: StreamTracker) -> AsyncIterator[str]:
    """SSE events of a started stream; a failure becomes an error event (the status is already 200)."""
    ctx = tracker.ctx
    want_ids = ctx.return_token_ids
    failed = False
    try:
        if ctx.kind == "chat":
            role = chat_chunk(ctx.request_id, ctx.model, {"role": "assistant", "content": ""}, None)
            if want_ids:
                role["prompt_token_ids"] = list(ctx.prompt_token_ids)
            yield _event(role | ({"usage": None} if ctx.include_usage else {}))
        chunk = first
        while True:
            tracker.add(chunk)
            text, ids, reason = chunk.get("text", ""), list(chunk.get("token_ids", ())), chunk.get("finish_reason")
            final_here = ctx.kind == "completion" and reason is not None
            if text or (want_ids and ids) or final_here:
                yield _delta_event(ctx, text, ids if want_ids else None, reason if final_here else None)
            if reason is not None:
                break
            chunk = await next_chunk(stream)
        if ctx.kind == "chat":
            yield _delta_event(ctx, "", None, tracker.finish_reason)
        if ctx.include_usage:
            obj = "text_completion" if ctx.kind == "completion" else "chat.completion.chunk"
            yield _event(usage_chunk(ctx.request_id, ctx.model, obj, tracker.usage))
    except Exception as exc:  # noqa: BLE001 - after the 200 went out, errors travel as values
        failed = True
        err = from_exception(exc)
        tracker.metrics.errors.labels(str(err.status)).inc()
        yield _event(err.body() | {"status": err.status})
    finally:
        tracker.finish(failed=failed)
    yield DONE
