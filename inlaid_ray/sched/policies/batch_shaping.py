"""Which of the ranked requests should share the next step, priced by the step-cost model:
the srtf-cost policy's batch shaping, whose adapter terms are its task grouping (docs/algorithms.md
7.2 and item 18 of section 11).

A step costs `a + b*tokens + c*distinct_adapters + d*kv_tokens (+ e*loads)` seconds. Take
request y (predicted remaining `rem_y` decode steps) and the batch S admitted before it in
rank order. Running y alongside S for the `m = min(rem_y, max_x rem_x)` steps they overlap
slows each x in S by y's marginal step cost `w_y = b + d*ctx_y + c*[y's task not in S]`:
`w_y * sum_{x in S} min(rem_x, rem_y)` seconds of JCT. Deferring y does not make those m
steps free: y runs them later, slowing whoever shares them then, the `Q` requests below,
`w_y * Q * m`; and y loses the fixed part `a` of each of the m steps, `a * m` (exchange
argument on two schedules that differ only in when y runs; `ctx_y` is y's mean context over
the overlap). When y's adapter is not resident its load stalls the step of everyone sharing
it, now the |S| requests, later the Q. So y joins iff

    w_y * (sum_{x in S} min(rem_x, rem_y) - Q * m) + e * (|S| - Q) * [y needs a load]  <=  a * m.

Q counts the *running* requests ranked behind y (capped at the seats): admitted, with more
remaining work, they are still running when y's deferred steps come. Waiting requests behind y
are not counted: they rank behind y then too, so at overload they are still waiting when y
runs and do not share its steps. (Counting them, `queue_term="all"`, makes every request join
at overload, i.e. processor sharing over all seats: 18% more mean JCT at 3x capacity in
load_tests/results/sched_policies.json; `"off"` is the closed system, Q = 0.)
With Q >= |S| or a large `a` (weight reads dominate a step), everything that fits joins:
plain continuous batching in SRTF order. Otherwise the longest and the most expensive wait or
pause (keeping their KV), and a request of a task not in the batch stops joining sooner than
one of a task in it: grouping exactly as strong as the cost model says distinct adapters and
loads are, with no task cap.

`load_penalty_steps` prices the other side of swapping for the ranking: a waiting request
whose load would evict a resident adapter ranks as if `e * max(N, 1) / T` steps longer.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from inlaid_ray.sched.admission import blocks_for, prefill_tokens
from inlaid_ray.sched.cost_model import StepCostModel
from inlaid_ray.sched.policy import R, StepBudget

QUEUE_TERMS = ("running", "all", "off")


class AdapterResidency:
    """The policy's mirror of the replica's LRU adapter cache of `slots` entries (None = unbounded).

    Fed the tasks of every step (the simulator's and S-LoRA's on-demand loading), it tells
    which tasks would need their adapter loaded.
    """

    def __init__(self, slots: int | None) -> None:
        self.slots = slots
        self._lru: OrderedDict[str, None] = OrderedDict()

    def needs_load(self, task: str | None) -> bool:
        """Whether running `task` now copies its adapter in (never when every adapter is resident)."""
        return self.slots is not None and task is not None and task not in self._lru

    def evicts(self, task: str | None) -> bool:
        """Whether running `task` now loads its adapter over a full cache, evicting another."""
        return self.needs_load(task) and len(self._lru) >= self.slots  # type: ignore[operator]

    def touch(self, tasks: Iterable[str | None]) -> None:
        """Record a step that ran `tasks`: most recent last, least recent evicted beyond the slots."""
        if self.slots is None:
            return
        step = sorted({t for t in tasks if t is not None})
        for t in step:
            self._lru[t] = None
            self._lru.move_to_end(t)
        keep = set(step)
        while len(self._lru) > max(self.slots, len(step)):
            del self._lru[next(t for t in self._lru if t not in keep)]

    def __contains__(self, task: object) -> bool:
        return task in self._lru


class _Batch:
    """Remaining lengths of the requests admitted so far, with O(log n) sums of min(rem, r)."""

    def __init__(self) -> None:
        self.rems: list[float] = []  # sorted
        self.prefix: list[float] = [0.0]  # prefix sums of `rems`, rebuilt lazily
        self.tasks: set[str | None] = set()
        self._dirty = False

    def add(self, rem: float, task: str | None) -> None:
        bisect.insort(self.rems, rem)
        self.tasks.add(task)
        self._dirty = True

    def overlap_sum(self, rem: float) -> float:
        """sum over the batch of min(rem_x, rem)."""
        if self._dirty:
            self.prefix = [0.0]
            for x in self.rems:
                self.prefix.append(self.prefix[-1] + x)
            self._dirty = False
        i = bisect.bisect_left(self.rems, rem)
        return self.prefix[i] + rem * (len(self.rems) - i)


def shape_batch(
    ranked: Sequence[R],
    running_ids: set[str],
    exempt: set[str],
    remaining: Callable[[R], float],
    budget: StepBudget,
    cost: StepCostModel,
    residency: AdapterResidency,
    adapter_terms: bool = True,
    queue_term: str = "running",
    priority: Sequence[R] | None = None,
) -> list[R]:
    """The requests to run, in `ranked` order: each fits the step's seats, tokens and blocks
    and passes the rule above (`adapter_terms=False` drops its `c` and `e` terms; `queue_term`
    is what Q counts behind y: "running", "all" or "off"; "behind" is in `priority`, the SRTF
    ranking, when the admission order `ranked` differs from it).

    `exempt` requests (aged ones) skip the rule, and an exempt waiting request that does not
    fit stops the admission of later waiting ones: the room that frees up is kept for it.
    The best-ranked running request always runs, so a step never stalls on the rule.
    """
    seats, tokens, free = budget.max_num_seqs, budget.max_num_batched_tokens, budget.num_free_blocks
    bs = budget.block_size
    out: list[R] = []
    batch = _Batch()
    admit_waiting, have_running = True, False
    if queue_term not in QUEUE_TERMS:
        raise ValueError(f"queue_term={queue_term!r} must be one of {QUEUE_TERMS}")
    behind = _counted_behind(priority if priority is not None else ranked, running_ids, queue_term)
    for i, y in enumerate(ranked):
        is_running = y.request_id in running_ids
        n = prefill_tokens(y)  # tokens it will have cached after the step
        need = blocks_for(n, bs) - (blocks_for(n - 1, bs) if is_running else 0)
        step_tokens = 1 if is_running else n
        if seats < 1 or tokens < step_tokens or (not is_running and (not admit_waiting or need > free)):
            if not is_running and y.request_id in exempt:
                admit_waiting = False
            continue
        rem = remaining(y)
        ruled = out and y.request_id not in exempt and (have_running or not is_running)
        queued = min(behind[y.request_id], budget.max_num_seqs - 1)
        if ruled and not _worth_joining(y, rem, batch, len(out), queued, cost, residency, adapter_terms):
            continue
        out.append(y)
        batch.add(rem, y.task)
        seats, tokens, free = seats - 1, tokens - step_tokens, free - min(need, free)
        have_running = have_running or is_running
    return out


def _counted_behind(order: Sequence[R], running_ids: set[str], queue_term: str) -> dict[str, int]:
    """request id -> how many requests after it in `order` the rule's Q counts."""
    out, count = {}, 0
    for r in reversed(order):
        out[r.request_id] = count
        count += queue_term == "all" or (queue_term == "running" and r.request_id in running_ids)
    return out


