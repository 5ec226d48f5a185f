"""Serving metrics of a simulated run, with every definition explicit (docs/algorithms.md 8 and
item 20 of section 11):

- e2e latency = JCT = finish time - arrival time (s); mean and p99.
- normalized latency = e2e latency / output tokens (s per token); mean and p99.
- TTFT = time of the first output token - arrival time.
- SLO of a request = `m x` its isolated latency (same lengths alone on the replica under the
  run's cost model); attainment = fraction of requests with e2e latency <= SLO, for each m.
  Latency statistics and the attainment rule are bench/load_stats.py's (one definition).
- throughput = output tokens (and requests) / (last finish - first arrival).
- tasks per step = distinct tasks among the requests scheduled in a step (mean, std).
- max wait = the longest total time any request spent in the waiting queue (arrival and
  after preemptions); max queue delay = the longest first-schedule - arrival.
"""

from __future__ import annotations

import numpy as np

from inlaid_ray.bench.load_stats import latency_stats, slo_attainment
from inlaid_ray.bench.simulator import SimResult

SLO_MULTIPLES = (2.0, 5.0, 10.0)


def summarize(result: SimResult, slo_multiples: tuple[float, ...] = SLO_MULTIPLES) -> dict:
    """Metrics of one run as a flat JSON-ready dict (see module docstring for definitions)."""
    jobs = result.jobs
    if not jobs:
        return {"num_requests": 0}
    arrival = np.array([j.arrival_time for j in jobs])
    finish = np.array([j.finish_time for j in jobs], dtype=np.float64)
    out = np.array([j.num_output_tokens for j in jobs], dtype=np.float64)
    e2e = finish - arrival
    ttft = np.array([j.first_token_time for j in jobs]) - arrival
    iso = np.array([result.cost.isolated_latency(j.num_prompt_tokens, j.num_output_tokens, j.task is not None) for j in jobs])
    span = float(finish.max() - arrival.min())
    tasks_per_step = np.array([s.distinct_tasks for s in result.steps], dtype=np.float64)
    m: dict = {
        "policy": result.policy,
        "num_requests": len(jobs),
        "makespan_s": span,
        "throughput_tokens_per_s": float(out.sum() / span),
        "throughput_req_per_s": float(len(jobs) / span),
        **latency_stats(e2e, "e2e_latency"),
        "jct_mean_s": float(e2e.mean()),
        "norm_latency_mean_s_per_token": float((e2e / out).mean()),
        "norm_latency_p99_s_per_token": float(np.percentile(e2e / out, 99)),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tasks_per_step_mean": float(tasks_per_step.mean()),
        "tasks_per_step_std": float(tasks_per_step.std()),
        "batch_seqs_mean": float(np.mean([s.num_seqs for s in result.steps])),
        "max_wait_s": float(max(j.waited_s for j in jobs)),
        "max_queue_delay_s": float(max(j.first_scheduled - j.arrival_time for j in jobs)),
        "preemptions": int(sum(j.num_preemptions for j in jobs)),
        "recomputed_tokens": int(sum(j.recomputed_tokens for j in jobs)),
        "adapter_loads": int(sum(s.adapter_loads for s in result.steps)),
        "num_steps": len(result.steps),
    }
    for k in slo_multiples:
        m[f"slo_attainment_{k:g}x"] = slo_attainment(e2e.tolist(), iso.tolist(), k)
    return m
