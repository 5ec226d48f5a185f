"""The HTTP load driver's pure parts (inlaid_ray.demo.load_driver, inlaid_ray.bench.http_report) on fake results:
variant expansion, the same seeded plan for every rate, engine-sample and Prometheus-delta
statistics, and the result table / inlaid-vs-baseline ratios against `load_stats.summarize` of
the same records. No server, no timing."""

from __future__ import annotations


import pytest


from inlaid_ray.demo.load_driver import DriverConfig, build_plans, demo_mix
from inlaid_ray.bench.http_report import (
    Variant, expand_variants, histogram_delta, histogram_totals, policy_comparison, result_rows,
    summarize_engine_samples,
)
from inlaid_ray.bench.load_stats import RequestRecord, summarize

from inlaid_ray.serve.metrics import ServeMetrics


def test_expand_variants_is_the_product_grouped_by_base():
    got = expand_variants(("fifo", "mlfq", "srtf-cost"), (False, True), (False,))
    assert [v.name for v in got] == ["fifo", "mlfq", "srtf-cost", "fifo+q4", "mlfq+q4", "srtf-cost+q4"]
    both = expand_variants(("srtf-cost",), (False, True), (False, True))
    assert {(v.quantized, v.compressed) for v in both} == {(q, c) for q in (False, True) for c in (False, True)}
    assert len(both) == 4 and [v.name for v in both] == ["srtf-cost", "srtf-cost+jd", "srtf-cost+q4", "srtf-cost+q4+jd"]
    with pytest.raises(ValueError, match="lottery"):
        expand_variants(("lottery",), (False,), (False,))


def test_every_rate_gets_the_same_task_and_prompt_sequence_time_scaled():
    cfg = DriverConfig(rates=(0.5, 2.0), duration_s=1e6, max_requests=12, max_tokens=16)
    mix = demo_mix(cfg.slo_ttft_s, cfg.slo_per_token_s, ("sentiment", "email"), cfg.max_tokens)
    assert all(t.max_tokens <= 16 for t in mix)
    assert all(t.slo_s <= cfg.slo_ttft_s + cfg.slo_per_token_s * 16 for t in mix)
    plans = build_plans(cfg, mix)
    slow, fast = plans[0.5], plans[2.0]
    assert len(slow) == len(fast) == 12
    assert [(p.task, p.body["messages"]) for p in slow] == [(p.task, p.body["messages"]) for p in fast]
    for a, b in zip(slow, fast):  # arrival offsets scale with 1 / rate
        assert a.arrival_s == pytest.approx(4.0 * b.arrival_s)
    assert build_plans(cfg, mix)[0.5] == slow  # seeded: the next variant sends exactly this


def test_engine_samples_average_tasks_per_step_over_busy_samples():
    samples = [
        {"running": 0, "waiting": 0, "distinct_adapters_last_step": 0, "kv_usage": 0.0},
        {"running": 3, "waiting": 2, "distinct_adapters_last_step": 2, "kv_usage": 0.2},
        {"running": 4, "waiting": 5, "distinct_adapters_last_step": 3, "kv_usage": 0.5},
        {"running": 1, "waiting": 0, "distinct_adapters_last_step": 1, "kv_usage": 0.1},
    ]
    s = summarize_engine_samples(samples)
    busy = samples[1:]
    assert s["busy_samples"] == 3 and s["num_samples"] == 4
    assert s["tasks_per_step_mean"] == pytest.approx(sum(x["distinct_adapters_last_step"] for x in busy) / 3)
    assert s["tasks_per_step_max"] == 3 and s["tasks_per_step_hist"] == {"1": 1, "2": 1, "3": 1}
    assert s["waiting_max"] == 5 and s["kv_usage_max"] == 0.5
    assert summarize_engine_samples([])["tasks_per_step_mean"] is None


def test_queue_time_delta_from_the_routers_metrics_exposition():
    metrics = ServeMetrics()
    obs = {"a": [0.5, 1.5], "b": [2.0]}

    def record(task, q):
        metrics.record_finished(task, "stop", 10, 5, 3.0, 0.4, q, None, None)

    record("a", 4.0)  # before the run
    before = histogram_totals(metrics.exposition().decode())
    for task, qs in obs.items():
        for q in qs:
            record(task, q)
    delta = histogram_delta(before, histogram_totals(metrics.exposition().decode()))
    assert delta["count"] == 3
    assert delta["mean_s"] == pytest.approx((0.5 + 1.5 + 2.0) / 3)
    assert delta["by_task"]["a"] == {"count": 2, "mean_s": pytest.approx(1.0)}
    assert delta["by_task"]["b"]["count"] == 1


def _records(seed: int, n: int, slow: float) -> list[RequestRecord]:
    """Deterministic fake records: e2e grows with `slow`, one failure, SLO 5 s."""
    out = []
    for i in range(n):
        r = RequestRecord(i, "email" if i % 2 else "sentiment", i * 1.0, start_s=i * 1.0, slo_s=5.0)
        r.first_token_s = r.start_s + 0.1 * (1 + seed)
        r.end_s = r.start_s + slow * (1 + i % 3)
        r.token_times_s = [r.first_token_s, r.end_s]
        r.num_output_tokens = 2 + i % 4
        r.status = "error" if i == n - 1 else "ok"
        out.append(r)
    return out


def test_result_rows_and_comparison_follow_the_run_summaries():
    records = {("fifo", 1.0): _records(0, 8, 3.0), ("srtf-cost", 1.0): _records(1, 8, 1.5),
               ("mlfq", 1.0): _records(2, 8, 2.0), ("fifo", 2.0): _records(3, 6, 4.0), ("srtf-cost", 2.0): _records(4, 6, 2.5)}
    variants = []
    for policy in ("fifo", "mlfq", "srtf-cost"):
        v = Variant(policy)
        runs = [{"rate": rate, "summary": summarize(recs), "engine": {"tasks_per_step_mean": 1.5},
                 "queue_time": {"mean_s": 0.25}} for (p, rate), recs in records.items() if p == policy]
        variants.append({"name": v.name, "policy": policy, "quantized": False, "compressed": False,
                         "status": "ok", "runs": runs})
    variants.append({"name": "fifo+jd", "policy": "fifo", "quantized": False, "compressed": True,
                     "status": "not_runnable", "reason": "x", "runs": []})
    rows = result_rows(variants)
    assert len(rows) == len(records)  # the not-runnable variant adds none
    for row in rows:
        ref = summarize(records[(row["policy"], row["rate"])])
        assert row["throughput_tokens_per_s"] == ref["throughput_tokens_per_s"]
        assert row["latency_mean_s"] == ref["e2e_latency_mean_s"] and row["latency_p99_s"] == ref["e2e_latency_p99_s"]
        assert row["slo_attainment"] == ref["slo_attainment"] and row["num_ok"] == ref["num_ok"]
        assert row["tasks_per_step_mean"] == 1.5 and row["queue_time_mean_s"] == 0.25
    cmp = policy_comparison(rows)
    assert {(c["rate"], c["baseline"]) for c in cmp} == {(1.0, "fifo"), (1.0, "mlfq"), (2.0, "fifo")}
    by = {(c["rate"], c["baseline"]): c for c in cmp}
    ref_i, ref_f = summarize(records[("srtf-cost", 1.0)]), summarize(records[("fifo", 1.0)])
    assert by[(1.0, "fifo")]["jct_ratio"] == pytest.approx(ref_i["jct_mean_s"] / ref_f["jct_mean_s"])
    assert by[(1.0, "fifo")]["jct_ratio"] < 1  # the faster fake inlaid run is reported as better
