"""Async load generator for the OpenAI endpoint of inlaid-ray (issue 9, item 1).

Requests arrive as a Poisson process or bursty (gamma inter-arrivals with a chosen CV, the same
generator as the simulator's `inlaid_ray.bench.workload.arrival_times`), drawn from a multi-task
mix: the demo tasks (their eval prompts through /v1/chat/completions) or synthetic tasks with the
paper's length profiles (token-id prompts through /v1/completions, `ignore_eos` so each request
generates exactly its drawn output length). Each task has an e2e-latency SLO. A run stops by
itself: arrivals end at `duration_s` or after `max_requests`, whichever comes first, and requests
still running `drain_timeout_s` later are cancelled. Only loopback targets are accepted.

Every request streams (SSE `data:` lines up to `data: [DONE]`) and is recorded with TTFT,
inter-token latencies, e2e latency, tokens, task and status (`load_stats.RequestRecord`);
`load_stats.summarize` turns the records into throughput, latency, JCT and SLO attainment.
The clock and the sleep function are parameters, so tests drive a run on a fake clock.

    inlaid-ray bench load --url http://127.0.0.1:8000 --mix demo --rate 2 --duration 60 \
        --max-requests 200 [--arrival gamma --cv 4] [--out load_tests/results/loadgen.json]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np

from inlaid_ray.bench.load_stats import RequestRecord, summarize, summarize_by_task

from inlaid_ray.bench.workload import WorkloadConfig, arrival_times, generate_workload

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"


# ------------------------------------------------------------------------------ target


def check_loopback(url: str) -> str:
    """Return `url` if its host is loopback (localhost, 127.0.0.0/8, ::1); ValueError otherwise.

    A load generator can flood whatever it points at, so it refuses any other host outright.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or host is None:
        raise ValueError(f"target URL {url!r} is not an http(s) URL with a host; expected a loopback URL "
                         "such as http://127.0.0.1:8000")
    if host.lower() in ("localhost", "localhost.localdomain"):
        return url
    try:
        if ipaddress.ip_address(host).is_loopback:
            return url
    except ValueError:
        pass  # a name other than localhost: refused below without resolving it
    raise ValueError(
        f"refusing to send load to {host!r} (from {url!r}): only loopback targets are allowed "
        "(localhost, 127.0.0.0/8, ::1)"
    )


# ------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class TaskLoad:
    """One task of the mix: the model name to send, its relative weight, prompts and SLO."""

    name: str  # sent as `model` (task name on the server)
    weight: float
    slo_s: float  # e2e latency objective (s)
    path: str  # CHAT_PATH or COMPLETIONS_PATH
    prompts: tuple[Any, ...]  # chat: list of messages; completions: text or token ids
    max_tokens: int


# (slo_ttft_s, slo_per_token_s, task names or None) -> the demo's task mix (inlaid_ray.demo.load_driver)
DemoMix = Callable[[float, float, Sequence[str] | None], list[TaskLoad]]


@dataclass(frozen=True)
class PlannedRequest:
    """A request of the plan: when it is sent, where, and with what body."""

    index: int
    arrival_s: float
    task: str
    path: str
    body: dict[str, Any]
    slo_s: float | None


@dataclass(frozen=True)
class LoadConfig:
    """Arrival process and bounds of a run; every field has a default."""

    rate: float = 1.0  # mean requests per second
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0  # coefficient of variation of gamma inter-arrival times (> 1 = bursty)
    duration_s: float = 60.0  # no request is sent after this (s from the start)
    max_requests: int = 100  # nor more than this many
    drain_timeout_s: float = 120.0  # real seconds to wait for requests in flight after the last send
    request_timeout_s: float = 300.0  # per request (httpx read timeout between chunks)
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.max_requests < 1:
            raise ValueError(
                f"rate={self.rate} and duration_s={self.duration_s} must be > 0, max_requests={self.max_requests} >= 1"
            )
        if self.arrival not in ("poisson", "gamma") or self.cv <= 0:
            raise ValueError(f"arrival={self.arrival!r} must be poisson|gamma and cv={self.cv} > 0")


def arrivals(cfg: LoadConfig) -> np.ndarray:
    """Arrival offsets (s) within the run's bounds: at most max_requests, none after duration_s."""
    wl = WorkloadConfig(num_requests=cfg.max_requests, rate=cfg.rate, arrival=cfg.arrival, cv=cfg.cv, seed=cfg.seed)
    times = arrival_times(wl, np.random.default_rng(cfg.seed))
    return times[times <= cfg.duration_s]


