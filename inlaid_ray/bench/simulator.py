"""Discrete-event simulator of ONE engine replica: continuous batching with a paged KV cache,
driven step by step by the same `SchedulingPolicy` objects as the engine, through the same
admission rules (`admission.plan_step`: max_num_seqs, max_num_batched_tokens, KV blocks of
`block_size`, preemption by recompute). Time advances by the step-cost model; when the
replica is idle it jumps to the next arrival. Requests arriving during a step join the next.

A simulated request finishes after exactly its true output length. Optional adapter slots
model S-LoRA-style swapping: a task not resident costs one adapter load (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from inlaid_ray.progress import Progress

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.sched.admission import blocks_for, cached_tokens, plan_step, prefill_tokens
from inlaid_ray.sched.cost_model import StepCostModel
from inlaid_ray.sched.policy import SchedulingPolicy, StepBudget
from inlaid_ray.bench.workload import RequestSpec


@dataclass(frozen=True)
class ReplicaConfig:
    """The simulated replica's limits (engine-equivalent knobs)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096  # must cover any prompt + recomputed output (no chunking)
    num_blocks: int = 8192  # 8192 x 16 = 131k tokens, ~ 7B fp16 KV in 64 GiB
    block_size: int = 16
    kv_watermark: float = 0.01  # fraction of blocks kept free from prefills while anyone holds blocks (as EngineConfig)
    adapter_slots: int | None = None  # None = every adapter resident, no load cost

    @property
    def reserve_blocks(self) -> int:
        """The watermark in blocks, rounded down as the engine does."""
        return int(self.kv_watermark * self.num_blocks)


@dataclass
class SimJob:
    """A request inside the simulator; satisfies `SchedulableRequest`."""

    request_id: str
    task: str | None
    arrival_time: float
    wait_start: float
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int
    predicted_output_len: float | None
    target_output_tokens: int  # the true length
    blocks: int = 0  # KV blocks held
    first_scheduled: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    waited_s: float = 0.0  # total time in the waiting queue (arrival and after preemptions)
    num_preemptions: int = 0
    recomputed_tokens: int = 0  # cached tokens thrown away by preemptions

    @classmethod
    def from_spec(cls, s: RequestSpec) -> "SimJob":
        return cls(s.request_id, s.task, s.arrival_time, s.arrival_time, s.prompt_tokens, 0, s.max_tokens,
                   s.predicted_output_len, s.output_tokens)


@dataclass
class StepRecord:
    """What one simulated step did."""

    start: float
    duration: float
    batch_tokens: int
    num_seqs: int
    num_prefills: int
    distinct_tasks: int
    kv_tokens: int
    adapter_loads: int
    num_preempted: int
    num_paused: int
    num_waiting: int


@dataclass
class SimResult:
    """Finished jobs (in completion order), per-step records and token accounting."""

    jobs: list[SimJob]
    steps: list[StepRecord]
    processed_tokens: int  # tokens fed through the model (prefill + decode + recompute)
    generated_tokens: int
    policy: str
    replica: ReplicaConfig
    cost: StepCostModel
    meta: dict = field(default_factory=dict)


