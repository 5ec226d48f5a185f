"""The HTTP load generator (inlaid_ray/bench/loadgen.py) on a fake clock against an in-process ASGI app
that streams OpenAI-style SSE: arrival-process statistics, bounds, SSE parsing into records,
refusal of non-loopback targets, and the summary maths against a reference computed here."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
starlette = pytest.importorskip("starlette")
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from inlaid_ray.bench import loadgen  # noqa: E402
from inlaid_ray.bench.load_stats import RequestRecord, summarize, summarize_by_task  # noqa: E402
from inlaid_ray.demo.load_driver import demo_mix  # noqa: E402


class FakeClock:
    """Time moves only when someone sleeps on it."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.t += max(dt, 0.0)
        await asyncio.sleep(0)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _generate(request: Request):
    body = await request.json()
    model, n = body["model"], int(body["max_tokens"])
    if model == "missing":
        return JSONResponse({"error": {"message": f"task {model!r} not found", "code": "model_not_found"}}, status_code=404)
    chat = request.url.path.endswith("/chat/completions")

    def chunk(text, finish=None):
        if chat:
            return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    async def events():
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        for i in range(n):
            if model == "broken" and i == 1:
                yield _sse({"error": {"message": "replica died", "code": "internal_error"}})
                yield "data: [DONE]\n\n"
                return
            yield _sse(chunk(f"t{i} ", "length" if i == n - 1 else None))
        if model == "truncated":
            return  # no usage, no [DONE]
        yield _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


APP = Starlette(routes=[Route("/v1/completions", _generate, methods=["POST"]),
                        Route("/v1/chat/completions", _generate, methods=["POST"])])


def _tasks() -> list[loadgen.TaskLoad]:
    chat = ([{"role": "user", "content": "hi"}],)
    return [
        loadgen.TaskLoad("short", 3.0, 1.0, loadgen.CHAT_PATH, chat, 2),
        loadgen.TaskLoad("long", 1.0, 5.0, loadgen.COMPLETIONS_PATH, ("once upon a time",), 5),
    ]


def _run(plan, cfg, clock=None):
    clock = clock or FakeClock()

    async def go():
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await loadgen.run_plan(client, plan, cfg, clock=clock.now, sleep=clock.sleep)

    return asyncio.run(go()), clock


def _gaps(records) -> np.ndarray:
    starts = np.array(sorted(r.start_s for r in records))
    return np.diff(np.concatenate([[0.0], starts]))


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 3.0)])
def test_arrival_process_matches_rate_and_cv(arrival, cv):
    cfg = loadgen.LoadConfig(rate=20.0, arrival=arrival, cv=cv, duration_s=1e9, max_requests=2000, seed=3)
    records, _ = _run(loadgen.plan_mix(_tasks(), cfg), cfg)
    assert len(records) == 2000 and all(r.ok for r in records)
    # Sent exactly when planned: the fake clock only moves when the generator sleeps.
    assert all(r.start_s == pytest.approx(r.scheduled_s, abs=1e-9) for r in records)
    gaps = _gaps(records)
    # 2000 gaps: the mean rate is within ~3 standard errors, the CV within its 99% range.
    assert 1.0 / gaps.mean() == pytest.approx(cfg.rate, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)
    # The task mix follows the weights 3:1 (binomial, 2000 draws).
    share = sum(r.task == "short" for r in records) / len(records)
    assert share == pytest.approx(0.75, abs=0.04)


def test_run_stops_at_duration_and_at_request_count():
    cfg = loadgen.LoadConfig(rate=10.0, duration_s=20.0, max_requests=10_000, seed=1)
    records, clock = _run(loadgen.plan_mix(_tasks(), cfg), cfg)
    assert all(r.start_s <= cfg.duration_s for r in records)
    assert clock.now() <= cfg.duration_s
    assert abs(len(records) - cfg.rate * cfg.duration_s) <= 3 * math.sqrt(cfg.rate * cfg.duration_s)
    cfg = loadgen.LoadConfig(rate=10.0, duration_s=1e9, max_requests=37, seed=1)
    records, _ = _run(loadgen.plan_mix(_tasks(), cfg), cfg)
    assert len(records) == 37