def plan_mix(tasks: Sequence[TaskLoad], cfg: LoadConfig) -> list[PlannedRequest]:
    """Requests at `arrivals(cfg)`, each from a task drawn by weight and a prompt drawn from it."""
    if not tasks:
        raise ValueError("the task mix is empty")
    times = arrivals(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    w = np.array([t.weight for t in tasks], dtype=np.float64)
    which = rng.choice(len(tasks), size=len(times), p=w / w.sum())
    plan = []
    for i, (t_arr, k) in enumerate(zip(times, which)):
        task = tasks[k]
        prompt = task.prompts[int(rng.integers(len(task.prompts)))]
        body = _body(task.path, task.name, prompt, task.max_tokens, cfg.temperature, ignore_eos=False)
        plan.append(PlannedRequest(i, float(t_arr), task.name, task.path, body, task.slo_s))
    return plan


def plan_synthetic(
    cfg: LoadConfig,
    num_tasks: int = 4,
    models: Sequence[str] = (),
    slo_ttft_s: float = 1.0,
    slo_per_token_s: float = 0.1,
    max_prompt_tokens: int = 1024,
    max_output_tokens: int = 512,
    token_range: tuple[int, int] = (1000, 30000),
) -> list[PlannedRequest]:
    """Synthetic tasks with the paper's length profiles (`sched.workload.PAPER_PROFILES`).

    Task i is sent as `models[i % len(models)]` (default: its own name); prompts are random token
    ids of the drawn length and `ignore_eos` makes each request generate exactly its drawn output
    length. SLO of task i: slo_ttft_s + slo_per_token_s x its median output length.
    """
    wl = WorkloadConfig(
        num_tasks=num_tasks, num_requests=cfg.max_requests, rate=cfg.rate, arrival=cfg.arrival, cv=cfg.cv,
        max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens, prediction="none", seed=cfg.seed,
    )
    specs, requests = generate_workload(wl)
    index = {s.name: i for i, s in enumerate(specs)}
    slo = {s.name: slo_ttft_s + slo_per_token_s * s.output_median for s in specs}
    rng = np.random.default_rng(cfg.seed + 2)
    plan = []
    for i, r in enumerate(req for req in requests if req.arrival_time <= cfg.duration_s):
        model = models[index[r.task] % len(models)] if models else r.task
        prompt = [int(x) for x in rng.integers(*token_range, size=r.prompt_tokens)]
        body = _body(COMPLETIONS_PATH, model, prompt, r.output_tokens, cfg.temperature, ignore_eos=True)
        plan.append(PlannedRequest(i, r.arrival_time, r.task, COMPLETIONS_PATH, body, slo[r.task]))
    return plan


def _body(path: str, model: str, prompt: Any, max_tokens: int, temperature: float, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if path == CHAT_PATH:
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    return body


# ------------------------------------------------------------------------------ one request


async def consume_sse(lines: AsyncIterator[str], rec: RequestRecord, clock: Clock, t0: float) -> None:
    """Read an OpenAI SSE stream into `rec`: a token event per chunk carrying text, usage from the
    usage chunk, an `error` object ends it as failed, and it must end with `data: [DONE]`."""
    done = False
    events = 0
    async for raw in lines:
        line = raw.strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            rec.status, rec.error = "error", f"malformed SSE data: {data[:200]!r}"
            break
        if "error" in obj:
            err = obj["error"]
            rec.status, rec.error = "error", err.get("message", str(err)) if isinstance(err, dict) else str(err)
            break
        if obj.get("usage"):
            rec.num_prompt_tokens = obj["usage"].get("prompt_tokens")
            rec.num_output_tokens = int(obj["usage"].get("completion_tokens", 0))
        for choice in obj.get("choices") or []:
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                now = clock() - t0
                rec.token_times_s.append(now)
                if rec.first_token_s is None:
                    rec.first_token_s = now
                events += 1
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
    rec.end_s = clock() - t0
    if rec.status == "pending":
        if done:
            rec.status = "ok"
            if rec.num_output_tokens == 0:
                rec.num_output_tokens = events  # server sent no usage chunk
        else:
            rec.status, rec.error = "error", "stream ended without data: [DONE]"


async def send_one(
    client: httpx.AsyncClient, req: PlannedRequest, rec: RequestRecord, clock: Clock, t0: float,
    headers: dict[str, str] | None = None,
) -> None:
    """POST one streaming request and fill `rec` (never raises for HTTP or transport failures)."""
    if rec.start_s is None:
        rec.start_s = clock() - t0
    try:
        async with client.stream("POST", req.path, json=req.body, headers=headers) as resp:
            if resp.status_code != 200:
                body = await resp.aread()
                rec.end_s = clock() - t0
                rec.status, rec.error = f"http_{resp.status_code}", _error_message(body)
                return
            await consume_sse(resp.aiter_lines(), rec, clock, t0)
    except httpx.TimeoutException as exc:
        rec.end_s, rec.status, rec.error = clock() - t0, "timeout", f"{type(exc).__name__}: {exc}"
    except httpx.HTTPError as exc:
        rec.end_s, rec.status, rec.error = clock() - t0, "error", f"{type(exc).__name__}: {exc}"


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    except (json.JSONDecodeError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace")


# ------------------------------------------------------------------------------ a run


async def run_plan(
    client: httpx.AsyncClient,
    plan: Sequence[PlannedRequest],
    cfg: LoadConfig,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    headers: dict[str, str] | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send `plan` at its arrival times (clock/sleep injectable) and return one record per request.

    The client's base URL must be loopback. Arrivals past `cfg.duration_s` or beyond
    `cfg.max_requests` are not sent; requests still running `cfg.drain_timeout_s` (real time)
    after the last send are cancelled and recorded as such.
    """
    check_loopback(str(client.base_url))
    plan = [p for p in plan if p.arrival_s <= cfg.duration_s][: cfg.max_requests]
    records = [RequestRecord(p.index, p.task, p.arrival_s, slo_s=p.slo_s) for p in plan]
    in_flight: list[asyncio.Task] = []
    t0 = clock()
    for req, rec in zip(plan, records):
        delay = req.arrival_s - (clock() - t0)
        if delay > 0:
            await sleep(delay)
        rec.start_s = clock() - t0  # now, not when the task first runs (after the next sleep)
        task = asyncio.create_task(send_one(client, req, rec, clock, t0, headers))
        if on_done is not None:
            task.add_done_callback(lambda _t, r=rec: on_done(r))
        in_flight.append(task)
    if in_flight:
        _, pending = await asyncio.wait(in_flight, timeout=cfg.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if rec.status == "pending":
            rec.status, rec.error = "cancelled", f"still running {cfg.drain_timeout_s}s after the last send"
    return records


def make_client(url: str, timeout_s: float = 300.0, max_connections: int = 1024) -> httpx.AsyncClient:
    """An httpx client for a loopback server (refuses other hosts)."""
    check_loopback(url)
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits)


def report(cfg: LoadConfig, records: Sequence[RequestRecord], **meta: Any) -> dict[str, Any]:
    """JSON-ready result of a run: config, summary, per-task summary and every record."""
    return {
        "config": asdict(cfg),
        **meta,
        "summary": summarize(records),
        "by_task": summarize_by_task(records),
        "records": [r.to_json() for r in records],
    }


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inlaid-ray bench load", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="loopback base URL of the OpenAI server")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--mix", choices=("demo", "synthetic"), default="demo")
    p.add_argument("--tasks", default=None, help="demo: comma list of demo tasks (default all)")
    p.add_argument("--models", default=None, help="synthetic: comma list of served task names to send")
    p.add_argument("--num-tasks", type=int, default=4, help="synthetic: number of tasks")
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="gamma: CV of inter-arrival times")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=100)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--slo-ttft", type=float, default=1.0, help="SLO = this + slo-per-token x task's output length")
    p.add_argument("--slo-per-token", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: print the summary only)")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace, demo_mix: DemoMix | None) -> dict[str, Any]:
    from inlaid_ray.progress import Progress

    cfg = LoadConfig(rate=args.rate, arrival=args.arrival, cv=args.cv, duration_s=args.duration,
                     max_requests=args.max_requests, drain_timeout_s=args.drain_timeout, seed=args.seed)
    if args.mix == "demo":
        if demo_mix is None:
            raise SystemExit("loadgen: --mix demo needs the demo tasks; run it as `inlaid-ray bench load`")
        tasks = demo_mix(args.slo_ttft, args.slo_per_token, args.tasks.split(",") if args.tasks else None)
        plan = plan_mix(tasks, cfg)
    else:
        models = args.models.split(",") if args.models else ()
        plan = plan_synthetic(cfg, args.num_tasks, models, args.slo_ttft, args.slo_per_token)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    bar = Progress(total=len(plan), desc="requests", unit="req")
    async with make_client(args.url, cfg.request_timeout_s) as client:
        records = await run_plan(client, plan, cfg, headers=headers, on_done=lambda _r: bar.update(1))
    bar.close()
    return report(cfg, records, url=args.url, mix=args.mix)


def main(argv: Sequence[str] | None = None, demo_mix: DemoMix | None = None) -> None:
    """`demo_mix`: the demo's task mix (`inlaid_ray.demo.load_driver.demo_mix`), which this
    package does not import; the CLI passes it."""
    args = parse_args(argv)
    try:
        check_loopback(args.url)  # fail before building the plan
    except ValueError as exc:
        raise SystemExit(f"loadgen: {exc}") from None
    result = asyncio.run(_main(args, demo_mix))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
