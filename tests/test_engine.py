"""LLMEngine on a tiny random GQA Llama: greedy outputs equal a no-cache reference
(full prefill of the growing sequence), whatever the batch, the arrival times, pauses or
preemptions; stop tokens, EOS and length limits end requests with the right reason; bad
input raises the right error and leaves the engine working."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from conftest import write_tiny_hf_model
from inlaid_ray.engine import EngineConfig, LLMEngine, RequestStatus, SamplingParams, blocks_for
from inlaid_ray.engine.limits import ContextLengthExceeded
from inlaid_ray.errors import InvalidRequest, TaskNotFound
from inlaid_ray.model import load_model, prefill_logits
from inlaid_ray.sched import FifoPolicy, StepBudget
from inlaid_ray.sched.cost_model import StepCostModel

PROMPTS = [[1, 5, 7, 9, 11], [4, 4, 4], list(range(2, 31)), [7], [150, 3, 99, 12, 8, 8, 40]]
CFG = EngineConfig(block_size=4, num_kv_blocks=128, max_model_len=64, max_num_batched_tokens=128, max_num_seqs=8)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a fresh full prefill of prompt + tokens so far (no KV reuse)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(prefill_logits(model, [seq])[0][-1].argmax()))
    return seq[len(prompt):]


class RecordingFifo(FifoPolicy):
    """FIFO that records what ran each step (prefill = no computed tokens yet) and finishes."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, bool]]] = []
        self.finished: list[str] = []

    def on_step(self, scheduled, budget: StepBudget) -> None:
        self.steps.append([(r.request_id, r.num_computed_tokens == 0) for r in scheduled])

    def on_finished(self, request, now: float) -> None:
        self.finished.append(request.request_id)


def test_batched_greedy_equals_reference(model):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    outs = LLMEngine(model, None, CFG).generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert list(out.token_ids) == reference_greedy(model, prompt, 10)
        assert (out.finish_reason, out.num_completion_tokens, out.num_prompt_tokens) == ("length", 10, len(prompt))


def test_staggered_arrivals_mix_prefill_and_decode_and_match_alone(model):
    """Requests join while others decode; each output equals that request decoded alone."""
    policy = RecordingFifo()
    engine = LLMEngine(model, None, CFG, policy=policy)
    lengths = [12, 3, 9, 15, 6]
    ids, outputs = [], {}
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
        ids.append(engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
        for _ in range(i + 1):  # the next request arrives after a few steps
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, prompt, n in zip(ids, PROMPTS, lengths):
        alone = LLMEngine(model, None, CFG).generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert outputs[rid] == list(alone.token_ids) == reference_greedy(model, prompt, n)
    assert any(any(p for _, p in s) and any(not p for _, p in s) for s in policy.steps), "no mixed step"
    assert sorted(policy.finished) == sorted(ids)
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_preemption_recomputes_to_identical_outputs(model, temperature):
    prompts = [[(7 * i + j) % 160 for j in range(3 + 2 * i)] for i in range(8)]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, temperature=temperature, seed=i) for i in range(8)]
    roomy = LLMEngine(model, None, CFG)
    expected = roomy.generate(prompts, params)
    assert roomy.stats().num_preemptions == 0
    # 12 blocks of 4 tokens hold 48 tokens; 8 requests of up to 41 tokens must take turns.
    tight = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=12, max_model_len=48,
                                                max_num_batched_tokens=64, max_num_seqs=8))
    got = tight.generate(prompts, params)
    assert tight.stats().num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert tight.allocator.num_free == 12


def test_paused_requests_keep_their_cache_and_resume_identically(model):
    class PauseOne(FifoPolicy):
        """Leaves request 'slow' out of every other step (it keeps its KV blocks)."""

        def __init__(self) -> None:
            self.calls = 0

        def order(self, waiting, running, budget):
            self.calls += 1
            ordered = super().order(waiting, running, budget)
            if self.calls % 2 == 0:
                ordered = [r for r in ordered if not (r.request_id == "slow" and r in running)]
            return ordered

    engine = LLMEngine(model, None, CFG, policy=PauseOne())
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request(PROMPTS[0], params, request_id="slow")
    engine.add_request(PROMPTS[1], params, request_id="fast")
    seen_paused, tokens = False, {"slow": [], "fast": []}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        req = engine.get_request("slow")
        if req is not None and req.status is RequestStatus.PAUSED:
            seen_paused = True
            assert req.block_ids, "a paused request keeps its blocks"
    assert seen_paused
    assert tokens["slow"] == reference_greedy(model, PROMPTS[0], 8)
    assert tokens["fast"] == reference_greedy(model, PROMPTS[1], 8)