def _worth_joining(
    y: R, rem: float, batch: _Batch, size: int, queued: int, cost: StepCostModel, residency: AdapterResidency,
    adapter_terms: bool,
) -> bool:
    """The module docstring's rule for y joining `batch` (of `size` requests)."""
    overlap = min(rem, batch.rems[-1])
    w = cost.b_s_per_token + cost.d_s_per_kv_token * (prefill_tokens(y) + overlap / 2)
    load = 0.0
    if adapter_terms and y.task is not None and y.task not in batch.tasks:
        w += cost.c_s_per_adapter
        if residency.needs_load(y.task):  # a task already in the batch is loaded by then
            load = cost.e_s_per_adapter_load * (size - queued)
    return w * (batch.overlap_sum(rem) - queued * overlap) + load <= cost.a_s * overlap


def load_penalty_steps(running: Sequence[R], cost: StepCostModel) -> float:
    """Decode steps a load that evicts a resident adapter is worth in the ranking.

    Serving a request of a resident task before one whose load would evict an adapter saves
    at most that eviction's reload later: `e` seconds of stall for each of the N running
    requests, at least the one reloading, i.e. `e * max(N, 1) / T` steps of one request's
    waiting at step time T (an empty batch still pays the reload: without the floor, the
    first step after a batch drains would evict freely).
    """
    if cost.e_s_per_adapter_load == 0:
        return 0.0
    n = max(len(running), 1)
    kv = sum(prefill_tokens(r) for r in running)
    t = cost.step_time(n, max(len({r.task for r in running if r.task is not None}), 1), kv)
    return cost.e_s_per_adapter_load * n / t
