"""Load-time fusion of q/k/v and gate/up (model/transformer.py `fuse_projections`): one GEMM per
group, each part keeping its own adapters. The fused model gives the unfused model's logits and
greedy tokens, dense and GPTQ (act-order included: q/k/v share a Hessian, so one g_idx), with
adapters of different ranks and target modules; parts that cannot be stacked stay separate."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.bench.step_trace import StepTrace
from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.lora import load_peft_adapter
from inlaid_ray.lora.bank import AdapterBank
from inlaid_ray.model import load_model, prefill_logits
from inlaid_ray.model.transformer import fuse_projections
from inlaid_ray.quantized_base.linear import GPTQLinear
from inlaid_ray.quant.incremental import quantize_base
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.quant.mlgptq import MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from test_engine_lora import ADAPTERS, PROMPTS, _adapter
from test_mlgptq_setup import GROUP_SIZE, make_task_sources, write_tiny_base


def _bank(config, adapters) -> AdapterBank:
    bank = AdapterBank(config, max_slots=len(adapters), max_rank=8)
    for a in adapters:
        bank.add(a)
    return bank


def _greedy(model, bank, tasks) -> list[tuple[int, ...]]:
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=48, max_num_batched_tokens=128, max_num_seqs=8)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    jobs = [(p, t) for p in PROMPTS for t in tasks]
    outs = engine.generate([p for p, _ in jobs], SamplingParams(max_tokens=8, ignore_eos=True), [t for _, t in jobs])
    return [o.token_ids for o in outs]


def _linear_ops(model, slots) -> int:
    with StepTrace() as trace:
        prefill_logits(model, PROMPTS[:1], slots[:1])
    return sum(op[0].split(".")[0] in ("linear", "mm", "addmm") for op in trace.ops)


def test_fused_dense_model_equals_unfused_with_adapters(tiny_llama_dir):
    config = load_model(tiny_llama_dir).config
    adapters = [_adapter(config, n, r, mods, i) for i, (n, (r, mods)) in enumerate(ADAPTERS.items())]
    plain = load_model(tiny_llama_dir, adapter_bank=_bank(config, adapters))
    fused = load_model(tiny_llama_dir, adapter_bank=_bank(config, adapters))
    assert fuse_projections(fused) == 2 * config.num_layers
    block = fused.model.layers[0]
    assert not hasattr(block.self_attn, "q_proj") and block.mlp.gate_up_proj.sizes == [config.intermediate_size] * 2
    slots = [0, 1, 2, 3]  # one adapter per prompt: every part's own adapter lands in its columns
    for a, b in zip(prefill_logits(fused, PROMPTS, slots), prefill_logits(plain, PROMPTS, slots)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tasks = [None, *ADAPTERS]
    assert _greedy(fused, fused.adapter_bank, tasks) == _greedy(plain, plain.adapter_bank, tasks)
    per_layer = (_linear_ops(plain, slots) - 1) / config.num_layers, (_linear_ops(fused, slots) - 1) / config.num_layers
    assert per_layer == (7, 4)  # q, k, v, o, gate, up, down -> qkv, o, gate_up, down (+ lm_head)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_q")
    base = write_tiny_base(root / "base")
    sources = make_task_sources(root, base)
    cfg = MLGPTQConfig(grid=QuantGrid(bits=4, group_size=GROUP_SIZE, desc_act=True), batch_tokens=96)
    quantize_base(base, sources, root / "q", cfg, progress=False)
    return root, sources


def test_fused_gptq_model_equals_unfused(quantized):
    root, sources = quantized
    plain, fused = load_base(root / "q"), load_base(root / "q")
    adapters = [load_peft_adapter(s.adapter_dir, plain.config, name=s.name) for s in sources]
    plain.adapter_bank, fused.adapter_bank = _bank(plain.config, adapters), _bank(fused.config, adapters)
    assert fuse_projections(fused) == 2 * plain.config.num_layers
    qkv = fused.model.layers[0].self_attn.qkv_proj.base
    assert isinstance(qkv, GPTQLinear) and qkv.out_features == sum(fused.model.layers[0].self_attn.qkv_proj.sizes)
    slots = [0, 1, -1, 0][: len(PROMPTS)]
    for a, b in zip(prefill_logits(fused, PROMPTS, slots), prefill_logits(plain, PROMPTS, slots)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tasks = [None, *(s.name for s in sources)]
    assert _greedy(fused, fused.adapter_bank, tasks) == _greedy(plain, plain.adapter_bank, tasks)


def test_parts_that_cannot_be_stacked_stay_separate(quantized):
    root, _ = quantized
    model = load_base(root / "q")
    attn = model.model.layers[0].self_attn
    attn.k_proj.base.g_idx = attn.k_proj.base.g_idx.flip(0).contiguous()  # another grouping than q and v
    assert fuse_projections(model) == 2 * model.config.num_layers - 1
    assert attn.qkv_proj is None and hasattr(attn, "q_proj")
    assert model.model.layers[0].mlp.gate_up_proj is not None
