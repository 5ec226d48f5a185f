"""Scheduling policies on hand-built queues: SRTF order and re-estimation, the paper's task
grouping cap (ablation), aging, skip-join MLFQ placement/demotion/pausing, preemption victims
and FIFO head-of-line blocking. The inlaid default's cost-priced batching and grouping are in
test_sched_batch_shaping.py."""

from __future__ import annotations

import math

import numpy as np

import pytest

from inlaid_ray.sched import FifoPolicy, SrtfCostPolicy, MlfqPolicy, StepBudget, make_policy, plan_step
from inlaid_ray.sched.admission import held_blocks
from inlaid_ray.sched.policies import SrtfCostConfig, MlfqConfig
from inlaid_ray.bench.simulator import SimJob

# the paper's variant: hard cap of beta tasks per step, work-conserving admission order, fixed bound
PAPER = {"batching": "all", "grouping": "hard_cap", "starvation_rule": "median", "starvation_latency_multiple": 0.0}
MEDIAN = {"starvation_rule": "median"}  # the 30 s / 10x median aging bound: nothing here ages


def job(rid: str, task: str | None = "t0", arrival: float = 0.0, p: int = 10, g: int = 0, pred: float | None = 50.0,
        max_tokens: int = 1000, wait_start: float | None = None) -> SimJob:
    return SimJob(rid, task, arrival, arrival if wait_start is None else wait_start, p, g, max_tokens, pred, target_output_tokens=max_tokens)


def budget(now: float = 0.0, seqs: int = 64, tokens: int = 4096, free: int = 1000, bs: int = 16) -> StepBudget:
    return StepBudget(max_num_seqs=seqs, max_num_batched_tokens=tokens, num_free_blocks=free, block_size=bs, now=now)


def ids(rs) -> list[str]:
    return [r.request_id for r in rs]


# -- inlaid: SRTF --------------------------------------------------------------------------------


def test_srtf_ranks_running_and_waiting_together_by_predicted_remaining():
    running = [job("r1", g=5, pred=100), job("r2", g=30, pred=40)]
    waiting = [job("w1", arrival=1, pred=80), job("w2", arrival=2, pred=20), job("w3", arrival=3, pred=60)]
    rem = lambda r: r.predicted_output_len - r.num_output_tokens  # noqa: E731
    # the cost rule: one ranking (SRTF preempts by pausing); all of them are worth batching here
    order = SrtfCostPolicy(batching="marginal_cost", **MEDIAN).order(waiting, running, budget(now=5))
    assert ids(order) == ids(sorted(running + waiting, key=rem))
    # admission order only: running requests first, then waiting ones
    order = SrtfCostPolicy(batching="all", **MEDIAN).order(waiting, running, budget(now=5))
    assert ids(order) == ids(sorted(running, key=rem)) + ids(sorted(waiting, key=rem))


def test_srtf_reestimates_when_generation_passes_prediction():
    pol = SrtfCostPolicy(**MEDIAN)
    cfg = pol.config
    stale = job("stale", g=20, pred=20)  # generated == predicted: must not keep rem ~ 0
    other = job("other", g=0, pred=10)
    expected = 20 + max(cfg.reestimate_min_tokens, cfg.reestimate_fraction * 20)
    assert pol.predicted_len(stale) == pytest.approx(expected)
    order = pol.order([], [stale, other], budget())
    assert ids(order) == ["other", "stale"]  # rem 10 < rem 16
    stale.num_output_tokens = int(expected)  # passes the new estimate: it grows again
    assert pol.predicted_len(stale) == pytest.approx(expected + max(cfg.reestimate_min_tokens, cfg.reestimate_fraction * expected))


