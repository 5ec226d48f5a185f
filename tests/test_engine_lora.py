"""Multi-LoRA batches through the engine: requests of 4 adapters (different ranks and target
modules) and of the base model, decoded together with staggered arrivals and forced
preemption, give each request the greedy output of its own merged model (W + s B A)."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.errors import TaskNotFound
from inlaid_ray.model import load_model
from test_engine import reference_greedy

bank_mod = pytest.importorskip("inlaid_ray.lora.bank", reason="the adapter bank (inlaid_ray/lora/bank.py) is not written yet")
from inlaid_ray.lora import LoRAAdapter  # noqa: E402
from inlaid_ray.lora.synthetic import random_lora_adapter  # noqa: E402

# name -> (rank, target modules)
ADAPTERS = {
    "qv_r2": (2, ("q_proj", "v_proj")),
    "all_r8": (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "mlp_r4": (4, ("gate_proj", "up_proj", "down_proj")),
    "ko_r1": (1, ("k_proj", "o_proj")),
}
PROMPTS = [[1, 5, 7, 9, 11], [4, 4, 4, 8], list(range(2, 21)), [7, 100]]


def _adapter(config, name: str, rank: int, modules, seed: int) -> LoRAAdapter:
    return random_lora_adapter(config, name, rank, modules, seed, a_std=0.3, b_std=0.3, scale=2.0 / rank)


def _merged_model(model_dir, adapter: LoRAAdapter):
    """The base model with every adapted projection's weight replaced by W + s B A."""
    merged = load_model(model_dir)
    with torch.no_grad():
        for (layer, module), _ in adapter.weights.items():
            block = merged.model.layers[layer]
            proj = getattr(block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, module)
            proj.base.weight += adapter.delta_weight(layer, module).to(proj.base.weight.dtype)
    return merged


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    config = load_model(tiny_llama_dir).config
    adapters = {n: _adapter(config, n, r, mods, i) for i, (n, (r, mods)) in enumerate(ADAPTERS.items())}
    bank = bank_mod.AdapterBank(config, max_slots=4, max_rank=8)
    for adapter in adapters.values():
        bank.add(adapter)
    model = load_model(tiny_llama_dir, adapter_bank=bank)
    return model, bank, adapters


def test_four_adapters_in_one_batch_match_their_merged_models(setup, tiny_llama_dir):
    model, bank, adapters = setup
    n = 10
    tasks = [None, *ADAPTERS]
    # 20 blocks of 4 tokens hold 80 tokens; 20 requests of up to 29 tokens take turns (preemption).
    cfg = EngineConfig(block_size=4, num_kv_blocks=20, max_model_len=40, max_num_batched_tokens=64, max_num_seqs=10)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    jobs = [(prompt, task) for prompt in PROMPTS for task in tasks]  # 20 requests
    ids, tokens, max_adapters = {}, {}, 0
    for i, (prompt, task) in enumerate(jobs):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True), task=task)
        ids[rid] = (tuple(prompt), task)
        if i % 3 == 2:  # staggered arrivals
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
            max_adapters = max(max_adapters, engine.stats().last_step_num_adapters)
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        max_adapters = max(max_adapters, engine.stats().last_step_num_adapters)
    assert engine.stats().num_preemptions > 0 and max_adapters == 4
    assert engine.allocator.num_free == engine.allocator.num_blocks

    merged = {None: model} | {name: _merged_model(tiny_llama_dir, a) for name, a in adapters.items()}
    expected = {(tuple(p), t): reference_greedy(merged[t], p, n) for p, t in jobs}
    for rid, key in ids.items():
        assert tokens[rid] == expected[key], f"{key}"
    for prompt in PROMPTS:  # the adapters really change the outputs
        outs = {tuple(expected[(tuple(prompt), t)]) for t in tasks}
        assert len(outs) > 1


def test_unknown_task_and_bank_mismatch(setup, tiny_llama_dir):
    model, bank, adapters = setup
    cfg = EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=40, max_num_batched_tokens=64)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    with pytest.raises(TaskNotFound, match="'missing'"):
        engine.add_request([1, 2, 3], task="missing")
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, ignore_eos=True), tasks=["qv_r2"])[0]
    assert list(out.token_ids) == reference_greedy(_merged_model(tiny_llama_dir, adapters["qv_r2"]), PROMPTS[0], 4)
    with pytest.raises(ValueError, match="different adapter banks"):
        LLMEngine(model, None, cfg, adapter_bank=bank_mod.AdapterBank(model.config, max_slots=1, max_rank=1))


def test_adapter_removed_mid_request_aborts_only_its_requests(tiny_llama_dir):
    config = load_model(tiny_llama_dir).config
    bank = bank_mod.AdapterBank(config, max_slots=2, max_rank=8)
    gone, kept = (_adapter(config, n, r, m, i) for i, (n, (r, m)) in enumerate(list(ADAPTERS.items())[:2]))
    bank.add(gone)
    bank.add(kept)
    engine = LLMEngine(load_model(tiny_llama_dir, adapter_bank=bank), None,
                       EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=40, max_num_batched_tokens=64))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a = engine.add_request(PROMPTS[0], params, task=gone.name)
    b = engine.add_request(PROMPTS[1], params, task=kept.name)
    tokens = {a: [], b: []}
    for out in engine.step():
        tokens[out.request_id].extend(out.token_ids)
    bank.remove(gone.name)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
            if out.finished:
                finals[out.request_id] = out.finish_reason
    assert finals == {a: "abort", b: "length"} and len(tokens[a]) == 1
    assert tokens[b] == reference_greedy(_merged_model(tiny_llama_dir, kept), PROMPTS[1], 6)
    assert engine.allocator.num_free == engine.allocator.num_blocks
