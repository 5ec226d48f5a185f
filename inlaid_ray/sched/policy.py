"""The scheduling-policy seam: each engine step (and each simulator step) asks the policy
which requests to run, in what order. The engine owns memory accounting; the policy owns
priority. Pure Python: no torch, no engine imports, so the simulator drives the same object.

Contract of one step:
1. `order(waiting, running, budget)` returns requests in the order the caller should try
   to fit them. Running requests left out are *paused* (they keep their KV blocks), which
   is how token-level preemption (skip-join MLFQ) is expressed.
2. The caller admits candidates in that order while seats, token budget and KV blocks
   allow. When a waiting request does not fit, it stops if `head_of_line_blocking` (strict
   FIFO, as S-LoRA) and otherwise skips it and tries the next.
3. When KV blocks run out for a running request, the caller asks `preemption_victim` and
   frees the victim's blocks (it is recomputed later).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from inlaid_ray.sched.cost_model import StepCostModel


class SchedulableRequest(Protocol):
    """What a policy may read of a request (engine `Request` and simulator jobs both fit)."""

    request_id: str
    task: str | None  # task (adapter) name; None = base model only
    arrival_time: float  # seconds, the caller's clock
    wait_start: float  # when it last entered the waiting queue (arrival or preemption)
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far
    max_tokens: int
    predicted_output_len: float | None  # from the output-length predictor, if any


R = TypeVar("R", bound=SchedulableRequest)


@dataclass(frozen=True)
class StepBudget:
    """Resources the caller has for this step, so a policy can plan around them."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_free_blocks: int
    block_size: int
    now: float
    # kept free from new prefills while anyone holds blocks (vLLM's watermark), so admitted
    # requests can decode a while before anyone must be preempted
    reserve_blocks: int = 0


class SchedulingPolicy(ABC):
    """Orders requests each step; subclasses register under a unique `name`."""

    name: ClassVar[str]
    head_of_line_blocking: ClassVar[bool] = False
    uses_cost_model: ClassVar[bool] = False  # takes `cost=StepCostModel` (the replica's step times)

    @abstractmethod
    def order(self, waiting: Sequence[R], running: Sequence[R], budget: StepBudget) -> list[R]:
        """Requests to try this step, best first (running ones left out are paused)."""

    def preemption_victim(self, candidates: Sequence[R], budget: StepBudget) -> R:
        """The request to evict when KV blocks run out: by default the latest arrival (vLLM)."""
        return max(candidates, key=lambda r: (r.arrival_time, r.request_id))

    def on_step(self, scheduled: Sequence[R], budget: StepBudget) -> None:
        """Called with the requests that actually ran this step (policies with memory use it)."""

    def on_finished(self, request: SchedulableRequest, now: float) -> None:
        """Called once when a request finishes or is aborted."""


class FifoPolicy(SchedulingPolicy):
    """S-LoRA's default: running requests first, then waiting ones strictly by arrival."""

    name = "fifo"
    head_of_line_blocking = True

    def order(self, waiting: Sequence[R], running: Sequence[R], budget: StepBudget) -> list[R]:
        by_arrival = lambda r: (r.arrival_time, r.request_id)  # noqa: E731
        return sorted(running, key=by_arrival) + sorted(waiting, key=by_arrival)


_POLICIES: dict[str, Callable[..., SchedulingPolicy]] = {}


def register_policy(factory: Callable[..., SchedulingPolicy], name: str | None = None) -> None:
    """Make a policy constructible by name (`make_policy`)."""
    _POLICIES[name or factory.name] = factory  # type: ignore[attr-defined]


def make_policy(name: str, **kwargs: Any) -> SchedulingPolicy:
    """Build a registered policy by name; raises ValueError on unknown names."""
    if name not in _POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {sorted(_POLICIES)}")
    return _POLICIES[name](**kwargs)


def make_replica_policy(name: str, step_cost_model: str | Path | None = None,
                        options: Mapping[str, Any] | None = None) -> SchedulingPolicy:
    """`make_policy(name, **options)` for an engine: a policy that prices steps gets the step-cost
    model fitted on the replica's device (JSON of inlaid_ray/bench/step_cost.py) when one is given."""
    factory = _POLICIES.get(name)
    kwargs = dict(options or {})
    if step_cost_model is not None and getattr(factory, "uses_cost_model", False):
        kwargs["cost"] = StepCostModel.load(step_cost_model)
    return make_policy(name, **kwargs)


register_policy(FifoPolicy)