def test_waiting_rank_counts_prefill_as_marginal_compute():
    """A long prompt is work: with the cost model's weight b / (b + d * context) a 2000-token prompt
    with 20 output tokens ranks after a 10-token prompt with 40; ranking by output alone (weight
    0, spec 7.2) puts it first."""
    long_prompt, short_prompt = job("long", p=2000, pred=20), job("short", p=10, pred=40)
    pol = SrtfCostPolicy(**MEDIAN)
    cost = pol.config.cost
    weight = cost.b_s_per_token / (cost.b_s_per_token + cost.d_s_per_kv_token * (2000 + 20 / 2))
    assert pol.remaining(long_prompt, waiting=True) == pytest.approx(20 + weight * 2000)
    assert pol.remaining(long_prompt) == pytest.approx(20)  # running: its prompt is already in the cache
    assert ids(pol.order([long_prompt, short_prompt], [], budget())) == ["short", "long"]
    output_only = SrtfCostPolicy(prefill_token_weight=0.0, **MEDIAN)
    assert ids(output_only.order([long_prompt, short_prompt], [], budget())) == ["long", "short"]
    fixed = SrtfCostPolicy(prefill_token_weight=0.5, **MEDIAN)
    assert fixed.remaining(long_prompt, waiting=True) == pytest.approx(20 + 0.5 * 2000)


def test_max_tokens_caps_remaining_work():
    pol = SrtfCostPolicy(**MEDIAN)
    capped = job("capped", pred=500, max_tokens=8)
    assert pol.remaining(capped) == 8


def test_fallback_uses_task_history_without_prediction():
    pol = SrtfCostPolicy(**MEDIAN)
    for i, n in enumerate([10, 30, 20]):
        done = job(f"d{i}", task="a", g=n)
        pol.on_finished(done, now=1.0)
    fresh = job("x", task="a", pred=None)
    assert pol.predicted_len(fresh) == 20.0  # median of the finished lengths
    assert pol.predicted_len(job("y", task="b", pred=None)) == pol.config.default_output_len


# -- inlaid: the paper's grouping cap (ablation) -----------------------------------------------------


def test_grouping_caps_tasks_and_prefers_previous_step_tasks():
    pol = SrtfCostPolicy(beta=3, **PAPER)
    waiting = [job(f"w{i}", task=f"t{i % 6}", arrival=i, pred=10 + 10 * (i % 6)) for i in range(12)]
    pol.on_step([job("prev5", task="t5"), job("prev4", task="t4")], budget())  # t4, t5 ran last step
    order = pol.order(waiting, [], budget(now=20))
    tasks = {r.task for r in order}
    # t4/t5 have the longest requests, but ran last step; the third slot goes to the best key
    assert tasks == {"t5", "t4", "t0"}
    assert len(tasks) <= pol.config.beta
    assert ids(order) == ids(sorted((r for r in waiting if r.task in tasks), key=lambda r: (r.predicted_output_len, r.arrival_time)))


def test_grouping_counts_running_tasks_against_beta():
    pol = SrtfCostPolicy(beta=2, **PAPER)
    running = [job("r", task="busy", g=1)]
    waiting = [job("a", task="x", pred=5), job("b", task="y", pred=6), job("c", task="busy", pred=90)]
    order = pol.order(waiting, running, budget())
    assert {r.task for r in order} == {"busy", "x"}
    assert ids(order) == ["r", "a", "c"]


def test_without_grouping_all_tasks_are_candidates():
    pol = SrtfCostPolicy(grouping="off", beta=1, batching="all", **MEDIAN)
    waiting = [job(f"w{i}", task=f"t{i}", pred=10 * (i + 1)) for i in range(5)]
    assert ids(pol.order(waiting, [], budget())) == ids(waiting)


# -- inlaid: aging ---------------------------------------------------------------------------------


def test_starved_request_jumps_the_queue_beyond_beta():
    pol = SrtfCostPolicy(beta=1, starvation_s=5.0, **PAPER)
    old = job("old", task="rare", arrival=0.0, pred=900)
    fresh = [job(f"f{i}", task="hot", arrival=10.0 + i, pred=5) for i in range(3)]
    order = pol.order(fresh + [old], [], budget(now=10.0))
    assert ids(order)[0] == "old"
    assert {r.task for r in order} == {"rare", "hot"}  # the starved task joins beyond beta


