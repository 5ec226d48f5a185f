"""Serving the MLGPTQ checkpoint: `load_base` builds GPTQLinear projections from the GPTQ v1
directory, and the engine on that ONE quantized base with every task's adapter produces the same
greedy tokens as the dense model holding the dequantized weights, on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.kernels.reference import gptq_dequantize_ref
from inlaid_ray.lora import load_peft_adapter
from inlaid_ray.model import ModelConfig, Transformer, load_model, prefill_logits
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.quantized_base.checkpoint import load_gptq_checkpoint, split_layers
from inlaid_ray.quantized_base.linear import GPTQLinear
from inlaid_ray.quant.incremental import TaskSource, quantize_base
from inlaid_ray.quant.mlgptq import MLGPTQConfig, proj
from inlaid_ray.quant.quantizer import QuantGrid
from test_mlgptq_setup import GROUP_SIZE, make_task_sources, write_tiny_base

PROMPTS = [[1, 5, 7, 9, 11], [4, 4, 4, 8, 30, 2], list(range(3, 25)), [7, 40]]


def dequantized_dense_model(ckpt: Path) -> Transformer:
    """A dense fp32 model whose projections hold the checkpoint's dequantized weights (fp32 scales)."""
    hf, qc, tensors = load_gptq_checkpoint(ckpt)
    config = ModelConfig.from_hf_dict(hf)
    layers = split_layers(tensors)
    state = {n: t.float() for n, t in tensors.items() if n.rsplit(".", 1)[0] not in layers}
    for prefix, layer in layers.items():
        state[f"{prefix}.base.weight"] = gptq_dequantize_ref(
            layer["qweight"], layer["qzeros"], layer["scales"].float(), layer["g_idx"], qc.grid.bits)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = Transformer(config, torch.float32, "cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _greedy(model, bank, adapters, tasks, n=8):
    if bank is not None:
        for a in adapters:
            bank.add(a)
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=48, max_num_batched_tokens=128, max_num_seqs=8)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    jobs = [(p, t) for p in PROMPTS for t in tasks]
    outs = engine.generate([p for p, _ in jobs], SamplingParams(max_tokens=n, ignore_eos=True), [t for _, t in jobs])
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("qeng")
    base = write_tiny_base(root / "base")
    sources = make_task_sources(root, base)
    cfg = MLGPTQConfig(grid=QuantGrid(bits=4, group_size=GROUP_SIZE, desc_act=True), batch_tokens=96)
    quantize_base(base, sources, root / "q", cfg, progress=False)
    return root, base, sources


def _bank(config, n):
    from inlaid_ray.lora import AdapterBank

    return AdapterBank(config, max_slots=n, max_rank=8)


def test_loader_builds_gptq_linears_with_exact_grid_weights(quantized):
    root, base, _ = quantized
    qmodel = load_base(root / "q")
    dense = dequantized_dense_model(root / "q")
    for layer in range(qmodel.config.num_layers):
        for module in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"):
            q = proj(qmodel, layer, module).base
            assert isinstance(q, GPTQLinear)
            assert torch.equal(q.dequantized_weight(), proj(dense, layer, module).base.weight)
    assert not isinstance(proj(load_model(base), 0, "q_proj").base, GPTQLinear)  # dense path unchanged


def test_engine_on_quantized_base_matches_dequantized_dense_model(quantized):
    root, base, sources = quantized
    qmodel = load_base(root / "q")
    dense = dequantized_dense_model(root / "q")
    adapters = [load_peft_adapter(s.adapter_dir, qmodel.config, name=s.name) for s in sources]
    tasks = [None, *(s.name for s in sources)]
    got = _greedy(qmodel, _bank(qmodel.config, len(adapters)), adapters, tasks)
    want = _greedy(dense, _bank(dense.config, len(adapters)), adapters, tasks)
    assert got == want
    assert len({tuple(t) for t in got}) > len(PROMPTS)  # the adapters change the outputs
    slots = [0] * len(PROMPTS)
    for lq, ld in zip(prefill_logits(qmodel, PROMPTS, slots), prefill_logits(dense, PROMPTS, slots)):
        torch.testing.assert_close(lq, ld, rtol=1e-5, atol=1e-5)


def test_quantized_base_differs_from_fp16_but_stays_close(quantized):
    """Sanity of the served numbers: 4-bit logits move, but far less than the logits' own spread."""
    root, base, _ = quantized
    lq = torch.cat(prefill_logits(load_base(root / "q"), PROMPTS))
    lf = torch.cat(prefill_logits(load_model(base), PROMPTS))
    assert not torch.equal(lq, lf)
    assert float((lq - lf).pow(2).mean()) < 0.1 * float(lf.var())


@pytest.mark.slow
def test_smollm2_quantized_engine_matches_dequantized_dense(smollm2_dir, tmp_path):
    """Real SmolLM2: RTN 4-bit g64 checkpoint through load_base + engine == the dense model holding
    the same dequantized weights (taken from the GPTQLinears, checked against the packed tensors)."""
    from inlaid_ray.model import encode_chat, load_tokenizer

    cfg = MLGPTQConfig(method="rtn", grid=QuantGrid(bits=4, group_size=64))
    quantize_base(smollm2_dir, [], tmp_path / "rtn", cfg, progress=False)
    qc = json.loads((tmp_path / "rtn" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["quant_method"], qc["meta"]["method"]) == (4, 64, "gptq", "rtn")
    qmodel = load_base(tmp_path / "rtn", cache_dequantized=True)
    dense = load_model(smollm2_dir)
    _, _, tensors = load_gptq_checkpoint(tmp_path / "rtn")
    with torch.no_grad():
        for name, t in tensors.items():  # non-quantized tensors: what the checkpoint stores (fp16)
            if not name.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx"):
                dense.get_parameter(name).copy_(t.float())
        for layer in range(dense.config.num_layers):
            for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                w = proj(qmodel, layer, module).base.dequantized_weight()
                proj(dense, layer, module).base.weight.copy_(w)
    lt = split_layers(tensors)["model.layers.7.mlp.down_proj"]  # spot check against the packed tensors
    assert torch.equal(proj(dense, 7, "down_proj").base.weight,
                       gptq_dequantize_ref(lt["qweight"], lt["qzeros"], lt["scales"].float(), lt["g_idx"], 4))
    tok = load_tokenizer(smollm2_dir)
    prompts = [encode_chat(tok, [{"role": "user", "content": c}]) for c in ("What is 2+2?", "Name a colour.")]
    outs = []
    for model in (qmodel, dense):
        engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=32, max_model_len=256, max_num_seqs=2))
        outs.append([o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=8))])
    assert outs[0] == outs[1]


def test_task_spec_parsing():
    s = TaskSource.parse("email=/a/b:c:/d/calib.jsonl")
    assert (s.name, s.adapter_dir, s.calibration) == ("email", Path("/a/b:c"), Path("/d/calib.jsonl"))
    assert TaskSource.parse("base=:x.jsonl").adapter_dir is None


def test_dense_loader_refuses_a_quantized_checkpoint_with_a_pointer_to_load_base(tmp_path):
    from inlaid_ray.errors import ModelLoadError

    (tmp_path / "quantize_config.json").write_text('{"bits": 4, "group_size": 64}')
    with pytest.raises(ModelLoadError, match="load_base"):
        load_model(tmp_path)
