"""Skip-join multi-level feedback queue, as FastServe (docs/algorithms.md 7.3), the length-agnostic
preemptive baseline.

K queues with quanta doubling per level (`q_k = base_quantum * 2**k`). Service is counted in
*decode-iteration units*: one decode step costs 1, a prefill of n tokens costs
`1 + n * prefill_iters_per_token` (input length is known at arrival, output length is not).
A new job skips the queues whose quantum is shorter than its first iteration and joins the
highest one whose quantum covers it; once it has used its queue's quantum it is demoted to
the next queue (to the back). Inside a queue jobs are FCFS by the time they entered it.
Every step all jobs (running and waiting) are ordered by (queue, entry time); running jobs
that do not fit are paused and keep their KV (token-level preemption). A job that has not
run for `starvation_s` is promoted to the top queue. On KV exhaustion the lowest-priority
candidate is evicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from inlaid_ray.sched.admission import prefill_tokens
from inlaid_ray.sched.policy import R, SchedulableRequest, SchedulingPolicy, StepBudget, register_policy


@dataclass(frozen=True)
class MlfqConfig:
    """Knobs of skip-join MLFQ; defaults follow FastServe's shape, units in decode iterations."""

    num_queues: int = 8  # K priority levels; the last one has no demotion
    base_quantum: float = 1.0  # quantum of the top queue: one decode iteration (FastServe)
    # prefill cost per prompt token relative to one decode iteration: b/a of the default
    # cost model (H100, 7B 4-bit: 30 us per batched token vs a 1.7 ms step), about 1/56
    prefill_iters_per_token: float = 1.0 / 56.0
    starvation_s: float = 30.0  # a job not run for this long is promoted to the top queue

    def __post_init__(self) -> None:
        if self.num_queues < 1 or self.base_quantum <= 0 or self.prefill_iters_per_token < 0:
            raise ValueError(
                f"num_queues={self.num_queues} must be >= 1, base_quantum={self.base_quantum} > 0, "
                f"prefill_iters_per_token={self.prefill_iters_per_token} >= 0"
            )

    def quantum(self, level: int) -> float:
        """Service a job may use in queue `level` before demotion."""
        return self.base_quantum * 2.0**level

    def prefill_cost(self, num_tokens: int) -> float:
        """Estimated cost of a prefill of `num_tokens` in decode-iteration units."""
        return 1.0 + num_tokens * self.prefill_iters_per_token

    def join_level(self, num_prompt_tokens: int) -> int:
        """Skip-join: the highest-priority queue whose quantum covers the first iteration."""
        cost = self.prefill_cost(num_prompt_tokens)
        for level in range(self.num_queues):
            if self.quantum(level) >= cost:
                return level
        return self.num_queues - 1


@dataclass
class _JobState:
    level: int
    entered: float  # when it entered its current queue (FCFS key)
    seq: int  # tie-break for equal entry times: order of entering
    service: float = 0.0  # used in the current queue, decode-iteration units
    last_run: float = 0.0


class MlfqPolicy(SchedulingPolicy):
    """FastServe-style skip-join MLFQ with token-level preemption (pausing)."""

    name = "mlfq"
    head_of_line_blocking = False

    def __init__(self, config: MlfqConfig | None = None, **overrides: Any) -> None:
        """`overrides` replace single fields of `config`, e.g. `make_policy("mlfq", num_queues=4)`."""
        self.config = replace(config or MlfqConfig(), **overrides)
        self._jobs: dict[str, _JobState] = {}
        self._seq = 0
        # waiting at the last `order` -> tokens they prefill if scheduled (read before the
        # caller appends this step's token, whenever it calls on_step)
        self._prefill_sizes: dict[str, int] = {}

    def level(self, request_id: str) -> int:
        """Current queue of a known job (for tests and metrics)."""
        return self._jobs[request_id].level

    def _state(self, r: SchedulableRequest) -> _JobState:
        st = self._jobs.get(r.request_id)
        if st is None:
            level = self.config.join_level(r.num_prompt_tokens)
            st = _JobState(level=level, entered=r.arrival_time, seq=self._next_seq(), last_run=r.arrival_time)
            self._jobs[r.request_id] = st
        return st

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _move(self, st: _JobState, level: int, now: float) -> None:
        st.level, st.service, st.entered, st.seq = level, 0.0, now, self._next_seq()

    def order(self, waiting: Sequence[R], running: Sequence[R], budget: StepBudget) -> list[R]:
        now = budget.now
        jobs = list(running) + list(waiting)
        for r in jobs:
            st = self._state(r)
            if st.level > 0 and now - st.last_run > self.config.starvation_s:
                self._move(st, 0, now)
                st.last_run = now  # the promotion restarts its starvation clock
        self._prefill_sizes = {r.request_id: prefill_tokens(r) for r in waiting}
        return sorted(jobs, key=self._key)

    def _key(self, r: SchedulableRequest) -> tuple[int, float, int]:
        st = self._jobs[r.request_id]
        return (st.level, st.entered, st.seq)

    def on_step(self, scheduled: Sequence[R], budget: StepBudget) -> None:
        cfg = self.config
        for r in scheduled:
            st = self._state(r)
            n = self._prefill_sizes.get(r.request_id)
            if n is not None:  # a prefill of prompt (+ recomputed output)
                st.service += cfg.prefill_cost(n)
            else:
                st.service += 1.0
            st.last_run = budget.now
            if st.service >= cfg.quantum(st.level) and st.level < cfg.num_queues - 1:
                self._move(st, st.level + 1, budget.now)

    def preemption_victim(self, candidates: Sequence[R], budget: StepBudget) -> R:
        """Evict the lowest-priority job (lowest queue, latest to enter it)."""
        return max(candidates, key=self._key)

    def on_finished(self, request: SchedulableRequest, now: float) -> None:
        self._jobs.pop(request.request_id, None)


register_policy(MlfqPolicy)
