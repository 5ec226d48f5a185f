"""Thousands of random requests with random aborts through a KV pool small enough to force
preemption: block ownership stays consistent every step, every block comes back, every
request ends exactly once with the number of tokens its limits imply."""

from __future__ import annotations

import dataclasses
import random

import pytest

from inlaid_ray.engine import EngineConfig, LLMEngine, RequestStatus, SamplingParams
from inlaid_ray.model import load_model

import inlaid_ray.sched.policies  # noqa: F401  (registers the non-FIFO policies)
from inlaid_ray.sched import SchedulingPolicy, make_policy

NUM_REQUESTS = {"fifo": 2000, "srtf-cost": 500, "mlfq": 500}


class Counting(SchedulingPolicy):
    """Delegates to a registered policy and counts on_finished calls per request."""

    name = "counting"

    def __init__(self, inner: SchedulingPolicy) -> None:
        self.inner = inner
        self.head_of_line_blocking = inner.head_of_line_blocking
        self.finished: dict[str, int] = {}

    def order(self, waiting, running, budget):
        return self.inner.order(waiting, running, budget)

    def preemption_victim(self, candidates, budget):
        return self.inner.preemption_victim(candidates, budget)

    def on_step(self, scheduled, budget) -> None:
        self.inner.on_step(scheduled, budget)

    def on_finished(self, request, now: float) -> None:
        self.finished[request.request_id] = self.finished.get(request.request_id, 0) + 1
        self.inner.on_finished(request, now)


def _check_block_ownership(engine: LLMEngine) -> None:
    """Every block is either free or owned by exactly one block-holding request."""
    owned: list[int] = []
    for req in engine.scheduler.holding.values():
        assert req.status in (RequestStatus.RUNNING, RequestStatus.PAUSED) and req.block_ids
        assert len(req.block_ids) * engine.config.block_size >= req.num_computed_tokens
        owned += req.block_ids
    for req in engine.scheduler.waiting.values():
        assert req.status is RequestStatus.WAITING and not req.block_ids and req.num_computed_tokens == 0
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert not any(engine.allocator.is_free(b) for b in owned), "an owned block is on the free list"
    assert len(owned) + engine.allocator.num_free == engine.allocator.num_blocks, "a block leaked"


@pytest.mark.parametrize("policy_name", [pytest.param(p, marks=pytest.mark.slow) if p == "fifo" else p  # fifo: longest run
                                         for p in sorted(NUM_REQUESTS)])
def test_random_traffic_with_aborts_and_preemption(tiny_llama_dir, policy_name):
    rng = random.Random(0)
    model = load_model(tiny_llama_dir)
    eos = set(model.config.eos_token_ids)
    cfg = EngineConfig(block_size=4, num_kv_blocks=24, max_model_len=64, max_num_batched_tokens=64,
                       max_num_seqs=16, kv_watermark=0.0)
    policy = Counting(make_policy(policy_name))
    engine = LLMEngine(model, None, cfg, policy=policy)
    specs: dict[str, tuple[list[int], SamplingParams]] = {}
    tokens: dict[str, list[int]] = {}
    finals: dict[str, list] = {}
    added, num_requests = 0, NUM_REQUESTS[policy_name]
    while added < num_requests or engine.has_unfinished():
        for _ in range(rng.choice((0, 1, 2, 3))):
            if added == num_requests:
                break
            prompt = [rng.randrange(160) for _ in range(rng.randrange(1, 17))]
            params = SamplingParams(
                max_tokens=rng.randrange(1, 11),
                temperature=rng.choice((0.0, 0.8)),
                seed=rng.randrange(1000),
                ignore_eos=rng.random() < 0.7,
            )
            rid = engine.add_request(prompt, params, predicted_output_len=rng.choice((None, 4.0, 12.0)))
            specs[rid], tokens[rid] = (prompt, params), []
            added += 1
        in_flight = list(specs.keys() - finals.keys())
        if in_flight and rng.random() < 0.05:
            out = engine.abort(rng.choice(in_flight))
            finals.setdefault(out.request_id, []).append(out)
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
            if out.finished:
                finals.setdefault(out.request_id, []).append(out)
        _check_block_ownership(engine)

    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert engine.stats().num_preemptions > 0, "the pool should have been small enough to preempt"
    assert set(finals) == set(specs) and all(len(f) == 1 for f in finals.values())
    assert policy.finished == {rid: 1 for rid in specs}
    # The same requests in a pool large enough for all of them at once, no aborts: every
    # output (greedy and seeded sampling) must be what the preempted, interleaved run produced.
    roomy = LLMEngine(model, None, dataclasses.replace(cfg, num_kv_blocks=64 * 7, max_num_seqs=64))
    reference = roomy.generate([p for p, _ in specs.values()], [sp for _, sp in specs.values()])
    assert roomy.stats().num_preemptions == 0
    reasons = {"stop": 0, "length": 0, "abort": 0}
    for (rid, (prompt, params)), ref in zip(specs.items(), reference):
        final, got = finals[rid][0], tokens[rid]
        reasons[final.finish_reason] += 1
        assert final.num_completion_tokens == len(got)
        if final.finish_reason == "abort":
            assert got == list(ref.token_ids[: len(got)]) and len(got) < len(ref.token_ids)
        else:
            assert (got, final.finish_reason) == (list(ref.token_ids), ref.finish_reason), rid
        limit = min(params.max_tokens, cfg.max_model_len - len(prompt))
        if final.finish_reason == "length":
            assert len(got) == limit
        elif final.finish_reason == "stop":
            assert not params.ignore_eos and got[-1] in eos and len(got) <= limit
        if final.finish_reason != "stop" and not params.ignore_eos:
            assert not eos & set(got), f"{rid} went past EOS: {got}"
    assert reasons["length"] > 0 and reasons["abort"] > 0, reasons