def test_head_of_line_blocking_only_under_fifo(model):
    """A prompt that does not fit the free blocks holds back later arrivals only under FIFO."""

    class SkipFifo(RecordingFifo):
        head_of_line_blocking = False

    cfg = EngineConfig(block_size=4, num_kv_blocks=16, max_model_len=60, max_num_batched_tokens=64, kv_watermark=0.0)
    first_prefill = {}
    for policy in (RecordingFifo(), SkipFifo()):
        engine = LLMEngine(model, None, cfg, policy=policy)
        engine.add_request(list(range(1, 33)), SamplingParams(max_tokens=20, ignore_eos=True), request_id="a")
        engine.step()  # 'a' holds 8 blocks and will need more
        engine.add_request(list(range(1, 41)), SamplingParams(max_tokens=2, ignore_eos=True), request_id="big")
        engine.add_request([5, 6], SamplingParams(max_tokens=2, ignore_eos=True), request_id="small")
        while engine.has_unfinished():
            engine.step()
        order = [rid for step in policy.steps for rid, prefill in step if prefill and rid != "a"]
        first_prefill[type(policy).__name__] = order[0]
    assert first_prefill == {"RecordingFifo": "big", "SkipFifo": "small"}


def test_stop_token_ids_eos_and_length(model, tmp_path):
    base = reference_greedy(model, PROMPTS[0], 12)
    stop_tok = base[5]
    first = base.index(stop_tok)
    engine = LLMEngine(model, None, CFG)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,), ignore_eos=True))[0]
    assert (list(out.token_ids), out.finish_reason) == (base[: first + 1], "stop")

    # The same weights with that token as EOS: stops there unless ignore_eos.
    eos_dir = write_tiny_hf_model(tmp_path / "eos", eos_token_id=stop_tok)
    eos_model = load_model(eos_dir)
    assert eos_model.config.eos_token_ids == (stop_tok,)
    eos_engine = LLMEngine(eos_model, None, CFG)
    stopped, ignored = eos_engine.generate(
        [PROMPTS[0], PROMPTS[0]], [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, ignore_eos=True)]
    )
    assert (list(stopped.token_ids), stopped.finish_reason) == (base[: first + 1], "stop")
    assert (list(ignored.token_ids), ignored.finish_reason) == (base, "length")

    # max_model_len ends a request whose max_tokens would go further.
    short = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=20, max_num_batched_tokens=32))
    out = short.generate([PROMPTS[2][:15]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert (out.num_completion_tokens, out.finish_reason) == (5, "length")
    assert list(out.token_ids) == reference_greedy(model, PROMPTS[2][:15], 5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompt_token_ids=[1, 2], task="nope"), TaskNotFound, "'nope'"),
        (dict(prompt_token_ids=[]), InvalidRequest, "empty"),
        (dict(prompt_token_ids=[1] * 64), ContextLengthExceeded, "maximum context length is 64 tokens.*prompt has 64 tokens"),
        (dict(prompt_token_ids=[1, 160]), InvalidRequest, r"\[160\]"),
        (dict(prompt_token_ids=[1], params=SamplingParams(temperature=-0.5)), InvalidRequest, "-0.5"),
        (dict(prompt_token_ids=[1], params=SamplingParams(temperature=math.nan)), InvalidRequest, "nan"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_p=0.0)), InvalidRequest, "top_p.*0.0"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_p=1.5)), InvalidRequest, "1.5"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_p=math.nan)), InvalidRequest, "top_p.*nan"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_k=0)), InvalidRequest, "top_k.*0"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_k=-2)), InvalidRequest, "-2"),
        (dict(prompt_token_ids=[1], params=SamplingParams(max_tokens=0)), InvalidRequest, "max_tokens.*0"),
        (dict(prompt_token_ids=[1], params=SamplingParams(max_tokens=64)), InvalidRequest, "max_tokens=64"),
        (dict(prompt_token_ids=[1], params=SamplingParams(stop=("x",))), InvalidRequest, "tokenizer"),
        (dict(prompt_token_ids=[1], params=SamplingParams(temperature=1.0, seed=2**70)), InvalidRequest, "seed"),
        (dict(prompt_token_ids="hello"), InvalidRequest, "token ids"),
        (dict(prompt_token_ids=[1, None]), InvalidRequest, "integer token ids"),
    ],
)
def test_bad_input_raises_and_engine_keeps_working(model, kwargs, error, match):
    engine = LLMEngine(model, None, CFG)
    engine.add_request([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True), request_id="ok")
    engine.step()
    with pytest.raises(error, match=match):
        engine.add_request(**kwargs)
    with pytest.raises(InvalidRequest, match="'ok' is already in use"):
        engine.add_request([1], request_id="ok")
    tokens = list(engine.get_request("ok").output_token_ids)
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.token_ids]
    assert tokens == reference_greedy(model, [3, 4, 5], 4)
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.scheduler.waiting


