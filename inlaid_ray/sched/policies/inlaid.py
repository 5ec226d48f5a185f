"""LoRA-Inlaid's multi-task scheduler (ALGORITHMS.md 7.2): shortest predicted remaining work
first, task grouping with at most `beta` distinct tasks per step (the previous step's tasks
first, so the adapter set stays stable), and aging so no request waits past a bound.

Per request: predicted output length `L` (from the length predictor at arrival, else the
task's recent median, else a default) and generated tokens `g`. Remaining work
`rem = max(min(L, max_tokens) - g, 1)` (+ an optional prefill term for waiting requests).
When `g >= L` the prediction was too short: `L <- g + max(16, 0.25 L)` (item 17 of section 11).

One step: running requests keep running, shortest `rem` first (no preemption unless KV runs
out; then the largest `rem` is evicted). Task set G = tasks of running requests, then
waiting tasks that ran in the previous step, then other waiting tasks, each group by its best
request, until |G| = beta. Requests that waited longer than `starvation_s` go first and their
tasks join G beyond beta; if the oldest of them does not fit now, nothing else is admitted
until it does (a reservation, so the bound holds under a stream of short requests).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from inlaid_ray.sched.admission import blocks_for, prefill_tokens
from inlaid_ray.sched.policy import R, SchedulableRequest, SchedulingPolicy, StepBudget, register_policy


@dataclass(frozen=True)
class InlaidConfig:
    """Knobs of the LoRA-Inlaid policy; the three switches at the end are for ablations."""

    beta: int = 10  # max distinct tasks per step (grouping coefficient, paper default 10)
    starvation_s: float = 30.0  # aging bound: a request waiting longer jumps the queue
    # > 0: the bound becomes max(starvation_s, this x median e2e latency of recent finished
    # requests), the spec's "10x median latency" alternative for regimes where 30 s is short
    starvation_latency_multiple: float = 0.0
    reestimate_min_tokens: float = 16.0  # re-estimate adds max(this, fraction * L) tokens
    reestimate_fraction: float = 0.25
    default_output_len: float = 128.0  # no prediction and no finished request of the task yet
    history_len: int = 64  # finished lengths kept per task for the fallback median
    prefill_token_weight: float = 0.0  # waiting rem += weight * prefill tokens (0 = spec 7.2)
    grouping: bool = True  # False: no task cap (ablation "without grouping")
    # True: requests of tasks beyond beta are still listed, after the chosen tasks' ones, so
    # free seats/blocks never idle; grouping then only orders (not the paper's hard cap)
    work_conserving: bool = False
    srtf: bool = True  # False: arrival order inside the chosen tasks (ablation "without SRTF")
    use_prediction: bool = True  # False: ignore predictor, task median only ("without prediction")

    def __post_init__(self) -> None:
        if self.beta < 1 or self.starvation_s <= 0 or self.default_output_len < 1:
            raise ValueError(
                f"beta={self.beta} must be >= 1, starvation_s={self.starvation_s} > 0, "
                f"default_output_len={self.default_output_len} >= 1"
            )


class InlaidPolicy(SchedulingPolicy):
    """SRTF on predicted remaining length + task grouping (beta) + aging."""

    name = "inlaid"
    head_of_line_blocking = False

    def __init__(self, config: InlaidConfig | None = None, **overrides: Any) -> None:
        """`overrides` replace single fields of `config`, e.g. `make_policy("inlaid", beta=4)`."""
        self.config = replace(config or InlaidConfig(), **overrides)
        self._estimate: dict[str, float] = {}  # request_id -> current predicted output length
        self._history: dict[str | None, deque[int]] = {}
        self._prev_tasks: set[str | None] = set()
        self._latencies: deque[float] = deque(maxlen=256)  # e2e latency of recent finished requests
        self._starvation_s = self.config.starvation_s

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
        if waiting and self.config.prefill_token_weight:
            rem += self.config.prefill_token_weight * prefill_tokens(r)
        return rem

    # -- the seam ----------------------------------------------------------------------------

    def order(self, waiting: Sequence[R], running: Sequence[R], budget: StepBudget) -> list[R]:
        cfg = self.config
        run_sorted = sorted(running, key=lambda r: (self.remaining(r), r.arrival_time, r.request_id))
        if not waiting:
            return run_sorted
        keys = {r.request_id: self._waiting_key(r, budget.now) for r in waiting}
        starved = [r for r in waiting if keys[r.request_id][0] == 0]
        if starved:
            oldest = min(starved, key=lambda r: (r.wait_start, r.request_id))
            if not _fits_now(oldest, len(running), budget):
                return run_sorted + [oldest]  # reserve: admit nobody else until it fits
        if cfg.grouping:
            tasks = self._select_tasks(waiting, running, keys)
            tasks.update(r.task for r in starved)
            chosen = sorted((r for r in waiting if r.task in tasks), key=lambda r: keys[r.request_id])
            if cfg.work_conserving:
                chosen += sorted((r for r in waiting if r.task not in tasks), key=lambda r: keys[r.request_id])
            return run_sorted + chosen
        return run_sorted + sorted(waiting, key=lambda r: keys[r.request_id])

    def _waiting_key(self, r: SchedulableRequest, now: float) -> tuple[int, float, float, str]:
        starved = now - r.wait_start > self._starvation_s
        rem = self.remaining(r, waiting=True) if self.config.srtf else 0.0
        return (0 if starved else 1, rem, r.arrival_time, r.request_id)

    def _select_tasks(
        self, waiting: Sequence[R], running: Sequence[R], keys: dict[str, tuple]
    ) -> set[str | None]:
        """Running tasks, then previous-step tasks, then the rest, by best waiting key, to beta.

        Starved requests are left out here: the caller adds their tasks beyond beta.
        """
        selected: set[str | None] = {r.task for r in running}
        best: dict[str | None, tuple] = {}
        for r in waiting:
            k = keys[r.request_id]
            if k[0] == 0:
                continue
            if r.task not in best or k < best[r.task]:
                best[r.task] = k
        candidates = sorted(
            (t for t in best if t not in selected), key=lambda t: (t not in self._prev_tasks, best[t])
        )
        for t in candidates:
            if len(selected) >= self.config.beta:
                break
            selected.add(t)
        return selected

    def preemption_victim(self, candidates: Sequence[R], budget: StepBudget) -> R:
        """Evict the request with the most predicted remaining work (latest arrival on ties)."""
        return max(candidates, key=lambda r: (self.remaining(r), r.arrival_time, r.request_id))

    def on_step(self, scheduled: Sequence[R], budget: StepBudget) -> None:
        self._prev_tasks = {r.task for r in scheduled}

    def on_finished(self, request: SchedulableRequest, now: float) -> None:
        self._estimate.pop(request.request_id, None)
        hist = self._history.setdefault(request.task, deque(maxlen=self.config.history_len))
        hist.append(request.num_output_tokens)
        if self.config.starvation_latency_multiple > 0:
            self._latencies.append(now - request.arrival_time)
            self._starvation_s = max(
                self.config.starvation_s, self.config.starvation_latency_multiple * statistics.median(self._latencies)
            )

    @property
    def starvation_bound_s(self) -> float:
        """The aging bound in force now (seconds)."""
        return self._starvation_s


def _fits_now(r: SchedulableRequest, num_running: int, budget: StepBudget) -> bool:
    """Whether waiting `r` can be admitted this step after the running set decodes."""
    n = prefill_tokens(r)
    return (
        budget.max_num_seqs - num_running >= 1
        and budget.max_num_batched_tokens - num_running >= n
        and budget.num_free_blocks >= blocks_for(n, budget.block_size)
    )


register_policy(InlaidPolicy)