def test_records_of_ok_and_failed_requests():
    cfg = loadgen.LoadConfig(rate=1.0, duration_s=100.0, max_requests=10)
    chat = [{"role": "user", "content": "hi"}]
    bodies = [
        ("ok-chat", loadgen.CHAT_PATH, chat, 4),
        ("ok-text", loadgen.COMPLETIONS_PATH, [5, 6, 7], 3),
        ("missing", loadgen.COMPLETIONS_PATH, "x", 3),
        ("broken", loadgen.CHAT_PATH, chat, 4),
        ("truncated", loadgen.COMPLETIONS_PATH, "x", 3),
    ]
    plan = [
        loadgen.PlannedRequest(i, float(i), model, path, loadgen._body(path, model, prompt, n, 0.0, True), 2.0)
        for i, (model, path, prompt, n) in enumerate(bodies)
    ]
    records, _ = _run(plan, cfg)
    by = {r.task: r for r in records}
    assert by["ok-chat"].status == "ok" and by["ok-chat"].num_output_tokens == 4
    assert len(by["ok-chat"].token_times_s) == 4  # the role-only chunk carries no token
    assert by["ok-chat"].num_prompt_tokens == 7 and by["ok-chat"].finish_reason == "length"
    assert by["ok-text"].status == "ok" and by["ok-text"].num_output_tokens == 3
    assert by["missing"].status == "http_404" and "'missing' not found" in by["missing"].error
    assert by["broken"].status == "error" and by["broken"].error == "replica died"
    assert by["truncated"].status == "error" and "[DONE]" in by["truncated"].error
    assert by["truncated"].num_output_tokens == 0
    summary = summarize(records)
    assert summary["statuses"] == {"error": 2, "http_404": 1, "ok": 2}
    assert summary["slo_attainment"] <= 2 / 5  # failed requests miss their SLO


def test_sse_timing_on_fake_clock():
    clock = FakeClock()
    gaps = [0.25, 0.05, 0.125, 0.5]  # before the first token, then between tokens, then to [DONE]

    async def lines():
        await clock.sleep(gaps[0])
        yield "data: " + json.dumps({"choices": [{"text": "a", "finish_reason": None}]})
        yield ""
        for g in gaps[1:3]:
            await clock.sleep(g)
            yield "data: " + json.dumps({"choices": [{"text": "b", "finish_reason": None}]})
        yield ": keep-alive comment"
        await clock.sleep(gaps[3])
        yield "data: [DONE]"

    rec = RequestRecord(0, "t", 0.0, start_s=0.0)
    asyncio.run(loadgen.consume_sse(lines(), rec, clock.now, 0.0))
    assert rec.status == "ok" and rec.num_output_tokens == 3  # no usage chunk: token events
    assert rec.ttft_s == pytest.approx(gaps[0])
    assert rec.itls_s == pytest.approx(gaps[1:3])
    assert rec.e2e_s == pytest.approx(sum(gaps))


