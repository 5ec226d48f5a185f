"""The discrete-event simulator: work conservation (exact token counts, recompute accounted),
preemption under tight KV, aging bound in a full run, cost-model consistency, determinism."""

from __future__ import annotations

import pytest

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.sched import make_policy
from inlaid_ray.sched.cost_model import StepCostModel
from inlaid_ray.bench.sim_metrics import summarize
from inlaid_ray.bench.simulator import ReplicaConfig, Simulator
from inlaid_ray.bench.workload import RequestSpec, WorkloadConfig, generate_workload

POLICIES = ["fifo", "mlfq", "srtf-cost"]
TIGHT = ReplicaConfig(max_num_seqs=16, max_num_batched_tokens=1024, num_blocks=120, block_size=16)


def small_workload(seed: int = 0, n: int = 150, rate: float = 200.0, tasks: int = 12) -> list[RequestSpec]:
    cfg = WorkloadConfig(num_tasks=tasks, num_requests=n, rate=rate, seed=seed, max_prompt_tokens=400, max_output_tokens=300)
    return generate_workload(cfg)[1]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("replica", [ReplicaConfig(), TIGHT], ids=["roomy", "tight-kv"])
def test_simulator_conserves_work(policy, replica):
    specs = small_workload()
    res = Simulator(make_policy(policy), replica).run(specs)
    by_id = {s.request_id: s for s in specs}
    assert sorted(j.request_id for j in res.jobs) == sorted(by_id)
    for j in res.jobs:
        assert j.num_output_tokens == by_id[j.request_id].output_tokens
        assert j.blocks == 0 and j.finish_time >= j.first_token_time >= j.arrival_time
    # every step feeds prompt (+ recomputed) tokens once, then one token per decode
    expected = sum(s.prompt_tokens + s.output_tokens - 1 for s in specs) + sum(j.recomputed_tokens for j in res.jobs)
    assert res.processed_tokens == expected
    assert res.generated_tokens == sum(s.output_tokens for s in specs)
    assert sum(s.batch_tokens for s in res.steps) == res.processed_tokens
    assert max(s.num_seqs for s in res.steps) <= replica.max_num_seqs
    assert max(s.batch_tokens for s in res.steps) <= replica.max_num_batched_tokens


@pytest.mark.parametrize("policy", POLICIES)
def test_tight_kv_forces_preemption_and_recompute(policy):
    res = Simulator(make_policy(policy), TIGHT).run(small_workload())
    preempted = [j for j in res.jobs if j.num_preemptions]
    assert preempted, "the tight replica should have run out of blocks"
    assert all(j.recomputed_tokens >= j.num_prompt_tokens for j in preempted)


def test_aging_bounds_the_wait_of_a_long_request_under_a_stream_of_short_ones():
    """One seat; short requests keep arriving faster than they are served; SRTF alone would
    serve the long request last. With aging it starts within its bound plus one short job."""
    cost = StepCostModel()
    short = [RequestSpec(f"s{i:03d}", "a", 0.002 * i, 8, 4, 1000, 4.0) for i in range(400)]
    long = RequestSpec("long", "b", 0.005, 8, 50, 1000, 50.0)
    replica = ReplicaConfig(max_num_seqs=1)
    bound = 0.3
    short_service = cost.isolated_latency(8, 4) + cost.step_time(8, 1, 8)
    fixed = {"starvation_rule": "median", "starvation_latency_multiple": 0.0}  # a fixed bound, not 10x the median
    res = Simulator(make_policy("srtf-cost", starvation_s=bound, **fixed), replica, cost).run(short + [long])
    waited = next(j for j in res.jobs if j.request_id == "long").first_scheduled - long.arrival_time
    assert waited <= bound + short_service
    res = Simulator(make_policy("srtf-cost", starvation_s=1e9, **fixed), replica, cost).run(short + [long])
    starved = next(j for j in res.jobs if j.request_id == "long").first_scheduled - long.arrival_time
    assert starved > bound + short_service  # the bound is what made the difference


def test_isolated_rule_serves_overdue_requests_by_deadline():
    """The isolated rule gives each request its own deadline, arrival + k x its isolated latency
    (not a fixed or median-based bound); overdue requests run earliest deadline first. Under
    this overload every request becomes overdue, so the long request starts after exactly the
    short ones with earlier deadlines, before every later one."""
    cost = StepCostModel()
    short = [RequestSpec(f"s{i:03d}", "a", 0.002 * i, 8, 4, 1000, 4.0) for i in range(400)]
    long = RequestSpec("long", "b", 0.005, 8, 50, 1000, 50.0)
    k = 4.0
    policy = make_policy("srtf-cost", starvation_rule="isolated", starvation_isolated_multiple=k, starvation_min_s=0.0,
                         batching="marginal_cost")
    res = Simulator(policy, ReplicaConfig(max_num_seqs=1), cost).run(short + [long])
    deadline = {r.request_id: r.arrival_time + k * cost.isolated_latency(8, r.output_tokens) for r in short + [long]}
    start = {j.request_id: j.first_scheduled for j in res.jobs}
    later = [r for r in deadline if deadline[r] > deadline["long"]]
    assert later and all(start[r] > start["long"] for r in later)
    earlier_shorts = [r for r in deadline if deadline[r] < deadline["long"] - 0.01]  # margin: one step
    assert all(start[r] < start["long"] for r in earlier_shorts if start[r] > deadline[r])  # the overdue ones


def test_isolated_latency_equals_a_simulated_lone_request():
    cost = StepCostModel()
    spec = RequestSpec("solo", "t", 0.0, 300, 40, 1000, None)
    res = Simulator(make_policy("fifo"), ReplicaConfig(), cost).run([spec])
    assert res.jobs[0].finish_time - spec.arrival_time == pytest.approx(cost.isolated_latency(300, 40))


def test_adapter_slots_count_loads_lru():
    specs = [RequestSpec(f"r{i}", f"t{i % 3}", float(i), 4, 1, 10, None) for i in range(6)]
    res = Simulator(make_policy("fifo"), ReplicaConfig(adapter_slots=2)).run(specs)
    # one request at a time cycling t0, t1, t2 through 2 LRU slots: every request misses
    assert sum(s.adapter_loads for s in res.steps) == 6
    res = Simulator(make_policy("fifo"), ReplicaConfig(adapter_slots=3)).run(specs)
    assert sum(s.adapter_loads for s in res.steps) == 3


def test_same_seed_same_result_and_metrics_are_finite():
    a = summarize(Simulator(make_policy("srtf-cost"), TIGHT).run(small_workload(seed=3)))
    b = summarize(Simulator(make_policy("srtf-cost"), TIGHT).run(small_workload(seed=3)))
    assert a == b
    assert 0.0 <= a["slo_attainment_5x"] <= a["slo_attainment_10x"] <= 1.0
    assert a["e2e_latency_p99_s"] >= a["e2e_latency_p50_s"] > 0


def test_requests_that_cannot_fit_are_rejected_with_their_sizes():
    spec = RequestSpec("huge", "t", 0.0, 2000, 10, 100, None)
    with pytest.raises(InvalidRequest, match="huge: prompt 2000"):
        Simulator(make_policy("fifo"), TIGHT).run([spec])
