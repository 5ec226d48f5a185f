"""Two multi-task schedulers on predicted output lengths (docs/algorithms.md 7.2):

- `srtf-task-cap` is LoRA-Inlaid's rule as the paper states it: shortest predicted remaining
  output first (SRTF), at most `beta` = 10 distinct tasks per step with the previous step's
  tasks preferred, running requests keep running, and aging (`starvation_rule="median"`).
- `srtf-fifo-bound` (this project's) admits in the same SRTF order, work-conserving, and bounds
  how long a queued request may be overtaken: at most 2x the wait FIFO would have given it
  (`starvation_rule="fifo_turn"`, `FifoTurns`).
- `srtf-cost` (this project's) ranks the same way and runs everyone while everyone fits the
  step (work-conserving: below capacity nobody waits longer than under FIFO); when more requests
  are ready than one step can take, it prices each admission with the replica's step-cost model:
  task grouping, batch size and deferral follow from what a step costs, with no task cap. Its
  aging bound is the paper's (10x the median latency); a per-request bound (a multiple of the
  request's own isolated latency) is an option.

Per request: predicted output length `L` (from the length predictor at arrival, else the
task's recent median, else a default) and generated tokens `g`. Remaining work
`rem = max(min(L, max_tokens) - g, 1)`. When `g >= L` the prediction was too short:
`L <- g + max(16, 0.25 L)` (item 17 of docs/algorithms.md section 11), so estimates are
refreshed as tokens are generated.

Default step (`batching="cost_when_full"`): when every running request can decode and every
waiting one be admitted this step, run them all (`batching="all"` below). Otherwise
(`batching="marginal_cost"`, `grouping="cost"`): rank every request, running
and waiting: aged ones first (oldest first), then by `rem` (+ the steps an adapter reload is
worth when a waiting request's load would evict a resident adapter, with `adapter_slots`).
Walk the ranking and run a request when it fits and when the batch gains more than it loses
from it under the step-cost model (`batch_shaping.py`; the per-step cost of a distinct
adapter and the cost of a load are priced there: that is the task grouping, no task cap).
Running requests left out are paused and keep their KV: SRTF preempts at token granularity,
like skip-join MLFQ. With as many running requests ranked behind as ahead, everything that
fits runs.

Aging: a request's unserved time is the time since arrival during which it did not run
(queued or paused), i.e. how far it has fallen behind plain continuous batching, which
runs everyone every step. Past the bound it is aged: it runs before any non-aged request
until it finishes, skips the cost rule, and when the oldest aged waiting request does not
fit, no later waiting request is admitted until it does. The bound
(`starvation_rule`): "median" (the spec's rule; both policies' default) =
`starvation_latency_multiple` x the median e2e latency of recent finished requests, or
`starvation_s` while none has finished or when the multiple is 0; "isolated" =
`starvation_isolated_multiple` x the request's own isolated latency under the cost model (its
prompt and predicted output alone on the replica), at least `starvation_min_s`, so a short
request is not made to wait as long as a long one and the bound does not grow with load;
"fifo_turn" = for a queued request whose FIFO turn has come (as many admissions have happened
as requests arrived before it), `starvation_fifo_multiple` x its FIFO wait (turn - arrival), at
least `starvation_min_s`, or the median rule's bound if smaller (a request preempted back into
the queue keeps its first turn, so it ages once its unserved time passes that bound, as FIFO
re-admits preempted requests first); running and paused requests, and queued ones before their
turn, age by the median rule. With
work-conserving admission below capacity the bound acts only at overload, where the isolated
bound gives back most of SRTF's gain (load_tests/results/sched_policies.json, ablations). KV exhaustion evicts the
request with the largest `rem` (recompute).

Ablations: `batching="marginal_cost"` prices admissions at every load (the earlier default: it
defers requests below capacity too); `batching="all"` runs every request that fits, running
ones first (SRTF as an admission order only, never idling a seat); `grouping="off"` drops the adapter terms;
`grouping="hard_cap"` is the paper's rule, at most `beta` distinct tasks per step (running
tasks, then the previous step's, then the best waiting ones; requests of other tasks wait
even when seats are free); `grouping="preference"` lists those tasks first, others after;
`pause_running=False` never pauses running requests; `queue_term="all"` counts waiting
requests in the rule's queue term too, `"off"` drops it (closed-system shaping).
Results: load_tests/results/sched_policies*.json.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from inlaid_ray.sched.admission import blocks_for, cached_tokens, prefill_tokens
from inlaid_ray.sched.cost_model import StepCostModel
from inlaid_ray.sched.policies.batch_shaping import QUEUE_TERMS, AdapterResidency, load_penalty_steps, shape_batch
from inlaid_ray.sched.policy import R, SchedulableRequest, SchedulingPolicy, StepBudget, register_policy

GROUPING_MODES = ("cost", "hard_cap", "preference", "off")
BATCHING_MODES = ("marginal_cost", "all", "cost_when_full")
STARVATION_RULES = ("median", "isolated", "fifo_turn")


@dataclass(frozen=True)
class SrtfCostConfig:
    """Knobs of the LoRA-Inlaid policy (module docstring); `batching`, `grouping`, `srtf`,
    `use_prediction`, `pause_running` and `queue_term` exist for ablations."""

    batching: Literal["marginal_cost", "all", "cost_when_full"] = "cost_when_full"
    grouping: Literal["cost", "hard_cap", "preference", "off"] = "cost"
    beta: int = 10  # tasks per step of "hard_cap" / "preference" (paper default 10)
    # the replica's step-cost model (the simulator's, or one fitted on the engine's device by
    # inlaid_ray/bench/step_cost.py); only ratios of its terms matter to the policy
    cost: StepCostModel = field(default_factory=StepCostModel)
    adapter_slots: int | None = None  # the replica's resident adapter slots; None = all resident
    pause_running: bool = True  # False: running requests always run, only admission is shaped
    # who shares a deferred request's later steps in the join rule (batch_shaping.py): the
    # running requests ranked behind it ("running"), every request behind it ("all", ablation)
    # or nobody ("off": closed system, ablation)
    queue_term: Literal["running", "all", "off"] = "running"
    starvation_rule: Literal["isolated", "median", "fifo_turn"] = "median"  # how the aging bound is set (module docstring)
    starvation_fifo_multiple: float = 2.0  # "fifo_turn": a queued request's bound = this x its FIFO wait
    starvation_isolated_multiple: float = 2.0  # "isolated": bound = this x the request's isolated latency (sim_aging_tuning.py)
    starvation_min_s: float = 1.0  # "isolated": the bound is at least this
    starvation_s: float = 30.0  # "median": bound while no request has finished (or multiple = 0)
    starvation_latency_multiple: float = 10.0  # "median": bound = this x median e2e latency; 0 = fixed bound
    reestimate_min_tokens: float = 16.0  # re-estimate adds max(this, fraction * L) tokens
    reestimate_fraction: float = 0.25
    default_output_len: float = 128.0  # no prediction and no finished request of the task yet
    history_len: int = 64  # finished lengths kept per task for the fallback median
    # ranking rem of a waiting request += weight * its prefill tokens. None: from the cost model,
    # b / (b + d * context), a prompt token in decode-token units of marginal compute (a long
    # prompt is real work: ranking by output length alone puts long-prompt, short-output requests
    # first and loses to MLFQ at overload even with exact lengths); 0 = spec 7.2 (output only)
    prefill_token_weight: float | None = None
    srtf: bool = True  # False: arrival order ("without SRTF")
    use_prediction: bool = True  # False: ignore predictor, task median only ("without prediction")

    def __post_init__(self) -> None:
        if self.beta < 1 or self.starvation_s <= 0 or self.starvation_latency_multiple < 0 or self.default_output_len < 1:
            raise ValueError(
                f"beta={self.beta} must be >= 1, starvation_s={self.starvation_s} > 0, starvation_latency_multiple="
                f"{self.starvation_latency_multiple} >= 0, default_output_len={self.default_output_len} >= 1"
            )
        if self.starvation_rule not in STARVATION_RULES or self.starvation_isolated_multiple <= 0 \
                or self.starvation_min_s < 0 or self.starvation_fifo_multiple < 1:
            raise ValueError(f"starvation_rule={self.starvation_rule!r} must be one of {STARVATION_RULES}, "
                             f"starvation_isolated_multiple={self.starvation_isolated_multiple} > 0, "
                             f"starvation_min_s={self.starvation_min_s} >= 0, "
                             f"starvation_fifo_multiple={self.starvation_fifo_multiple} >= 1")
        modes = (self.grouping in GROUPING_MODES, self.batching in BATCHING_MODES, self.queue_term in QUEUE_TERMS)
        if not all(modes):
            raise ValueError(
                f"grouping={self.grouping!r} must be one of {GROUPING_MODES}, batching={self.batching!r} of "
                f"{BATCHING_MODES}, queue_term={self.queue_term!r} of {QUEUE_TERMS}"
            )
        if self.prefill_token_weight is not None and self.prefill_token_weight < 0:
            raise ValueError(f"prefill_token_weight={self.prefill_token_weight} must be >= 0 or None (from the cost model)")
        if self.adapter_slots is not None and self.adapter_slots < 1:
            raise ValueError(f"adapter_slots={self.adapter_slots} must be >= 1 or None")


class SrtfCostPolicy(SchedulingPolicy):
    """SRTF on predicted remaining length + cost-priced batching and task grouping + aging."""

    name = "srtf-cost"
    head_of_line_blocking = False
    uses_cost_model = True

    def __init__(self, config: SrtfCostConfig | None = None, **overrides: Any) -> None:
        """`overrides` replace single fields of `config`, e.g. `make_policy("srtf-cost", beta=4)`."""
        self.config = replace(config or SrtfCostConfig(), **overrides)
        self._estimate: dict[str, float] = {}  # request_id -> current predicted output length
        self._history: dict[str | None, deque[int]] = {}
        self._prev_tasks: set[str | None] = set()
        self._latencies: deque[float] = deque(maxlen=256)  # e2e latency of recent finished requests
        self._starvation_s = self.config.starvation_s
        self._residency = AdapterResidency(self.config.adapter_slots)
        self._unserved: dict[str, float] = {}  # request_id -> seconds in the system not running
        self._aged: dict[str, float] = {}  # request_id -> when it was found aged (sticky)
        self._bounds: dict[str, float] = {}  # request_id -> its aging bound ("isolated" rule)
        self._fifo = FifoTurns()  # "fifo_turn": when FIFO would have admitted each request
        self._offered: set[str] = set()  # ids ordered in the last step ...
        self._left_out: set[str] = set()  # ... and those of them that did not run
        self._last_now: float | None = None

    # -- length estimates --------------------------------------------------------------------

    def predicted_len(self, r: SchedulableRequest) -> float:
        """Current output-length estimate, re-estimated upward once generation passes it."""
        cfg = self.config
        est = self._estimate.get(r.request_id)
        if est is None:
            est = self._initial_estimate(r)
        g = r.num_output_tokens
        if g >= est:
            est = g + max(cfg.reestimate_min_tokens, cfg.reestimate_fraction * est)
        self._estimate[r.request_id] = est
        return est

    def _initial_estimate(self, r: SchedulableRequest) -> float:
        if self.config.use_prediction and r.predicted_output_len is not None:
            return max(float(r.predicted_output_len), 1.0)
        hist = self._history.get(r.task)
        return float(statistics.median(hist)) if hist else self.config.default_output_len

    def remaining(self, r: SchedulableRequest, waiting: bool = False) -> float:
        """Predicted remaining work in decode tokens (plus the prefill term when waiting)."""
        rem = max(min(self.predicted_len(r), r.max_tokens) - r.num_output_tokens, 1.0)
        if waiting and self.config.prefill_token_weight != 0:
            prefill = prefill_tokens(r)
            weight = self.config.prefill_token_weight
            if weight is None:
                b, d = self.config.cost.b_s_per_token, self.config.cost.d_s_per_kv_token
                weight = b / (b + d * (prefill + rem / 2))  # mean context over the remaining decode
            rem += weight * prefill
        return rem

    # -- aging -------------------------------------------------------------------------------

    def unserved_s(self, request_id: str) -> float:
        """Seconds the request has spent in the system without running (0 if unknown)."""
        return self._unserved.get(request_id, 0.0)

    def _update_aging(self, candidates: Sequence[SchedulableRequest], running_ids: set[str], now: float) -> None:
        """Charge the time since the last step to those left out of it; mark the aged (sticky)."""
        dt = now - self._last_now if self._last_now is not None else 0.0
        for rid in self._left_out:
            if rid in self._unserved:
                self._unserved[rid] += dt
        self._last_now = now
        if self.config.starvation_rule == "fifo_turn":
            self._fifo.see(candidates, running_ids)
        for r in candidates:
            if r.request_id not in self._unserved:  # first sight: queued since wait_start (running: unknown, 0)
                self._unserved[r.request_id] = 0.0 if r.request_id in running_ids else max(now - r.wait_start, 0.0)
            u = self._unserved[r.request_id]
            if u > self.starvation_bound_for(r, queued=r.request_id not in running_ids) \
                    and r.request_id not in self._aged:
                self._aged[r.request_id] = now
        self._offered = {r.request_id for r in candidates}
        self._left_out = set(self._offered)  # until on_step says who ran

    def _aged_key(self, r: SchedulableRequest) -> tuple[float, float, str]:
        return (self._aged[r.request_id], r.arrival_time, r.request_id)

    # -- the seam ----------------------------------------------------------------------------

    def order(self, waiting: Sequence[R], running: Sequence[R], budget: StepBudget) -> list[R]:
        cfg = self.config
        running_ids = {r.request_id for r in running}
        self._update_aging(list(running) + list(waiting), running_ids, budget.now)
        batching = cfg.batching
        if batching == "cost_when_full":
            # Work-conserving while everyone fits (nobody waits when FIFO would not make them);
            # the cost rule decides only among more requests than the step can take. (A task
            # cap would leave requests out however many fit: it keeps the cost rule.)
            everyone = cfg.grouping in ("cost", "off") and _all_fit(waiting, running, budget)
            batching = "all" if everyone else "marginal_cost"
        if batching == "all" or not cfg.pause_running:  # running first: never paused by the order
            head = sorted(running, key=lambda r: (self.remaining(r), r.arrival_time, r.request_id))
            ranked = head + self._rank(waiting, running)
        else:
            ranked = self._rank(list(running) + list(waiting), running)
        if batching == "all":
            return self._reserve_for_aged(ranked, waiting, running, budget)
        # the rule's "ranked behind" is the SRTF order, which `ranked` is unless running go first
        priority = None if cfg.pause_running else self._rank(list(running) + list(waiting), running)
        exempt = set(self._aged) if cfg.pause_running else set(self._aged) | running_ids
        return shape_batch(ranked, running_ids, exempt, self.remaining, budget, cfg.cost, self._residency,
                           adapter_terms=cfg.grouping == "cost", queue_term=cfg.queue_term, priority=priority)

    def _rank(self, candidates: Sequence[R], running: Sequence[R]) -> list[R]:
        """Aged first (oldest first), then by key; hard_cap / preference group the others."""
        cfg = self.config
        aged = sorted((r for r in candidates if r.request_id in self._aged), key=self._aged_key)
        running_ids = {r.request_id for r in running}
        # resident tasks first, by what a reload costs
        penalty = load_penalty_steps(running, cfg.cost) if cfg.grouping == "cost" and self._residency.slots else 0.0

        def key(r: SchedulableRequest) -> tuple[float, float, str]:
            running_now = r.request_id in running_ids
            rem, arrival, rid = self._key(r, running=running_now)
            if penalty and not running_now and self._residency.evicts(r.task):
                rem += penalty
            return (rem, arrival, rid)

        rest = sorted((r for r in candidates if r.request_id not in self._aged), key=key)
        if cfg.grouping in ("hard_cap", "preference"):
            tasks = self._select_tasks(rest, running) | {r.task for r in aged}
            chosen = [r for r in rest if r.task in tasks]
            if cfg.grouping == "preference":
                chosen += [r for r in rest if r.task not in tasks]
            rest = chosen
        return aged + rest

    def _key(self, r: SchedulableRequest, running: bool) -> tuple[float, float, str]:
        rem = self.remaining(r, waiting=not running) if self.config.srtf else 0.0
        return (rem, r.arrival_time, r.request_id)

    def _select_tasks(self, ranked: Sequence[R], running: Sequence[R]) -> set[str | None]:
        """Running tasks, then previous-step tasks, then the rest by their best request, to beta."""
        selected: set[str | None] = {r.task for r in running}
        best: dict[str | None, int] = {}
        for i, r in enumerate(ranked):
            best.setdefault(r.task, i)
        candidates = sorted((t for t in best if t not in selected), key=lambda t: (t not in self._prev_tasks, best[t]))
        selected.update(candidates[: max(self.config.beta - len(selected), 0)])
        return selected

    def _reserve_for_aged(self, ranked: list[R], waiting: Sequence[R], running: Sequence[R], budget: StepBudget) -> list[R]:
        """`batching="all"`: if the oldest aged waiting request does not fit, admit nobody else."""
        aged = [r for r in waiting if r.request_id in self._aged]
        if aged:
            oldest = min(aged, key=self._aged_key)
            if not _fits_now(oldest, len(running), budget):
                waiting_ids = {r.request_id for r in waiting}
                return [r for r in ranked if r.request_id not in waiting_ids] + [oldest]
        return ranked

    def preemption_victim(self, candidates: Sequence[R], budget: StepBudget) -> R:
        """Evict the request with the most predicted remaining work (latest arrival on ties)."""
        return max(candidates, key=lambda r: (self.remaining(r), r.arrival_time, r.request_id))

    def on_step(self, scheduled: Sequence[R], budget: StepBudget) -> None:
        if self.config.starvation_rule == "fifo_turn":
            self._fifo.admitted(scheduled, budget.now)
        self._prev_tasks = {r.task for r in scheduled}
        self._residency.touch(self._prev_tasks)
        self._left_out = self._offered - {r.request_id for r in scheduled}

    def on_finished(self, request: SchedulableRequest, now: float) -> None:
        if self.config.starvation_rule == "fifo_turn":
            self._fifo.left(request, now)
        for table in (self._estimate, self._unserved, self._aged, self._bounds):
            table.pop(request.request_id, None)
        self._offered.discard(request.request_id)
        self._left_out.discard(request.request_id)
        hist = self._history.setdefault(request.task, deque(maxlen=self.config.history_len))
        hist.append(request.num_output_tokens)
        if self.config.starvation_latency_multiple > 0:
            self._latencies.append(now - request.arrival_time)
            self._starvation_s = self.config.starvation_latency_multiple * statistics.median(self._latencies)

    @property
    def starvation_bound_s(self) -> float:
        """The "median" rule's aging bound in force now (seconds of unserved time)."""
        return self._starvation_s

    def starvation_bound_for(self, r: SchedulableRequest, queued: bool = True) -> float:
        """Seconds of unserved time after which `r` is aged (fixed at first sight for "isolated");
        `queued`: `r` is in the waiting queue (not a running or paused request)."""
        cfg = self.config
        if cfg.starvation_rule == "fifo_turn":
            # A preempted request back in the queue keeps its turn: it ages as soon as its wait
            # passes the floor (or 2x its first FIFO wait), as FIFO puts it back at the front.
            fifo_wait = self._fifo.wait_s(r.request_id) if queued else None
            if fifo_wait is None:  # running or paused, or FIFO would not have admitted it yet either
                return self._starvation_s
            return min(self._starvation_s, max(cfg.starvation_min_s, cfg.starvation_fifo_multiple * fifo_wait))
        if cfg.starvation_rule == "median":
            return self._starvation_s
        bound = self._bounds.get(r.request_id)
        if bound is None:
            output = max(int(round(min(self.predicted_len(r), r.max_tokens))), 1)
            isolated = cfg.cost.isolated_latency(r.num_prompt_tokens, output, with_adapter=r.task is not None)
            bound = self._bounds[r.request_id] = max(cfg.starvation_min_s, cfg.starvation_isolated_multiple * isolated)
        return bound