@pytest.mark.parametrize("overrides", [{"starvation_latency_multiple": 0.0}, PAPER], ids=["default", "paper"])
def test_starved_request_that_does_not_fit_reserves_the_step(overrides):
    pol = SrtfCostPolicy(starvation_s=5.0, **(MEDIAN | overrides))
    old = job("old", task="a", p=160, pred=900)  # needs 10 blocks of 16
    small = job("small", task="a", arrival=9.0, p=10, pred=5)
    running = [job("r", task="a", g=3, arrival=9.5)]
    order = pol.order([old, small], running, budget(now=10.0, free=4))
    assert "small" not in ids(order)  # nobody else takes the blocks it waits for
    plan = plan_step(pol, [old, small], running, budget(now=10.0, free=4))
    assert ids(plan.scheduled) == ["r"]


# -- skip-join MLFQ --------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [1, 10, 40, 100, 400, 5000])
def test_mlfq_skip_join_picks_first_queue_whose_quantum_covers_prefill(prompt):
    cfg = MlfqConfig(num_queues=6, base_quantum=1.0, prefill_iters_per_token=1 / 16)
    pol = MlfqPolicy(cfg)
    r = job("r", p=prompt)
    pol.order([r], [], budget())
    cost = 1 + prompt / 16
    expected = min(max(math.ceil(math.log2(cost)), 0), cfg.num_queues - 1)
    assert pol.level("r") == expected
    assert cfg.quantum(expected) >= cost or expected == cfg.num_queues - 1
    if expected > 0:
        assert cfg.quantum(expected - 1) < cost


def test_mlfq_demotes_after_quantum_and_keeps_fcfs_inside_a_queue():
    cfg = MlfqConfig(num_queues=4, base_quantum=1.0, prefill_iters_per_token=1 / 16)
    pol = MlfqPolicy(cfg)
    a = job("a", p=10, arrival=0.0)  # prefill 1.625 -> queue 1 (quantum 2)
    b = job("b", p=10, arrival=1.0)
    pol.order([a, b], [], budget(now=1.0))
    assert pol.level("a") == pol.level("b") == 1
    pol.on_step([a], budget(now=1.0))  # a prefills: 1.625 < 2, stays
    assert pol.level("a") == 1
    a.num_output_tokens = 1
    pol.order([b], [a], budget(now=2.0))
    pol.on_step([a], budget(now=2.0))  # one decode: 2.625 >= 2 -> demoted
    assert pol.level("a") == 2
    order = pol.order([b], [a], budget(now=3.0))
    assert ids(order) == ["b", "a"]  # b is still in queue 1, a went to the back of queue 2
    c = job("c", p=10, arrival=2.5)
    pol.order([b, c], [a], budget(now=3.0))
    pol.on_step([b], budget(now=3.0))  # b prefills (1.625 < 2), decodes (2.625): demoted after a
    b.num_output_tokens = 1
    pol.order([c], [a, b], budget(now=4.0))
    pol.on_step([b], budget(now=4.0))
    assert pol.level("b") == 2
    assert ids(pol.order([c], [a, b], budget(now=5.0))) == ["c", "a", "b"]


def test_mlfq_pauses_a_demoted_running_job_for_a_new_short_one():
    pol = MlfqPolicy(MlfqConfig(prefill_iters_per_token=1 / 16))
    long = job("long", p=10, g=1)
    pol.order([long], [], budget())
    for step in range(1, 40):  # decode until demoted well below the join queue
        pol.on_step([long], budget(now=step * 0.01))
    newcomer = job("new", p=10, arrival=1.0)
    plan = plan_step(pol, [newcomer], [long], budget(now=1.0, seqs=1))
    assert ids(plan.scheduled) == ["new"] and ids(plan.paused) == ["long"]


