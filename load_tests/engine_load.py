"""Drive an `LLMEngine` directly (no HTTP, no Ray) in real time under a generated multi-task
workload, recording `load_stats.RequestRecord`s, plus the calibration that gives each request
its isolated latency (the SLO reference) and the replica's capacity. Used by bench_engine_gpu.py.

A request ends at its drawn output length: the driver aborts it there, standing in for EOS, so
a policy never learns the true length through max_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inlaid_ray.bench.load_stats import RequestRecord
from inlaid_ray.engine import LLMEngine, SamplingParams
from inlaid_ray.bench.workload import WorkloadConfig, generate_workload


def _timed_generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, task: str) -> float:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(prompts, params, [task] * len(prompts))
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def calibrate(engine: LLMEngine, long_prompt: int, vocab: int, seed: int = 0) -> dict[str, float]:
    """Prefill cost a + b*p, decode step at batch 1 and at full batch (adapter task-0000, alone)."""
    rng = np.random.default_rng(seed + 99)
    prompt = lambda p: rng.integers(3, vocab, size=p).tolist()  # noqa: E731
    short, long_ = 64, long_prompt
    batch = min(engine.config.max_num_seqs, max(1, engine.config.max_num_batched_tokens // short))
    _timed_generate(engine, [prompt(short) for _ in range(batch)], 4, "task-0000")  # warm-up: compile kernels
    _timed_generate(engine, [prompt(long_)], 2, "task-0000")
    t_short = min(_timed_generate(engine, [prompt(short)], 1, "task-0000") for _ in range(3))
    t_long = min(_timed_generate(engine, [prompt(long_)], 1, "task-0000") for _ in range(2))
    b = max(t_long - t_short, 0.0) / (long_ - short)
    a = max(t_short - b * short, 0.0)
    steps = 32
    d1 = (_timed_generate(engine, [prompt(short)], steps + 1, "task-0000") - t_short) / steps
    t_batch = _timed_generate(engine, [prompt(short) for _ in range(batch)], steps + 1, "task-0000")
    d_batch = max(t_batch - (a + b * short * batch), d1) / steps
    return {"prefill_fixed_s": a, "prefill_per_token_s": b, "decode_step_batch1_s": d1,
            "decode_step_full_batch_s": d_batch, "full_batch": batch}


def isolated_latency(cal: dict[str, float], prompt_tokens: int, output_tokens: int) -> float:
    """Latency of the request alone on the replica: prefill + (output - 1) batch-1 decode steps."""
    return cal["prefill_fixed_s"] + cal["prefill_per_token_s"] * prompt_tokens + (output_tokens - 1) * cal["decode_step_batch1_s"]


def capacity_req_per_s(cal: dict[str, float], mean_prompt: float, mean_output: float) -> float:
    """Requests/s a saturated replica serves: prefill work plus its share of full-batch decode steps."""
    per_req = cal["prefill_per_token_s"] * mean_prompt + mean_output * cal["decode_step_full_batch_s"] / cal["full_batch"]
    return 1.0 / per_req


@dataclass(frozen=True)
class LoadRequest:
    index: int
    arrival_s: float
    task_index: int
    prompt: list[int]
    output_tokens: int
    predicted_output_len: float | None


def make_workload(wl: WorkloadConfig, vocab: int) -> tuple[list[LoadRequest], dict[str, float]]:
    """The requests of `wl` with random prompt token ids; arrival times are divided by `wl.rate`
    by the driver's caller (generate at rate 1, then any rate reuses the same draw)."""
    _, specs = generate_workload(wl)
    rng = np.random.default_rng(wl.seed + 7)
    reqs = [
        LoadRequest(i, s.arrival_time, int(s.task.split("-")[1]), rng.integers(3, vocab, size=s.prompt_tokens).tolist(),
                    s.output_tokens, s.predicted_output_len)
        for i, s in enumerate(specs)
    ]
    stats = {"mean_prompt_tokens": float(np.mean([len(r.prompt) for r in reqs])),
             "mean_output_tokens": float(np.mean([r.output_tokens for r in reqs]))}
    return reqs, stats


def drive(
    engine: LLMEngine, reqs: Sequence[LoadRequest], rate: float, num_adapters: int, cal: dict[str, float],
    timeout_s: float,
) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Feed `reqs` at `arrival_s / rate` in real time while stepping the engine; one record each."""
    clock = time.monotonic
    max_len = engine.max_model_len
    records = {f"r{r.index}": RequestRecord(r.index, f"task-{r.task_index % num_adapters:04d}", r.arrival_s / rate)
               for r in reqs}
    target = {f"r{r.index}": r.output_tokens for r in reqs}
    for r in reqs:
        rec = records[f"r{r.index}"]
        rec.start_s, rec.num_prompt_tokens = rec.scheduled_s, len(r.prompt)  # latency counts from arrival
        rec.slo_s = isolated_latency(cal, len(r.prompt), r.output_tokens)
    pending = sorted(reqs, key=lambda r: r.arrival_s)
    nxt, tasks_per_step, seqs_per_step, step_s, generated = 0, [], [], [], 0
    t0 = clock()
    while nxt < len(pending) or engine.has_unfinished():
        now = clock() - t0
        if now > timeout_s:
            engine.abort_all()
            break
        while nxt < len(pending) and pending[nxt].arrival_s / rate <= now:
            r = pending[nxt]
            rec = records[f"r{r.index}"]
            params = SamplingParams(max_tokens=max_len - len(r.prompt), ignore_eos=True)
            engine.add_request(r.prompt, params, rec.task, f"r{r.index}", r.predicted_output_len, t0 + rec.scheduled_s)
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[nxt].arrival_s / rate - (clock() - t0)))
            continue
        ts = clock()
        outs = engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        now = clock() - t0
        step_s.append(clock() - ts)
        st = engine.stats()
        tasks_per_step.append(st.last_step_num_adapters)
        seqs_per_step.append(st.last_step_num_seqs)
        generated += sum(len(o.token_ids) for o in outs)
        for out in outs:
            rec = records[out.request_id]
            if out.token_ids:
                rec.token_times_s.append(now)
                rec.first_token_s = rec.first_token_s if rec.first_token_s is not None else now
                rec.num_output_tokens = out.num_completion_tokens
            done = out.finished or rec.num_output_tokens >= target[out.request_id]
            if done and rec.status == "pending":
                if not out.finished:
                    engine.abort(out.request_id)  # its drawn length is reached: stands in for EOS
                rec.end_s, rec.status = now, "ok"
                rec.finish_reason = out.finish_reason or "length (drawn output length)"
    wall = clock() - t0
    for rec in records.values():
        if rec.status == "pending":
            rec.status, rec.error = "cancelled", f"run cut at {timeout_s:.1f}s"
    steps = {
        # Every token sampled (finished, unfinished and cut requests): the service rate of an
        # overloaded replica, comparable across runs even when a run is cut.
        "generated_tokens": generated,
        "run_wall_s": wall,
        "generated_tokens_per_s": generated / wall if wall > 0 else None,
        "num_steps": len(step_s),
        "step_mean_s": float(np.mean(step_s)) if step_s else None,
        "tasks_per_step_mean": float(np.mean(tasks_per_step)) if tasks_per_step else None,
        "tasks_per_step_std": float(np.std(tasks_per_step)) if tasks_per_step else None,
        "batch_seqs_mean": float(np.mean(seqs_per_step)) if seqs_per_step else None,
        "num_preemptions": engine.stats().num_preemptions,
    }
    return list(records.values()), steps