class FifoTurns:
    """When FIFO would have admitted each request, at the rate requests are being admitted: the
    k-th request to arrive (0-based) has its turn when the k+1-th admission happens (a request
    that leaves without running counts as one), so after its turn a queued request is being
    overtaken. Its FIFO wait is turn - arrival."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}  # request id -> arrival rank
        self._arrival: dict[str, float] = {}
        self._admitted: set[str] = set()  # ids admitted (first time) or gone
        self._turns: deque[float] = deque()  # time of the admission number `_base + i`
        self._base = 0
        self._next = 0

    def see(self, candidates: Sequence[SchedulableRequest], running_ids: set[str]) -> None:
        """Rank requests seen for the first time by arrival (running ones count as admitted)."""
        new = sorted((r for r in candidates if r.request_id not in self._index),
                     key=lambda r: (r.arrival_time, r.request_id))
        for r in new:
            self._index[r.request_id], self._arrival[r.request_id] = self._next, r.arrival_time
            self._next += 1
            if r.request_id in running_ids:  # running before the policy saw it: admitted then
                self._count(r.request_id, r.arrival_time)

    def admitted(self, scheduled: Sequence[SchedulableRequest], now: float) -> None:
        for r in scheduled:
            self._count(r.request_id, now)

    def left(self, r: SchedulableRequest, now: float) -> None:
        """`r` finished or was aborted; it no longer needs its turn."""
        self._count(r.request_id, now)
        self._index.pop(r.request_id, None)
        self._arrival.pop(r.request_id, None)
        self._admitted.discard(r.request_id)
        # turns no request still waiting for its own turn can need (ranks are inserted in
        # increasing order, so the first left is the lowest)
        low = next(iter(self._index.values()), self._next)
        while self._turns and self._base < low:
            self._turns.popleft()
            self._base += 1

    def _count(self, request_id: str, now: float) -> None:
        if request_id in self._index and request_id not in self._admitted:
            self._admitted.add(request_id)
            self._turns.append(now)

    def wait_s(self, request_id: str) -> float | None:
        """turn - arrival of a request whose turn has come, else None."""
        k = self._index.get(request_id)
        if k is None or k - self._base >= len(self._turns):
            return None
        return max(self._turns[k - self._base] - self._arrival[request_id], 0.0)


def _all_fit(waiting: Sequence[SchedulableRequest], running: Sequence[SchedulableRequest], budget: StepBudget) -> bool:
    """Whether every running request can decode and every waiting one be admitted this step, as
    admission.plan_step counts (the watermark kept free from prefills while anyone holds blocks)."""
    bs = budget.block_size
    growth = sum(blocks_for(cached_tokens(r) + 1, bs) - blocks_for(cached_tokens(r), bs) for r in running)
    prefill = [prefill_tokens(r) for r in waiting]
    reserve = budget.reserve_blocks if running or len(waiting) > 1 else 0
    return (
        len(running) + len(waiting) <= budget.max_num_seqs
        and len(running) + sum(prefill) <= budget.max_num_batched_tokens
        and growth + sum(blocks_for(n, bs) for n in prefill) + (reserve if waiting else 0) <= budget.num_free_blocks
    )


def _fits_now(r: SchedulableRequest, num_running: int, budget: StepBudget) -> bool:
    """Whether waiting `r` can be admitted this step after every running request decodes."""
    n = prefill_tokens(r)
    reserve = budget.reserve_blocks if num_running else 0
    return (
        budget.max_num_seqs - num_running >= 1
        and budget.max_num_batched_tokens - num_running >= n
        and budget.num_free_blocks - reserve >= blocks_for(n, budget.block_size)
    )


class SrtfTaskCapPolicy(SrtfCostPolicy):
    """LoRA-Inlaid's scheduler as the paper states it (docs/algorithms.md 7.1-7.2): SRTF on the
    predicted remaining output, at most `beta` = 10 distinct tasks per step (the previous step's
    first), every running request keeps running and every admitted one that fits runs, aging
    after 10x the median latency (30 s before any request finishes). No cost model."""

    name = "srtf-task-cap"
    uses_cost_model = False

    def __init__(self, config: SrtfCostConfig | None = None, **overrides: Any) -> None:
        paper = SrtfCostConfig(batching="all", grouping="hard_cap", beta=10, pause_running=False,
                               prefill_token_weight=0.0, starvation_rule="median")
        super().__init__(config or paper, **overrides)


class SrtfFifoBoundPolicy(SrtfCostPolicy):
    """SRTF on predicted remaining length as an admission order (work-conserving: every request
    that fits runs, running ones never paused), with overtaking bounded relative to FIFO: a queued
    request whose FIFO turn has come (`FifoTurns`) is aged once it has waited
    `starvation_fifo_multiple` = 2 x the wait FIFO would have given it (at least 1 s), or by the
    median rule if that comes first. The multiple was tuned on the tuning scenarios only
    (load_tests/sim_policies.py). The step-cost model only weighs a waiting request's prompt
    tokens against output tokens in the ranking (`prefill_token_weight`), as in srtf-cost."""

    name = "srtf-fifo-bound"
    uses_cost_model = True

    def __init__(self, config: SrtfCostConfig | None = None, **overrides: Any) -> None:
        bounded = SrtfCostConfig(batching="all", starvation_rule="fifo_turn", starvation_fifo_multiple=2.0)
        super().__init__(config or bounded, **overrides)


register_policy(SrtfCostPolicy)
register_policy(SrtfTaskCapPolicy)
register_policy(SrtfFifoBoundPolicy)