def test_mlfq_promotes_starved_jobs_to_the_top_queue():
    pol = MlfqPolicy(MlfqConfig(starvation_s=2.0))
    r = job("r", p=2000)
    pol.order([r], [], budget(now=0.0))
    assert pol.level("r") > 0
    pol.order([r], [], budget(now=3.0))
    assert pol.level("r") == 0


# -- preemption and admission ----------------------------------------------------------------------


def test_preemption_victim_is_largest_remaining_and_frees_its_blocks():
    bs = 16
    a = job("a", p=31, g=1, pred=10)  # 31 cached tokens: its next token fits its 2nd block
    b = job("b", p=32, g=1, pred=20)  # 32 cached tokens: needs a 3rd block
    c = job("c", p=40, g=5, pred=900)  # most remaining work
    pol = SrtfCostPolicy(**MEDIAN)
    plan = plan_step(pol, [], [a, b, c], budget(free=0, bs=bs))
    assert ids(plan.preempted) == ["c"]
    assert plan.blocks_freed == held_blocks(c, bs)
    assert ids(plan.scheduled) == ["a", "b"]
    assert plan.blocks_allocated == 1


def test_default_victim_is_latest_arrival_and_self_preemption_stops():
    a = job("a", p=32, g=1, arrival=0.0)
    plan = plan_step(FifoPolicy(), [], [a], budget(free=0))
    assert ids(plan.preempted) == ["a"] and plan.scheduled == []


def test_fifo_head_of_line_blocks_smaller_followers():
    big = job("big", arrival=0.0, p=1000)
    small = job("small", arrival=1.0, p=10)
    plan = plan_step(FifoPolicy(), [small, big], [], budget(free=10))
    assert plan.scheduled == []
    plan = plan_step(make_policy("srtf-cost", **MEDIAN), [small, big], [], budget(free=10))
    assert ids(plan.scheduled) == ["small"]


def test_admission_respects_seats_and_token_budget():
    waiting = [job(f"w{i}", arrival=i, p=100) for i in range(10)]
    plan = plan_step(FifoPolicy(), waiting, [], budget(seqs=4))
    assert len(plan.scheduled) == 4
    plan = plan_step(FifoPolicy(), waiting, [], budget(tokens=350))
    assert len(plan.scheduled) == 3 and plan.num_batched_tokens == 300


def test_config_validation_names_values():
    with pytest.raises(ValueError, match="beta=0"):
        SrtfCostConfig(beta=0)
    with pytest.raises(ValueError, match="grouping='nope'"):
        SrtfCostConfig(grouping="nope")
    with pytest.raises(ValueError, match="adapter_slots=0"):
        SrtfCostConfig(adapter_slots=0)
    with pytest.raises(ValueError, match="prefill_token_weight=-1"):
        SrtfCostConfig(prefill_token_weight=-1)
    with pytest.raises(ValueError, match="num_queues=0"):
        MlfqConfig(num_queues=0)
    with pytest.raises(ValueError, match="unknown scheduling policy 'nope'"):
        make_policy("nope")


def test_work_conserving_grouping_lists_other_tasks_after_the_group():
    pol = SrtfCostPolicy(beta=1, batching="all", grouping="preference", **MEDIAN)
    waiting = [job("a", task="x", pred=50), job("b", task="y", pred=5), job("c", task="x", pred=7)]
    pol.on_step([job("prev", task="x")], budget())
    assert ids(pol.order(waiting, [], budget())) == ["c", "a", "b"]  # group x first, then y


