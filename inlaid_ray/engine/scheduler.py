"""Which requests run in the next step: the engine's queues and KV blocks around a policy.

The `SchedulingPolicy` decides priority; `inlaid_ray.sched.admission.plan_step` turns its
order into the step's plan with vLLM's rules (seats, token budget, KV blocks, watermark,
head-of-line blocking, recompute preemption via `policy.preemption_victim`, pausing), the
same function the simulator uses. This module applies the plan to real state: it frees
the victims' blocks and re-queues them, gives each admitted request the blocks for its
whole prefill (prompt + tokens generated before a preemption) and each decoding request
the block its next token needs, and marks the block holders left out as PAUSED.
"""

from __future__ import annotations

from dataclasses import dataclass

from inlaid_ray.engine.block_allocator import BlockAllocator, blocks_for
from inlaid_ray.engine.request import Request, RequestStatus
from inlaid_ray.sched.admission import plan_step
from inlaid_ray.sched.policy import SchedulingPolicy, StepBudget


@dataclass(frozen=True)
class SchedulerLimits:
    """Per-step resources (copied from EngineConfig)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    watermark_blocks: int = 0  # kept free when admitting while others hold blocks (vLLM)


class Scheduler:
    """Waiting and block-holding queues plus the block allocator, driven by a policy."""

    def __init__(self, policy: SchedulingPolicy, allocator: BlockAllocator, limits: SchedulerLimits) -> None:
        self.policy = policy
        self.allocator = allocator
        self.limits = limits
        # Keyed by request id, in insertion order (arrival, or preemption for re-queued ones).
        self.waiting: dict[str, Request] = {}  # no KV blocks
        self.holding: dict[str, Request] = {}  # RUNNING or PAUSED: own KV blocks
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        assert request.status is RequestStatus.WAITING and not request.block_ids, (
            f"{request.request_id}: new requests must be waiting without blocks, got {request.status}"
        )
        assert request.request_id not in self.waiting and request.request_id not in self.holding, (
            f"request id {request.request_id} is already queued"
        )
        self.waiting[request.request_id] = request

    def budget(self, now: float) -> StepBudget:
        lim = self.limits
        return StepBudget(lim.max_num_seqs, lim.max_num_batched_tokens, self.allocator.num_free, lim.block_size, now,
                          reserve_blocks=lim.watermark_blocks)

    def schedule(self, now: float) -> tuple[list[Request], StepBudget]:
        """Requests to run this step (each feeds tokens num_computed_tokens..num_tokens)."""
        budget = self.budget(now)
        plan = plan_step(self.policy, list(self.waiting.values()), list(self.holding.values()), budget)
        for req in plan.preempted:  # frees first; the plan's block accounting covers the rest
            self.preempt(req, now)
        for req in plan.prefills:
            self._admit(req)
        for req in plan.decodes:
            self._grow(req)
        chosen = {r.request_id for r in plan.scheduled}
        for req in self.holding.values():
            req.status = RequestStatus.RUNNING if req.request_id in chosen else RequestStatus.PAUSED
        return plan.scheduled, budget

    def _admit(self, req: Request) -> None:
        """Give a waiting request all the blocks its prefill needs."""
        assert self.waiting.get(req.request_id) is req, f"admitted {req.request_id}, which is not waiting here"
        assert req.status is RequestStatus.WAITING and not req.block_ids and req.num_computed_tokens == 0, (
            f"{req.request_id}: waiting requests hold no cache, got {req.status} {req.block_ids}"
        )
        req.block_ids = self.allocator.allocate(blocks_for(req.num_tokens, self.limits.block_size))
        del self.waiting[req.request_id]
        self.holding[req.request_id] = req

    def _grow(self, req: Request) -> None:
        """Add the block the next decode token needs, if it crosses a block boundary."""
        assert self.holding.get(req.request_id) is req, f"decoding {req.request_id}, which holds no blocks here"
        assert req.num_computed_tokens == req.num_tokens - 1, (
            f"{req.request_id}: a decoding request has all but its newest token cached, "
            f"got {req.num_computed_tokens} of {req.num_tokens}"
        )
        need = blocks_for(req.num_tokens, self.limits.block_size) - len(req.block_ids)
        assert need in (0, 1), f"{req.request_id}: needs {need} new blocks for one decode token"
        if need:
            req.block_ids.extend(self.allocator.allocate(need))

    def preempt(self, req: Request, now: float) -> None:
        """Free a block holder's KV; it re-prefills prompt + output when admitted again."""
        self.allocator.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.wait_start = now
        req.num_preemptions += 1
        self.num_preemptions += 1
        del self.holding[req.request_id]
        self.waiting[req.request_id] = req

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if req.block_ids:
            self.allocator.free(req.block_ids)
            req.block_ids = []
        self.holding.pop(req.request_id, None)
        self.waiting.pop(req.request_id, None)

    # Stats are read from other threads while a step runs: list() copies the values in one
    # C-level call under the GIL, where a generator over the live dict could see it resize.
    @property
    def num_running(self) -> int:
        return sum(r.status is RequestStatus.RUNNING for r in list(self.holding.values()))

    @property
    def num_paused(self) -> int:
        return sum(r.status is RequestStatus.PAUSED for r in list(self.holding.values()))

    def adapters(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(adapters of running or paused requests, adapters of waiting ones), each sorted, distinct."""
        holding = {r.task for r in list(self.holding.values()) if r.task is not None}
        waiting = {r.task for r in list(self.waiting.values()) if r.task is not None}
        return tuple(sorted(holding)), tuple(sorted(waiting))