def test_abort_frees_blocks_and_leaves_others_alone(model):
    policy = RecordingFifo()
    engine = LLMEngine(model, None, CFG, policy=policy)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    keep = engine.add_request(PROMPTS[2], params)
    drop = engine.add_request(PROMPTS[0], params)
    tokens = {keep: [], drop: []}
    for _ in range(4):
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    held = len(engine.get_request(drop).block_ids)
    free_before = engine.allocator.num_free
    final = engine.abort(drop)
    assert (final.finished, final.finish_reason, final.num_completion_tokens) == (True, "abort", 4)
    assert engine.allocator.num_free == free_before + held > free_before
    assert engine.abort(drop) is None  # already gone
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    assert tokens[keep] == reference_greedy(model, PROMPTS[2], 10)
    assert tokens[drop] == reference_greedy(model, PROMPTS[0], 4)
    assert sorted(policy.finished) == sorted([keep, drop])
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_stats_and_config_validation(model):
    engine = LLMEngine(model, None, CFG)
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    s = engine.stats()
    assert (s.num_running, s.num_waiting, s.last_step_num_seqs) == (2, 0, 2)
    assert s.last_step_num_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    used = blocks_for(len(PROMPTS[0]), 4) + blocks_for(len(PROMPTS[1]), 4)
    assert s.num_free_blocks == s.num_kv_blocks - used and s.kv_usage == pytest.approx(used / 128)
    with pytest.raises(ValueError, match="max_model_len=100 > max_num_batched_tokens=64"):
        LLMEngine(model, None, EngineConfig(max_model_len=100, max_num_batched_tokens=64, num_kv_blocks=64))
    with pytest.raises(ValueError, match="num_kv_blocks=3 .* \\(needs 4\\)"):
        LLMEngine(model, None, EngineConfig(block_size=16, max_model_len=64, num_kv_blocks=3))
    with pytest.raises(ValueError, match="block_size=0"):
        EngineConfig(block_size=0)
    derived = LLMEngine(model, None, EngineConfig(max_num_batched_tokens=256, max_num_seqs=2))
    assert derived.max_model_len == 256 and derived.allocator.num_blocks <= 2 * 16
    assert derived.kv_cache.key_caches[0].dtype == torch.float32


def test_engine_gives_cost_aware_policies_the_replicas_step_cost_model(model, tmp_path):
    """EngineConfig.step_cost_model (an inlaid-ray bench step-cost JSON) reaches the srtf-cost policy's
    batch shaping; policies that do not price steps are built as usual."""
    fitted = StepCostModel(a_s=0.25, b_s_per_token=0.012, c_s_per_adapter=0.034, d_s_per_kv_token=4.8e-4,
                           e_s_per_adapter_load=0.0, source="fitted on this CPU")
    fitted.save(tmp_path / "cost.json", extra={"fit": {"r2": 0.6}})
    inlaid = LLMEngine(model, None, replace(CFG, policy="srtf-cost", step_cost_model=str(tmp_path / "cost.json")))
    assert inlaid.policy.config.cost == fitted
    assert LLMEngine(model, None, replace(CFG, policy="srtf-cost")).policy.config.cost == StepCostModel()
    isolated = LLMEngine(model, None, replace(CFG, policy="srtf-cost", policy_options={"starvation_rule": "isolated"}))
    assert isolated.policy.config.starvation_rule == "isolated"  # AppArgs.policy_options reach the replica's policy
    fifo = LLMEngine(model, None, replace(CFG, policy="fifo", step_cost_model=str(tmp_path / "cost.json")))
    assert isinstance(fifo.policy, FifoPolicy)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])],
)
def test_device_run_matches_reference_and_seeded_sampling_is_batch_independent(tiny_llama_dir, device):
    model = load_model(tiny_llama_dir, device=device)
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = LLMEngine(model, None, CFG).generate(PROMPTS, greedy)
    assert outs[0].token_ids and all(list(o.token_ids) == reference_greedy(model, p, 8) for p, o in zip(PROMPTS, outs))
    sampled = [SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.95, seed=i) for i in range(len(PROMPTS))]
    together = LLMEngine(model, None, CFG).generate(PROMPTS, sampled)
    alone = [LLMEngine(model, None, CFG).generate([p], [sp])[0] for p, sp in zip(PROMPTS, sampled)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