def test_aging_bound_follows_median_latency():
    pol = SrtfCostPolicy(starvation_s=5.0, starvation_latency_multiple=10.0, **MEDIAN)
    assert pol.starvation_bound_s == 5.0  # nothing finished yet
    latencies = [1.0, 2.0, 4.0]
    for i, lat in enumerate(latencies):
        pol.on_finished(job(f"d{i}", arrival=0.0, g=3), now=lat)
    bound = 10.0 * float(np.median(latencies))
    assert pol.starvation_bound_s == bound
    waiting = [job("old", task="b", arrival=0.0, pred=900), job("new", task="a", arrival=1.0, pred=5)]
    assert ids(pol.order(waiting, [], budget(now=bound - 1)))[0] == "new"  # past 5 s, within the bound
    assert ids(pol.order(waiting, [], budget(now=bound + 1)))[0] == "old"


def test_aging_counts_paused_time_and_then_runs_the_request_first():
    """A running request paused by SRTF accrues unserved time; past the bound it is aged and
    runs ahead of shorter requests until it finishes (sticky)."""
    pol = SrtfCostPolicy(starvation_s=1.0, starvation_latency_multiple=0.0, **MEDIAN)
    long = job("long", g=1, pred=500)
    now = 0.0
    shorts = [job(f"s{i}", arrival=0.0, pred=5) for i in range(3)]
    while True:  # one seat: the short requests keep it while long waits paused
        pol.order(shorts, [long], budget(now=now, seqs=1))
        plan = plan_step(pol, shorts, [long], budget(now=now, seqs=1))
        pol.on_step(plan.scheduled, budget(now=now, seqs=1))
        if "long" in ids(plan.scheduled):
            break
        assert ids(plan.paused) == ["long"]
        now += 0.3
    assert pol.unserved_s("long") > pol.starvation_bound_s  # it ran only once past the bound
    assert now <= pol.starvation_bound_s + 0.3 + 1e-9
    for step in range(3):  # aged: it keeps the seat although every short request ranks ahead by rem
        now += 0.3
        plan = plan_step(pol, shorts, [long], budget(now=now, seqs=1))
        pol.on_step(plan.scheduled, budget(now=now, seqs=1))
        assert ids(plan.scheduled) == ["long"]


def test_the_papers_rule_caps_tasks_per_step_and_never_pauses():
    """srtf-task-cap, LoRA-Inlaid's rule: 12 tasks wait with seats for all; the 10 with the
    shortest predicted remaining output run (beta = 10), the other two wait though seats are free,
    and a running request keeps running however long its remainder."""
    pol = make_policy("srtf-task-cap")
    assert (pol.config.beta, pol.config.grouping, pol.config.batching, pol.config.starvation_rule) == \
        (10, "hard_cap", "all", "median")
    waiting = [job(f"w{i}", task=f"t{i}", arrival=1.0, pred=10 + i) for i in range(12)]
    running = [job("long", task="t0", g=1, pred=900)]
    plan = plan_step(pol, waiting, running, budget(now=2.0))
    assert "long" in ids(plan.scheduled)
    assert {r.task for r in plan.scheduled} == {f"t{i}" for i in range(10)}


# -- srtf-fifo-bound: overtaking bounded relative to FIFO ----------------------------------------


def test_fifo_turns_match_the_admission_order_computed_directly():
    """A request's FIFO turn is the (k+1)-th admission (or departure without running), k its
    arrival rank; reference: the same events replayed into sorted lists."""
    from inlaid_ray.sched.policies.srtf_cost import FifoTurns

    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.uniform(0, 10, 40))
    jobs = [job(f"r{i}", arrival=float(a)) for i, a in enumerate(arrivals)]
    turns, events, now, gone = FifoTurns(), [], 0.0, set()
    pending = list(jobs)
    while pending:  # each step sees the arrived requests and admits a random subset (SRTF-like overtaking)
        now += 0.5
        arrived = [j for j in pending if j.arrival_time <= now]
        turns.see(arrived, set())
        chosen = [j for j in arrived if rng.random() < 0.3]
        turns.admitted(chosen, now)
        events += [now] * len(chosen)
        for j in chosen:
            pending.remove(j)
            if rng.random() < 0.5:
                turns.left(j, now + 0.1)  # finishing after admission adds no turn
                gone.add(j.request_id)
        for j in (j for j in jobs if j.arrival_time <= now and j.request_id not in gone):
            k = jobs.index(j)
            expected = events[k] - j.arrival_time if k < len(events) else None
            got = turns.wait_s(j.request_id)
            assert got == (None if expected is None else pytest.approx(max(expected, 0.0)))