class Simulator:
    """Replays request specs through `policy` on one replica (see module docstring)."""

    def __init__(self, policy: SchedulingPolicy, replica: ReplicaConfig | None = None, cost: StepCostModel | None = None) -> None:
        self.policy = policy
        self.replica = replica or ReplicaConfig()
        self.cost = cost or StepCostModel()

    def _validate(self, specs: Sequence[RequestSpec]) -> None:
        rc = self.replica
        capacity = (rc.num_blocks - rc.reserve_blocks) * rc.block_size
        for s in specs:
            longest = s.prompt_tokens + s.output_tokens
            if s.output_tokens < 1 or s.output_tokens > s.max_tokens:
                raise InvalidRequest(f"{s.request_id}: output_tokens={s.output_tokens} not in [1, max_tokens={s.max_tokens}]")
            if longest - 1 > rc.max_num_batched_tokens or longest > capacity:
                raise InvalidRequest(
                    f"{s.request_id}: prompt {s.prompt_tokens} + output {s.output_tokens} tokens cannot fit "
                    f"max_num_batched_tokens={rc.max_num_batched_tokens} (recompute) or KV capacity {capacity}"
                )

    def run(self, specs: Sequence[RequestSpec], progress: bool = False) -> SimResult:
        """Simulate until every request has finished."""
        self._validate(specs)
        rc, policy, cost = self.replica, self.policy, self.cost
        pending = sorted(specs, key=lambda s: (s.arrival_time, s.request_id))
        waiting: dict[str, SimJob] = {}
        running: dict[str, SimJob] = {}
        resident: OrderedDict[str, None] = OrderedDict()
        finished: list[SimJob] = []
        steps: list[StepRecord] = []
        used_blocks = processed = generated = 0
        now, idx = (pending[0].arrival_time if pending else 0.0), 0
        bar = Progress(total=len(pending), desc=f"sim {policy.name}", disable=not progress, leave=False)
        while len(finished) < len(pending):
            while idx < len(pending) and pending[idx].arrival_time <= now:
                job = SimJob.from_spec(pending[idx])
                waiting[job.request_id] = job
                idx += 1
            if not waiting and not running:
                now = pending[idx].arrival_time
                continue
            budget = StepBudget(rc.max_num_seqs, rc.max_num_batched_tokens, rc.num_blocks - used_blocks, rc.block_size, now,
                                reserve_blocks=rc.reserve_blocks)
            plan = plan_step(policy, list(waiting.values()), list(running.values()), budget)
            for v in plan.preempted:  # recompute: drop the cache, back to the waiting queue
                used_blocks -= v.blocks
                v.recomputed_tokens += cached_tokens(v)
                v.blocks, v.wait_start = 0, now
                v.num_preemptions += 1
                del running[v.request_id]
                waiting[v.request_id] = v
            if not plan.scheduled:
                if running and not plan.preempted:
                    raise RuntimeError(f"policy {policy.name} scheduled nothing with {len(running)} running at t={now:.3f}")
                if idx >= len(pending) and not running and not plan.preempted:
                    raise RuntimeError(f"{len(waiting)} waiting requests can never be admitted at t={now:.3f}")
                if not running and idx < len(pending):
                    now = max(now, pending[idx].arrival_time)
                continue
            prefill_ids = {r.request_id for r in plan.prefills}
            tasks = {r.task for r in plan.scheduled if r.task is not None}
            loads = self._touch_adapters(resident, tasks)
            kv = sum(prefill_tokens(r) for r in plan.scheduled)  # context after the step = p + g
            dt = cost.step_time(plan.num_batched_tokens, len(tasks), kv, loads)
            policy.on_step(plan.scheduled, budget)
            steps.append(StepRecord(now, dt, plan.num_batched_tokens, len(plan.scheduled), len(plan.prefills),
                                    plan.distinct_tasks(), kv, loads, len(plan.preempted), len(plan.paused), len(waiting)))
            start, now = now, now + dt
            for r in plan.scheduled:
                if r.request_id in prefill_ids:
                    del waiting[r.request_id]
                    running[r.request_id] = r
                    r.waited_s += start - r.wait_start
                    if r.first_scheduled is None:
                        r.first_scheduled = start
                    processed += prefill_tokens(r)
                else:
                    processed += 1
                new_blocks = blocks_for(prefill_tokens(r), rc.block_size) - r.blocks
                r.blocks += new_blocks
                used_blocks += new_blocks
                r.num_output_tokens += 1
                generated += 1
                if r.first_token_time is None:
                    r.first_token_time = now
                if r.num_output_tokens >= r.target_output_tokens:
                    r.finish_time = now
                    used_blocks -= r.blocks
                    r.blocks = 0
                    del running[r.request_id]
                    finished.append(r)
                    policy.on_finished(r, now)
                    bar.update(1)
            assert 0 <= used_blocks <= rc.num_blocks, f"block accounting broke: used={used_blocks} of {rc.num_blocks}"
        bar.close()
        return SimResult(finished, steps, processed, generated, policy.name, rc, cost)

    def _touch_adapters(self, resident: OrderedDict[str, None], tasks: set[str]) -> int:
        """LRU adapter residency; returns how many of `tasks` had to be loaded this step."""
        slots = self.replica.adapter_slots
        if slots is None:
            return 0
        loads = 0
        for t in sorted(tasks):
            if t in resident:
                resident.move_to_end(t)
            else:
                resident[t] = None
                loads += 1
        while len(resident) > max(slots, len(tasks)):
            victim = next(t for t in resident if t not in tasks)
            del resident[victim]
        return loads
