"""The same policies drive the engine and the simulator identically: on random queue states
(waiting, preempted-and-waiting, running and paused requests, scarce seats, tokens and KV
blocks), the engine's `Scheduler.schedule` applied to real requests and block allocator
schedules, preempts and pauses the same requests in the same order as `plan_step` on the
simulator's jobs, and its allocator ends with exactly the free blocks the plan accounts for."""

from __future__ import annotations

import random

import pytest

from inlaid_ray.engine.block_allocator import BlockAllocator, blocks_for
from inlaid_ray.engine.request import Request, RequestStatus, SamplingParams
from inlaid_ray.engine.scheduler import Scheduler, SchedulerLimits
from inlaid_ray.sched import StepBudget, make_policy, plan_step
from inlaid_ray.bench.simulator import SimJob

BLOCK = 4


def random_state(seed: int):
    """Engine requests in a scheduler plus mirror SimJobs; returns (scheduler, waiting, running, limits)."""
    rng = random.Random(seed)
    limits = SchedulerLimits(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([40, 80, 400]),
                             block_size=BLOCK, watermark_blocks=rng.choice([0, 2]))
    num_blocks = 60
    allocator = BlockAllocator(num_blocks)
    waiting, running, engine_reqs = [], [], []
    for i in range(rng.randint(1, 14)):
        p = rng.randint(1, 30)
        g = rng.choice([0, rng.randint(1, 12), rng.randint(1, 12)])
        task = rng.choice(["a", "b", "c", "d", None])
        arrival = rng.uniform(0, 10)
        pred = rng.choice([None, float(rng.randint(1, 60))])
        hold = g > 0 and rng.random() < 0.7
        need = blocks_for(p + g - 1, BLOCK) if hold else 0
        if hold and need > allocator.num_free:
            hold = False
        req = Request(f"r{i}", task, [1] * p, SamplingParams(max_tokens=100), arrival, arrival, pred)
        req.output_token_ids = [2] * g
        job = SimJob(f"r{i}", task, arrival, arrival, p, g, 100, pred, target_output_tokens=100)
        if hold:
            req.block_ids = allocator.allocate(need)
            req.num_computed_tokens = p + g - 1
            req.status = rng.choice([RequestStatus.RUNNING, RequestStatus.PAUSED])
            running.append(job)
        else:
            waiting.append(job)
        engine_reqs.append((req, hold))
    leave_free = rng.choice([0, 1, 2, 5, 30])
    if allocator.num_free > leave_free:
        allocator.allocate(allocator.num_free - leave_free)  # blocks of requests outside this test
    scheduler = Scheduler(None, allocator, limits)  # policy set per comparison
    for req, hold in engine_reqs:
        (scheduler.holding if hold else scheduler.waiting)[req.request_id] = req
    return scheduler, waiting, running, limits


@pytest.mark.parametrize("policy", ["fifo", "mlfq", "srtf-cost", "srtf-fifo-bound"])
@pytest.mark.parametrize("seed", range(60))
def test_engine_scheduler_and_simulator_admission_agree(policy, seed):
    scheduler, waiting, running, limits = random_state(seed)
    now = 12.0
    scheduler.policy = make_policy(policy, beta=2) if policy == "srtf-cost" else make_policy(policy)
    budget = StepBudget(limits.max_num_seqs, limits.max_num_batched_tokens, scheduler.allocator.num_free, BLOCK, now,
                        reserve_blocks=limits.watermark_blocks)
    preemptions_before = {r.request_id: r.num_preemptions for r in list(scheduler.waiting.values()) + list(scheduler.holding.values())}
    holding_before = list(scheduler.holding)
    scheduled, _ = scheduler.schedule(now)
    sim_policy = make_policy(policy, beta=2) if policy == "srtf-cost" else make_policy(policy)
    plan = plan_step(sim_policy, waiting, running, budget)

    assert [r.request_id for r in scheduled] == [r.request_id for r in plan.scheduled]
    everyone = list(scheduler.waiting.values()) + list(scheduler.holding.values())
    preempted = sorted(r.request_id for r in everyone if r.num_preemptions > preemptions_before[r.request_id])
    assert preempted == sorted(r.request_id for r in plan.preempted)
    paused = sorted(rid for rid in holding_before if rid in scheduler.holding and scheduler.holding[rid].status is RequestStatus.PAUSED)
    assert paused == sorted(r.request_id for r in plan.paused)
    assert scheduler.allocator.num_free == budget.num_free_blocks - plan.blocks_allocated + plan.blocks_freed
