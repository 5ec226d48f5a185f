"""One step of admission: turn a policy's order into the step's plan (who decodes, who
prefills, who is paused, who is preempted), with vLLM's block accounting. The simulator
uses it, and the engine can call it too, so both apply the same rules to the same policy.

Rules (the seam of `policy.py`, made exact):
- A running request decodes one token. Its cache holds `p + g - 1` tokens (p prompt tokens,
  g generated; the newest token is not cached yet) and needs room for `p + g` after the step.
- A waiting request prefills `p + g` tokens (g > 0 after a recompute preemption) and needs
  `ceil((p + g) / block_size)` blocks. No chunked prefill: `p + g` must fit the token budget.
- Candidates are tried in the policy's order while seats (`max_num_seqs`), tokens
  (`max_num_batched_tokens`) and blocks allow. A waiting misfit ends the admission of
  waiting requests when the policy has `head_of_line_blocking` (strict FIFO), otherwise it
  is skipped; running requests after it are still tried.
- `budget.reserve_blocks` (vLLM's watermark) are kept free from prefills while anyone holds blocks.
- A running request short of a block asks `policy.preemption_victim` among running
  requests not yet scheduled this step (itself included); the victim's blocks are freed and
  it is recomputed later. Waiting requests never evict anyone.
- Running requests neither scheduled nor preempted are paused: they keep their blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inlaid_ray.sched.policy import SchedulableRequest, SchedulingPolicy, StepBudget

R = TypeVar("R", bound=SchedulableRequest)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` cached tokens."""
    return -(-num_tokens // block_size)


def cached_tokens(request: SchedulableRequest) -> int:
    """Tokens a *running* request has in its KV cache before this step (`p + g - 1`)."""
    return request.num_prompt_tokens + request.num_output_tokens - 1


def held_blocks(request: SchedulableRequest, block_size: int) -> int:
    """Blocks a running request holds (what preempting it frees)."""
    return blocks_for(cached_tokens(request), block_size)


def prefill_tokens(request: SchedulableRequest) -> int:
    """Tokens a waiting request processes when admitted (its prompt plus any recomputed output)."""
    return request.num_prompt_tokens + request.num_output_tokens


@dataclass
class StepPlan(Generic[R]):
    """What one step runs. `scheduled` is in admission order; the others are disjoint from it."""

    scheduled: list[R] = field(default_factory=list)
    prefills: list[R] = field(default_factory=list)  # waiting requests admitted this step
    decodes: list[R] = field(default_factory=list)  # running requests decoding one token
    preempted: list[R] = field(default_factory=list)  # running, blocks freed, back to waiting
    paused: list[R] = field(default_factory=list)  # running, skipped this step, blocks kept
    num_batched_tokens: int = 0
    blocks_allocated: int = 0  # new blocks taken by scheduled requests
    blocks_freed: int = 0  # blocks released by preemption

    def distinct_tasks(self) -> int:
        """Distinct tasks (adapters; None = base) among the scheduled requests."""
        return len({r.task for r in self.scheduled})


def plan_step(
    policy: SchedulingPolicy,
    waiting: Sequence[R],
    running: Sequence[R],
    budget: StepBudget,
) -> StepPlan[R]:
    """Ask `policy` for an order and admit it under `budget` (see module docstring).

    `budget.reserve_blocks` are kept free from new prefills while anyone holds blocks (vLLM's
    watermark) so admitted requests can decode a while before anyone must be preempted.
    """
    order = policy.order(waiting, running, budget)
    running_ids = {r.request_id for r in running}
    bs = budget.block_size
    seats, tokens, free = budget.max_num_seqs, budget.max_num_batched_tokens, budget.num_free_blocks
    plan: StepPlan[R] = StepPlan()
    done: set[str] = set()  # scheduled or preempted this step
    seen: set[str] = set()
    admit_waiting = True
    holders = len(running)  # requests holding blocks: running, minus evicted, plus admitted
    for r in order:
        assert r.request_id not in seen, f"policy {policy.name} listed {r.request_id} twice"
        seen.add(r.request_id)
        if r.request_id in done:  # preempted earlier in this step as someone's victim
            continue
        if r.request_id in running_ids:
            if seats < 1 or tokens < 1:
                continue
            need = blocks_for(cached_tokens(r) + 1, bs) - held_blocks(r, bs)
            while need > free:
                candidates = [x for x in running if x.request_id not in done]
                victim = policy.preemption_victim(candidates, budget)
                assert victim.request_id in running_ids and victim.request_id not in done, (
                    f"policy {policy.name} chose victim {victim.request_id} outside the candidates"
                )
                done.add(victim.request_id)
                plan.preempted.append(victim)
                holders -= 1
                freed = held_blocks(victim, bs)
                free += freed
                plan.blocks_freed += freed
                if victim.request_id == r.request_id:
                    break
            if r.request_id in done:
                continue
            free -= need
            seats -= 1
            tokens -= 1
            plan.decodes.append(r)
        else:
            if not admit_waiting:
                continue
            n = prefill_tokens(r)
            need = blocks_for(n, bs)
            reserve = budget.reserve_blocks if holders else 0
            if seats < 1 or tokens < n or free - reserve < need:
                if policy.head_of_line_blocking:
                    admit_waiting = False  # strict FIFO: nobody overtakes the head
                continue
            holders += 1
            free -= need
            seats -= 1
            tokens -= n
            plan.prefills.append(r)
        done.add(r.request_id)
        plan.scheduled.append(r)
        plan.blocks_allocated += need
        plan.num_batched_tokens += 1 if r.request_id in running_ids else prefill_tokens(r)
    preempted_ids = {r.request_id for r in plan.preempted}
    scheduled_ids = {r.request_id for r in plan.scheduled}
    plan.paused = [r for r in running if r.request_id not in preempted_ids and r.request_id not in scheduled_ids]
    return plan