def _long_request_admitted_at(pol) -> float | None:
    """One seat; a long request queued at t=0 behind a new short request every second, each
    running one step: when the long one is first admitted."""
    long = job("long", arrival=0.0, pred=900)
    now, n = 0.0, 0
    while now < 100:
        waiting = [long, job(f"s{n}", arrival=now, pred=5)]
        plan = plan_step(pol, waiting, [], budget(now=now, seqs=1))
        pol.on_step(plan.scheduled, budget(now=now, seqs=1))
        if "long" in ids(plan.scheduled):
            return now
        for r in plan.scheduled:
            pol.on_finished(r, now + 1.0)
        n += 1
        now += 1.0
    return None


def test_fifo_bound_ages_an_overtaken_request_after_its_multiple_of_the_fifo_wait():
    """SRTF passes the long request over until it has waited 2x the wait FIFO would have given
    it (FIFO admits it first, at t=0: a wait of 0, so the 1 s floor applies); srtf-cost's median
    rule lets it wait 10x the median latency."""
    pol = make_policy("srtf-fifo-bound")
    assert (pol.config.batching, pol.config.starvation_rule, pol.config.starvation_fifo_multiple) == \
        ("all", "fifo_turn", 2.0)
    assert _long_request_admitted_at(pol) == pol.config.starvation_min_s + 1.0  # aged once unserved > 1 s
    median = make_policy("srtf-cost", batching="all")
    assert _long_request_admitted_at(median) > 10.0


def test_fifo_turns_count_departures_and_requests_first_seen_running():
    """A request that leaves unserved counts as an admission (it no longer holds back the turns
    of those after it); one first seen already running was admitted at its arrival."""
    from inlaid_ray.sched.policies.srtf_cost import FifoTurns

    a, b, c = job("a", arrival=0.0), job("b", arrival=1.0), job("c", arrival=2.0)
    turns = FifoTurns()
    turns.see([a, b, c], running_ids={"a"})  # a ran before the policy saw it
    assert turns.wait_s("a") == 0.0  # the first admission, at its arrival
    assert turns.wait_s("b") is None
    turns.left(b, now=5.0)  # b aborted while queued: the 2nd admission slot, at 5
    assert turns.wait_s("c") is None
    turns.admitted([c], now=7.0)
    assert turns.wait_s("c") == 7.0 - 2.0


def test_fifo_bound_ages_a_preempted_request_as_fifo_readmits_it_first():
    """A request preempted back into the queue keeps its first turn (FIFO wait 0 here), so it
    ages once its unserved time passes the 1 s floor and then goes before shorter requests."""
    pol = make_policy("srtf-fifo-bound")
    long = job("long", arrival=0.0, pred=900)
    plan = plan_step(pol, [long], [], budget(now=0.0))
    pol.on_step(plan.scheduled, budget(now=0.0))
    assert ids(plan.scheduled) == ["long"]
    long.wait_start = 5.0  # preempted at t=5 (recompute): back in the queue
    shorts = [job(f"s{i}", arrival=5.0, pred=5) for i in range(2)]
    first = plan_step(pol, [long] + shorts, [], budget(now=5.0, seqs=1))
    pol.on_step(first.scheduled, budget(now=5.0, seqs=1))
    assert ids(first.scheduled) == ["s0"]  # within the floor: SRTF order
    later = plan_step(pol, [long, shorts[1]], first.scheduled, budget(now=6.5, seqs=2))
    assert ids(later.scheduled) == ["s0", "long"]  # unserved 1.5 s > 1 s: aged, takes the free seat