def _pct(values, q):
    """Linear-interpolation percentile written out (the reference for numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def test_summary_maths_against_reference():
    rng = random.Random(7)
    records = []
    for i in range(200):
        start = rng.uniform(0, 50)
        n = rng.randint(1, 20)
        times = [start + rng.uniform(0.01, 0.5)]
        for _ in range(n - 1):
            times.append(times[-1] + rng.uniform(0.01, 0.2))
        status = "ok" if rng.random() < 0.9 else rng.choice(["http_503", "error", "cancelled"])
        rec = RequestRecord(i, rng.choice("ab"), start - rng.uniform(0, 0.1), start_s=start,
                            first_token_s=times[0], end_s=times[-1] + 0.01, token_times_s=times,
                            num_output_tokens=n, status=status, slo_s=rng.uniform(0.5, 3.0))
        records.append(rec)
    s = summarize(records)
    ok = [r for r in records if r.status == "ok"]
    e2e = [r.end_s - r.start_s for r in ok]
    span = max(r.end_s for r in ok) - min(r.start_s for r in ok)
    assert s["num_requests"] == 200 and s["num_ok"] == len(ok)
    assert s["throughput_tokens_per_s"] == pytest.approx(sum(r.num_output_tokens for r in ok) / span)
    assert s["throughput_req_per_s"] == pytest.approx(len(ok) / span)
    assert s["e2e_latency_mean_s"] == pytest.approx(statistics.fmean(e2e)) == s["jct_mean_s"]
    assert s["e2e_latency_p50_s"] == pytest.approx(statistics.median(e2e))
    assert s["e2e_latency_p99_s"] == pytest.approx(_pct(e2e, 99))
    assert s["ttft_mean_s"] == pytest.approx(statistics.fmean(r.first_token_s - r.start_s for r in ok))
    itl = [b - a for r in ok for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    assert s["itl_mean_s"] == pytest.approx(statistics.fmean(itl))
    assert s["itl_p99_s"] == pytest.approx(_pct(itl, 99))
    assert s["send_lag_max_s"] == pytest.approx(max(r.start_s - r.scheduled_s for r in records))
    for scale, key in ((1.0, "1x"), (0.5, "0.5x"), (2.0, "2x")):
        met = sum(r.status == "ok" and r.end_s - r.start_s <= scale * r.slo_s for r in records)
        assert s["slo_attainment_at"][key] == pytest.approx(met / len(records))
    assert s["slo_attainment"] == s["slo_attainment_at"]["1x"]
    by = summarize_by_task(records)
    assert sorted(by) == ["a", "b"]
    assert by["a"]["num_requests"] + by["b"]["num_requests"] == 200
    assert by["a"]["e2e_latency_mean_s"] == pytest.approx(
        statistics.fmean(r.end_s - r.start_s for r in ok if r.task == "a"))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/v1", "http://[::1]:9000",
                                 "http://127.3.2.1"])
def test_loopback_targets_accepted(url):
    assert loadgen.check_loopback(url) == url


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "https://api.openai.com", "http://0.0.0.0:8000",
                                 "http://[2001:db8::1]:80", "http://localhost.evil.com", "127.0.0.1:8000"])
def test_non_loopback_targets_refused(url):
    with pytest.raises(ValueError, match="loopback"):
        loadgen.check_loopback(url)
    with pytest.raises(ValueError, match="loopback"):
        loadgen.make_client(url)


def test_run_plan_refuses_a_client_aimed_elsewhere():
    cfg = loadgen.LoadConfig(max_requests=1)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://192.168.1.2") as client:
            await loadgen.run_plan(client, loadgen.plan_mix(_tasks(), cfg), cfg)

    with pytest.raises(ValueError, match="192.168.1.2"):
        asyncio.run(go())


def test_synthetic_plan_uses_paper_profiles():
    cfg = loadgen.LoadConfig(rate=5.0, duration_s=1e9, max_requests=400, seed=2)
    plan = loadgen.plan_synthetic(cfg, num_tasks=4, models=("m0", "m1"), max_prompt_tokens=4096, max_output_tokens=4096)
    from inlaid_ray.bench.workload import PAPER_PROFILES

    assert len(plan) == 400 and {p.body["model"] for p in plan} == {"m0", "m1"}
    for k, prof in enumerate(PAPER_PROFILES):  # task-000k is of kind k
        reqs = [p for p in plan if p.task == f"task-{k:04d}"]
        med_out = statistics.median(p.body["max_tokens"] for p in reqs)
        med_in = statistics.median(len(p.body["prompt"]) for p in reqs)
        # Task medians are the kind's medians x a log-normal jitter (sigma 0.3): within 3 sigma.
        assert math.exp(-1.2) < med_out / prof.output_median < math.exp(1.2)
        assert math.exp(-1.2) < med_in / prof.prompt_median < math.exp(1.2)
        assert all(p.body["ignore_eos"] and p.body["stream"] for p in reqs)


def test_demo_mix_uses_eval_prompts_and_length_ordered_slos():
    from inlaid_ray.demo import DEMO_TASKS, load_examples

    mix = demo_mix(slo_ttft_s=1.0, slo_per_token_s=0.1)
    assert [t.name for t in mix] == list(DEMO_TASKS)
    for t in mix:
        records = load_examples(t.name, "eval")
        assert t.prompts == tuple([{"role": "user", "content": r["prompt"]}] for r in records)
        assert t.max_tokens == DEMO_TASKS[t.name].max_new_tokens and t.path == loadgen.CHAT_PATH
        lengths = sorted(r["completion_tokens"] for r in records)
        # The SLO covers the task's long completions: between its median and its longest one.
        assert 1.0 + 0.1 * lengths[len(lengths) // 2] <= t.slo_s <= 1.0 + 0.1 * lengths[-1]
