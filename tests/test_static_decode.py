"""Fixed-shape decode steps (engine/static_decode.py): requests of several adapters and of the
base decoded through the padded bucket buffers give each request the greedy output of its own
merged model; and, on the CUDA code path (Triton kernels interpreted on CPU), two decode steps
of one bucket with different contexts and adapter mixes run the same ops on the same shapes and
the same launches, with no host sync, data-dependent shape or host data (bench/step_trace.py):
what CUDA-graph capture and replay need."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.bench.step_trace import StepTrace, differences
from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.engine.static_decode import StaticDecodeInputs, decode_buckets
from inlaid_ray.lora.bank import AdapterBank
from inlaid_ray.model import load_model
from inlaid_ray.model.attention import select_decode_attention
from inlaid_ray.model.transformer import fuse_projections
from test_engine import reference_greedy
from test_engine_lora import ADAPTERS, PROMPTS, _adapter, _merged_model


def _bank(config, kernels="auto", loaded: int = len(ADAPTERS), **where) -> tuple[AdapterBank, dict]:
    """A bank with the first `loaded` test adapters, and all of them by name."""
    adapters = {n: _adapter(config, n, r, mods, i) for i, (n, (r, mods)) in enumerate(ADAPTERS.items())}
    bank = AdapterBank(config, max_slots=4, max_rank=8, kernels=kernels, **where)
    for adapter in list(adapters.values())[:loaded]:
        bank.add(adapter)
    return bank, adapters


def _run(engine: LLMEngine, jobs, n: int, on_step=None) -> dict[str, list[int]]:
    ids, tokens = {}, {}
    for i, (prompt, task) in enumerate(jobs):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True), task=task)
        ids[rid] = (tuple(prompt), task)
        if i % 3 == 2:  # staggered arrivals: buckets fill and drain
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    while engine.has_unfinished():
        if on_step is not None:
            on_step(engine)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return {ids[r]: t for r, t in tokens.items()}


def test_buckets() -> None:
    assert decode_buckets(10) == (1, 2, 4, 8, 10)
    assert decode_buckets(64)[-3:] == (32, 48, 64)
    inputs = StaticDecodeInputs(10, 4, 4, 99, "cpu", None)
    assert [inputs.bucket_for(n) for n in (1, 3, 8, 9, 10, 11)] == [1, 4, 8, 10, 10, None]


def test_static_decode_matches_each_requests_merged_model(tiny_llama_dir):
    config = load_model(tiny_llama_dir).config
    bank, adapters = _bank(config)
    model = load_model(tiny_llama_dir, adapter_bank=bank)
    cfg = EngineConfig(block_size=4, num_kv_blocks=40, max_model_len=40, max_num_batched_tokens=64, max_num_seqs=10,
                       static_decode=True)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    assert engine.allocator.num_blocks == 39  # one scratch block for the padding rows
    n = 8
    jobs = [(p, t) for p in PROMPTS for t in (None, *ADAPTERS)]
    got = _run(engine, jobs, n)
    assert len(engine.static_decode._buffers) >= 3  # several buckets were used
    merged = {None: model} | {name: _merged_model(tiny_llama_dir, a) for name, a in adapters.items()}
    for (prompt, task), tokens in got.items():
        assert tokens == reference_greedy(merged[task], list(prompt), n), (prompt, task)
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.slow  # the engine with interpreted Triton kernels: tens of seconds
def test_decode_steps_of_one_bucket_are_graph_safe_on_the_cuda_code_path(tiny_llama_dir):
    """Triton kernels (interpreted) for attention and LoRA, fused q/k/v and gate/up; the traced
    forwards of two decode steps in one bucket, with different context lengths and adapter mixes (one with none),
    are identical and free of syncs, data-dependent shapes and host data; outputs match the
    merged models."""
    config = load_model(tiny_llama_dir).config
    bank, adapters = _bank(config, kernels="triton")
    model = load_model(tiny_llama_dir, adapter_bank=bank)
    fuse_projections(model)  # as served: the SGMV kernels write into column views of the fused GEMMs
    model.decode_attention = select_decode_attention("cpu", "triton")
    cfg = EngineConfig(block_size=4, num_kv_blocks=40, max_model_len=40, max_num_batched_tokens=64, max_num_seqs=4,
                       static_decode=True)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    traces: list[tuple[int, StepTrace]] = []
    forward = model.forward

    def traced(input_ids, batch, kv_cache, all_logits=False):
        if max(batch.query_lens_list) > 1:  # prefill / mixed steps are not captured
            return forward(input_ids, batch, kv_cache, all_logits)
        with StepTrace() as trace:
            out = forward(input_ids, batch, kv_cache, all_logits)
        traces.append((int(input_ids.shape[0]), trace))
        return out

    model.forward = traced
    n = 5
    jobs = [(PROMPTS[0], "qv_r2"), (PROMPTS[1], None), (PROMPTS[2], "all_r8"), (PROMPTS[3], "ko_r1"),
            (PROMPTS[1], None), (PROMPTS[0], None)]
    try:
        got = _run(engine, jobs, n)
    finally:
        del model.forward
    by_bucket: dict[int, list[StepTrace]] = {}
    for bucket, trace in traces:
        assert trace.problems() == [], trace.problems()
        by_bucket.setdefault(bucket, []).append(trace)
    assert by_bucket.get(4) and len(by_bucket[4]) >= 2, {b: len(t) for b, t in by_bucket.items()}
    assert any(t.launches for t in by_bucket[4])  # the Triton path ran
    for bucket, ts in by_bucket.items():
        for t in ts[1:]:
            assert differences(ts[0], t) == [], (bucket, differences(ts[0], t))
    merged = {None: model} | {name: _merged_model(tiny_llama_dir, a) for name, a in adapters.items()}
    for (prompt, task), tokens in got.items():
        assert tokens == reference_greedy(merged[task], list(prompt), n), (prompt, task)


@pytest.mark.slow  # the engine with interpreted Triton kernels: tens of seconds
def test_an_all_base_step_launches_what_an_adapter_step_does(tiny_llama_dir):
    """A bucket's graph may be captured on a step without any adapter token and replayed for
    steps with adapters: both must run the same launches, for o_proj and down_proj too (not
    fused), on the Triton path; outputs still match the merged models."""
    config = load_model(tiny_llama_dir).config
    bank, adapters = _bank(config, kernels="triton")
    model = load_model(tiny_llama_dir, adapter_bank=bank)
    fuse_projections(model)
    model.decode_attention = select_decode_attention("cpu", "triton")
    cfg = EngineConfig(block_size=4, num_kv_blocks=40, max_model_len=40, max_num_batched_tokens=64, max_num_seqs=4,
                       static_decode=True)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    traces: dict[str | None, list[StepTrace]] = {}
    forward = model.forward
    task_now: list[str | None] = [None]

    def traced(input_ids, batch, kv_cache, all_logits=False):
        if max(batch.query_lens_list) > 1:
            return forward(input_ids, batch, kv_cache, all_logits)
        with StepTrace() as trace:
            out = forward(input_ids, batch, kv_cache, all_logits)
        traces.setdefault(task_now[0], []).append(trace)
        return out

    model.forward = traced
    got = {}
    try:
        for task in (None, "ko_r1", "mlp_r4"):  # one request at a time: always bucket 1
            task_now[0] = task
            got[task] = _run(engine, [(PROMPTS[0], task)], 4)[(tuple(PROMPTS[0]), task)]
    finally:
        del model.forward
    base = traces[None][0]
    for task in ("ko_r1", "mlp_r4"):
        assert differences(base, traces[task][0]) == [], (task, differences(base, traces[task][0]))
    merged = {None: model} | {name: _merged_model(tiny_llama_dir, a) for name, a in adapters.items()}
    for task, tokens in got.items():
        assert tokens == reference_greedy(merged[task], PROMPTS[0], 4), task


def test_the_trace_catches_what_capture_forbids() -> None:
    """The checker itself, on the operations it must flag (independent of the engine)."""
    x = torch.arange(6.0)
    with StepTrace() as t:
        x.sum().item()
        torch.nonzero(x > 2)
        x[x > 2]
        torch.tensor([1, 2])
        x.tolist()
    problems = t.problems()
    assert sum("host sync" in p for p in problems) == 2
    assert sum("data-dependent" in p for p in problems) == 2
    assert any("host data" in p for p in problems)
    with StepTrace() as a:
        x[:3] * 2
    with StepTrace() as b:
        x[:4] * 2
    assert differences(a, b)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(tiny_llama_dir):
    """On a GPU: decode steps replayed from CUDA graphs (one per bucket, recaptured after an
    adapter load) give the tokens of the eager static path, for several adapters and the base."""
    config = load_model(tiny_llama_dir).config
    outputs = {}
    for graphs in (False, True):
        bank, adapters = _bank(config, loaded=3, dtype=torch.float16, device="cuda")
        model = load_model(tiny_llama_dir, dtype=torch.float16, device="cuda", adapter_bank=bank)
        cfg = EngineConfig(block_size=4, num_kv_blocks=40, max_model_len=40, max_num_batched_tokens=64,
                           max_num_seqs=8, static_decode=True, cuda_graphs=graphs)
        engine = LLMEngine(model, None, cfg, adapter_bank=bank)
        jobs = [(p, t) for p in PROMPTS for t in (None, *list(ADAPTERS)[:3])]
        first = _run(engine, jobs, 12)
        bank.add(adapters["ko_r1"])  # a load: every graph must be dropped and recaptured
        second = _run(engine, [(p, "ko_r1") for p in PROMPTS], 12)
        outputs[graphs] = (first, second)
        if graphs:
            assert engine.decode_graphs.num_captures >= 2 and engine.decode_graphs.num_replays > 10
    assert outputs[True] == outputs[False]
