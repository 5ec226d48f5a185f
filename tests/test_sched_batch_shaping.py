"""The inlaid default's cost-priced batching and grouping (sched/policies/batch_shaping.py):
the join rule against its formula, work conservation whenever the cost model makes batching
pay, task identity mattering only through the adapter terms, the residency mirror against the
simulator's LRU, and fewer adapter loads than FIFO when loads are expensive."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import replace

import pytest

from inlaid_ray.sched import FifoPolicy, SrtfCostPolicy, StepBudget, make_policy, plan_step
from inlaid_ray.sched.admission import blocks_for, prefill_tokens
from inlaid_ray.sched.cost_model import StepCostModel
from inlaid_ray.sched.policies.batch_shaping import AdapterResidency
from inlaid_ray.bench.simulator import ReplicaConfig, SimJob, Simulator
from inlaid_ray.bench.workload import RequestSpec

# attention reads dominate a step: long-context requests are worth deferring behind short ones
COST_RULE = {"batching": "marginal_cost"}  # the join rule at every load (the default applies it only when full)
ATTENTION_HEAVY = StepCostModel(a_s=1e-3, b_s_per_token=0.0, c_s_per_adapter=0.0, d_s_per_kv_token=1e-5, e_s_per_adapter_load=0.0)


def job(rid: str, task: str | None = "t0", arrival: float = 0.0, p: int = 10, g: int = 0, pred: float = 50.0) -> SimJob:
    return SimJob(rid, task, arrival, arrival, p, g, 1000, pred, target_output_tokens=1000)


def budget(seqs: int = 64, free: int = 10_000, now: float = 0.0) -> StepBudget:
    return StepBudget(max_num_seqs=seqs, max_num_batched_tokens=100_000, num_free_blocks=free, block_size=16, now=now)


def ids(rs) -> list[str]:
    return [r.request_id for r in rs]


def joins(cost: StepCostModel, y: SimJob, batch: list[SimJob], queued: int, new_task: bool) -> bool:
    """The rule of batch_shaping.py, written out for one candidate (no adapter load)."""
    rem = lambda r: r.predicted_output_len - r.num_output_tokens  # noqa: E731
    m = min(rem(y), max(rem(x) for x in batch))
    w = cost.b_s_per_token + cost.d_s_per_kv_token * (y.num_prompt_tokens + y.num_output_tokens + m / 2)
    w += cost.c_s_per_adapter if new_task else 0.0
    return w * (sum(min(rem(x), rem(y)) for x in batch) - queued * m) <= cost.a_s * m


@pytest.mark.parametrize("queued", [0, 2, 8])
def test_long_context_request_joins_exactly_when_the_rule_says(queued):
    running = [job(f"r{i}", g=1, pred=40 + i) for i in range(4)]
    y = job("y", p=1500, pred=60, arrival=1.0)  # shorter than nothing running: ranked last but one group
    behind = [job(f"q{i}", p=10, g=1, pred=500 + i, arrival=2.0) for i in range(queued)]  # running, ranked after y
    pol = SrtfCostPolicy(cost=ATTENTION_HEAVY, **COST_RULE)
    plan = plan_step(pol, [y], running + behind, budget())
    expected = joins(ATTENTION_HEAVY, y, running, queued, new_task=False)
    assert ("y" in ids(plan.scheduled)) == expected
    assert set(ids(running)) <= set(ids(plan.scheduled))  # shorter running requests are never paused for y
    if queued == 0:
        assert not expected  # the case worth testing: alone behind the batch it waits
    if queued == 8:
        assert expected  # running requests behind it would share its steps later anyway: it runs now


@pytest.mark.parametrize("queue_term, joins_now", [("running", False), ("all", True), ("off", False)])
def test_waiting_requests_behind_count_only_under_queue_term_all(queue_term, joins_now):
    """Eight *waiting* requests ranked behind y: at overload they still wait when y's deferred
    steps come, so the default rule does not count them (y waits, as with nobody behind it)."""
    running = [job(f"r{i}", g=1, pred=40 + i) for i in range(4)]
    y = job("y", p=1500, pred=60, arrival=1.0)
    behind = [job(f"q{i}", p=10, pred=500 + i, arrival=2.0) for i in range(8)]
    assert not joins(ATTENTION_HEAVY, y, running, 0, new_task=False) and joins(ATTENTION_HEAVY, y, running, 8, new_task=False)
    plan = plan_step(SrtfCostPolicy(cost=ATTENTION_HEAVY, queue_term=queue_term, **COST_RULE), [y] + behind, running, budget())
    assert ("y" in ids(plan.scheduled)) == joins_now
    with pytest.raises(ValueError, match="queue_term"):
        SrtfCostPolicy(queue_term="sometimes")


def test_paused_long_request_keeps_its_blocks_and_resumes_when_the_batch_drains():
    pol = SrtfCostPolicy(cost=ATTENTION_HEAVY, starvation_latency_multiple=0.0, **COST_RULE)
    long = job("long", p=1500, g=10, pred=800)
    shorts = [job(f"s{i}", g=1, pred=30) for i in range(3)]
    assert not joins(ATTENTION_HEAVY, long, shorts, 0, new_task=False)
    plan = plan_step(pol, [], shorts + [long], budget())
    assert ids(plan.paused) == ["long"] and not plan.preempted  # paused, not evicted
    plan = plan_step(pol, [], [long], budget(now=0.1))
    assert ids(plan.scheduled) == ["long"]


def _fits_left(r, plan, b: StepBudget, running_ids: set[str]) -> bool:
    """Whether r could still be added to `plan` (seats, tokens, blocks after the plan)."""
    seats = b.max_num_seqs - len(plan.scheduled)
    tokens = b.max_num_batched_tokens - plan.num_batched_tokens
    free = b.num_free_blocks - plan.blocks_allocated + plan.blocks_freed
    n = prefill_tokens(r)
    if r.request_id in running_ids:
        return seats >= 1 and tokens >= 1 and free >= blocks_for(n, b.block_size) - blocks_for(n - 1, b.block_size)
    return seats >= 1 and tokens >= n and free >= blocks_for(n, b.block_size)


@pytest.mark.parametrize("batching", ["cost_when_full", "marginal_cost"])
@pytest.mark.parametrize("seed", range(25))
def test_default_leaves_no_seat_idle_when_batching_pays(seed, batching):
    """When a step's fixed cost dominates the per-request terms (the default H100 model's
    regime for short contexts), the cost rule too is work-conserving: no request that fits is left
    waiting or paused, whatever the tasks, lengths and predictions."""
    rng = random.Random(seed)
    cost = StepCostModel(a_s=1.0, b_s_per_token=1e-6, c_s_per_adapter=1e-6, d_s_per_kv_token=1e-8)
    pol = SrtfCostPolicy(cost=cost, adapter_slots=rng.choice([None, 2]), starvation_latency_multiple=0.0,
                         batching=batching)
    running = [job(f"r{i}", task=f"t{rng.randrange(6)}", p=rng.randint(1, 60), g=rng.randint(1, 30),
                   pred=rng.uniform(1, 300)) for i in range(rng.randint(0, 10))]
    waiting = [job(f"w{i}", task=rng.choice([None, *(f"t{k}" for k in range(6))]), p=rng.randint(1, 200),
                   arrival=rng.uniform(0, 5), pred=rng.uniform(1, 300)) for i in range(rng.randint(1, 25))]
    b = StepBudget(rng.choice([4, 8, 32]), rng.choice([64, 256, 4096]), rng.randint(0, 80), 16, 5.0)
    held = sum(blocks_for(prefill_tokens(r) - 1, 16) for r in running)
    b = replace(b, num_free_blocks=b.num_free_blocks + held)  # room for what running requests hold
    plan = plan_step(pol, waiting, running, b)
    running_ids = {r.request_id for r in running}
    left = [r for r in waiting + running if r.request_id not in set(ids(plan.scheduled)) | set(ids(plan.preempted))]
    assert not [r.request_id for r in left if _fits_left(r, plan, b, running_ids)]


def test_default_runs_everyone_while_everyone_fits_and_prices_admissions_beyond():
    """The default applies the join rule only when more requests are ready than the step can
    take: y, which the rule would defer, runs at once while there are seats for all; with one
    seat short it waits exactly as under the rule (a request too few to fit does not change
    who runs among those that do)."""
    running = [job(f"r{i}", g=1, pred=40 + i) for i in range(4)]
    y = job("y", p=1500, pred=60, arrival=1.0)
    assert not joins(ATTENTION_HEAVY, y, running, 0, new_task=False)
    default = SrtfCostPolicy(cost=ATTENTION_HEAVY)
    assert "y" in ids(plan_step(default, [y], running, budget()).scheduled)
    extra = job("z", p=10, pred=900, arrival=2.0)  # 4 running + y + z: six requests for five seats
    full = plan_step(SrtfCostPolicy(cost=ATTENTION_HEAVY), [y, extra], running, budget(seqs=5))
    rule = plan_step(SrtfCostPolicy(cost=ATTENTION_HEAVY, **COST_RULE), [y, extra], running, budget(seqs=5))
    assert "y" not in ids(full.scheduled) and ids(full.scheduled) == ids(rule.scheduled)


@pytest.mark.parametrize("seed", range(40))
def test_default_schedules_everyone_whenever_everyone_fits(seed):
    """Random states, watermark included: when every running and waiting request fits the step
    (checked here by admitting them all in a plain loop, the reference), the default runs them
    all, however the cost rule would have priced them."""
    rng = random.Random(seed)
    running = [job(f"r{i}", task=f"t{rng.randrange(4)}", p=rng.randint(1, 60), g=rng.randint(1, 30),
                   pred=rng.uniform(1, 600)) for i in range(rng.randint(0, 6))]
    waiting = [job(f"w{i}", task=f"t{rng.randrange(4)}", p=rng.randint(1, 600), arrival=rng.uniform(0, 5),
                   pred=rng.uniform(1, 600)) for i in range(rng.randint(1, 6))]
    held = sum(blocks_for(prefill_tokens(r) - 1, 16) for r in running)
    b = StepBudget(rng.choice([8, 12]), rng.choice([512, 4096]), held + rng.randint(0, 150), 16, 5.0,
                   reserve_blocks=rng.choice([0, 4]))
    free, tokens, holders, fits = b.num_free_blocks, b.max_num_batched_tokens, len(running), True
    for r in running:  # decode growth first, then every prefill under the watermark
        free -= blocks_for(prefill_tokens(r), 16) - blocks_for(prefill_tokens(r) - 1, 16)
        tokens -= 1
    for r in waiting:
        need = blocks_for(prefill_tokens(r), 16)
        fits &= free - (b.reserve_blocks if holders else 0) >= need and tokens >= prefill_tokens(r)
        free, tokens, holders = free - need, tokens - prefill_tokens(r), holders + 1
    fits &= free >= 0 and len(running) + len(waiting) <= b.max_num_seqs
    plan = plan_step(SrtfCostPolicy(cost=ATTENTION_HEAVY), waiting, running, b)
    if fits:
        assert sorted(ids(plan.scheduled)) == sorted(ids(running + waiting))


def test_task_identity_matters_only_through_the_adapter_terms():
    running = [job(f"r{i}", task="a", g=1, pred=40) for i in range(4)]
    same = job("y", task="a", p=100, pred=60, arrival=1.0)
    other = job("y", task="b", p=100, pred=60, arrival=1.0)
    # c = 0: the task of y changes nothing
    no_c = replace(ATTENTION_HEAVY, d_s_per_kv_token=1e-7)
    assert ids(plan_step(SrtfCostPolicy(cost=no_c, **COST_RULE), [same], running, budget()).scheduled) == ids(
        plan_step(SrtfCostPolicy(cost=no_c, **COST_RULE), [other], running, budget()).scheduled)
    # c > 0: a request of a task already in the batch joins where one of a new task waits
    with_c = replace(no_c, c_s_per_adapter=5e-4)
    assert joins(with_c, same, running, 0, new_task=False) and not joins(with_c, other, running, 0, new_task=True)
    assert "y" in ids(plan_step(SrtfCostPolicy(cost=with_c, **COST_RULE), [same], running, budget()).scheduled)
    assert "y" not in ids(plan_step(SrtfCostPolicy(cost=with_c, **COST_RULE), [other], running, budget()).scheduled)
    # ... and the ablation without adapter terms treats both alike
    off = SrtfCostPolicy(cost=with_c, grouping="off", **COST_RULE)
    assert "y" in ids(plan_step(off, [other], running, budget()).scheduled)


def _simulator_lru(resident: OrderedDict, tasks: set[str], slots: int) -> None:
    Simulator(FifoPolicy(), ReplicaConfig(adapter_slots=slots))._touch_adapters(resident, tasks)


def test_residency_mirror_matches_the_simulator_lru():
    rng = random.Random(0)
    mirror, resident = AdapterResidency(3), OrderedDict()
    for _ in range(200):
        tasks = {f"t{rng.randrange(7)}" for _ in range(rng.randint(1, 4))}
        expected_loads = sum(t not in resident for t in tasks)
        assert sum(mirror.needs_load(t) for t in tasks) == expected_loads
        _simulator_lru(resident, tasks, 3)
        mirror.touch(tasks | {None})
        assert {f"t{k}" for k in range(7) if f"t{k}" in mirror} == set(resident)
    assert not AdapterResidency(None).needs_load("t0")


def test_swap_aware_ranking_loads_fewer_adapters_than_fifo():
    """Two seats, two adapter slots, four tasks interleaved in a burst of equal requests,
    loads expensive: FIFO reloads at every turn; inlaid finishes resident tasks first."""
    cost = replace(StepCostModel(), e_s_per_adapter_load=0.05)
    replica = ReplicaConfig(max_num_seqs=2, adapter_slots=2)
    specs = [RequestSpec(f"r{i:02d}", f"t{i % 4}", 0.001 * i, 8, 20, 100, 20.0) for i in range(16)]
    loads, jct = {}, {}
    for name, kwargs in [("fifo", {}), ("srtf-cost", {"cost": cost, "adapter_slots": 2})]:
        res = Simulator(make_policy(name, **kwargs), replica, cost).run(specs)
        loads[name] = sum(s.adapter_loads for s in res.steps)
        jct[name] = sum(j.finish_time - j.arrival_time for j in res.jobs) / len(res.jobs)
    assert loads["fifo"] == len(specs)  # every pair of requests brings two new adapters
    assert loads["srtf-cost"] == 4  # each task loaded once
    assert jct["srtf-cost"] < jct["fifo"]
