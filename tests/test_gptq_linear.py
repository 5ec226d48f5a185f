"""GPTQLinear: forward equals x @ dequantized_weight.T, the optional cache never goes stale, and it
drops into the model's AdaptedLinear / Transformer in place of DenseLinear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inlaid_ray.errors import ModelLoadError
from inlaid_ray.kernels.reference import gptq_dequantize_ref
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.layers import AdaptedLinear, DenseLinear
from inlaid_ray.model.runner import prefill_logits
from inlaid_ray.model.transformer import Transformer
from inlaid_ray.quant import (
    HessianAccumulator,
    QuantGrid,
    gptq_quantize,
)
from inlaid_ray.quantized_base import (
    GPTQLinear,
    QuantizeConfig,
    gptq_linear_factory,
    load_gptq_checkpoint,
    pack_gptq_result,
    save_gptq_checkpoint,
    split_layers,
)


def _packed(d_out: int, d_in: int, bits: int, seed: int, desc_act: bool = True, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    acc = HessianAccumulator(d_in)
    acc.add_batch(torch.randn(128, d_in, generator=g))
    r = gptq_quantize(W, acc.H, QuantGrid(bits=bits, group_size=32, desc_act=desc_act))
    return r, pack_gptq_result(r, bias=torch.randn(d_out, generator=g) if bias else None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_equals_matmul_with_dequantized_weight(bits: int, dtype: torch.dtype) -> None:
    r, t = _packed(64, 96, bits, seed=bits)
    lin = GPTQLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, t["bias"])
    assert (lin.in_features, lin.out_features) == (96, 64)
    W = lin.dequantized_weight()
    assert torch.equal(W, r.Q.half())  # the served weight is the quantizer's grid, in fp16
    x = torch.randn(5, 96).to(dtype)
    expected = (x.float() @ W.float().t() + t["bias"].float()).to(dtype)
    assert torch.equal(lin(x), expected)
    assert torch.equal(lin(x.reshape(1, 5, 96)), expected.reshape(1, 5, 64))  # leading dims kept


def test_cache_matches_uncached_and_follows_weight_changes() -> None:
    _, t1 = _packed(64, 64, 4, seed=1)
    _, t2 = _packed(64, 64, 4, seed=2)
    plain = GPTQLinear(**{k: v.clone() for k, v in t1.items()}, bits=4)
    cached = GPTQLinear(**{k: v.clone() for k, v in t1.items()}, bits=4, cache_dequantized=True)
    x = torch.randn(3, 64)
    assert torch.equal(cached(x), plain(x)) and torch.equal(cached(x), plain(x))  # second call: cache hit
    for lin in (plain, cached):  # an in-place hot swap of the packed tensors
        lin.load_state_dict(t2)
    assert torch.equal(cached(x), plain(x))
    ref = GPTQLinear(**t2, bits=4)
    assert torch.equal(cached(x), ref(x))
    cached.double()  # .to() replaces buffers: the cache must be rebuilt, not reused
    assert cached.dequantized_weight().dtype == torch.float64
    expected = gptq_dequantize_ref(t2["qweight"], t2["qzeros"], t2["scales"].double(), t2["g_idx"], 4)
    assert torch.equal(cached.dequantized_weight(), expected)
    with torch.inference_mode():  # inference tensors: cache bypassed, result still right
        inf = GPTQLinear(**{k: v.clone() for k, v in t2.items()}, bits=4, cache_dequantized=True)
        assert torch.equal(inf(x), ref(x))


def test_empty_then_load_state_dict_equals_from_checkpoint_tensors() -> None:
    _, t = _packed(64, 96, 4, seed=3)
    flat = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in t.items()}
    direct = GPTQLinear.from_checkpoint_tensors("model.layers.0.mlp.up_proj.", flat, bits=4)
    empty = GPTQLinear.empty(64, 96, bias=True, bits=4, group_size=32)
    empty.load_state_dict(t, strict=True)
    x = torch.randn(4, 96)
    assert torch.equal(direct(x), empty(x))
    no_gidx = {k: v for k, v in flat.items() if "g_idx" not in k}
    with pytest.raises(ModelLoadError, match=r"model.layers.0.mlp.up_proj: missing GPTQ tensors \['g_idx'\]"):
        GPTQLinear.from_checkpoint_tensors("model.layers.0.mlp.up_proj", no_gidx, 4)


def test_drop_in_for_dense_base_of_adapted_linear() -> None:
    _, t = _packed(64, 96, 4, seed=4, bias=False)
    q = AdaptedLinear(GPTQLinear(**t, bits=4), layer_idx=0, name="up_proj")
    W = gptq_dequantize_ref(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4).float()
    d = AdaptedLinear(DenseLinear(W), layer_idx=0, name="up_proj")
    x = torch.randn(7, 96)
    assert (q.in_features, q.out_features) == (d.in_features, d.out_features)
    torch.testing.assert_close(q(x), d(x), rtol=1e-5, atol=1e-6)  # fp32 matmul vs F.linear


def test_quantized_checkpoint_runs_in_transformer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Whole model: GPTQLinear bases built by the factory, loaded from a saved checkpoint, give the
    logits of a dense model holding the dequantized weights."""
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    grid = QuantGrid(bits=4, group_size=32, desc_act=True)
    layers, other = {}, {}
    for name, w in state.items():
        prefix = name.removesuffix(".weight")
        if prefix.rsplit(".", 1)[-1] in LINEAR_MODULES:
            acc = HessianAccumulator(w.shape[1])
            acc.add_batch(torch.randn(64, w.shape[1]))
            layers[prefix] = pack_gptq_result(gptq_quantize(w, acc.H, grid))
        else:
            other[name] = w
    hf = json.loads((tiny_llama_dir / "config.json").read_text())
    save_gptq_checkpoint(tmp_path / "q", layers, other, hf, QuantizeConfig(grid))
    cfg_dict, qc, tensors = load_gptq_checkpoint(tmp_path / "q")
    config = ModelConfig.from_hf_dict(cfg_dict)

    def base_name(n: str) -> str:  # HF prefix.qweight -> our prefix.base.qweight
        prefix, leaf = n.rsplit(".", 1)
        return f"{prefix}.base.{leaf}" if prefix in packed else n

    packed = split_layers(tensors)
    factory = gptq_linear_factory(qc.grid.bits, qc.grid.group_size)
    qmodel = Transformer(config, torch.float32, "cpu", make_linear=factory)
    qmodel.load_state_dict({base_name(n): v for n, v in tensors.items()}, strict=True)
    dense = {n: v for n, v in tensors.items() if n.rsplit(".", 1)[0] not in packed}
    for prefix, layer in packed.items():
        dense[f"{prefix}.base.weight"] = gptq_dequantize_ref(
            layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], qc.grid.bits
        )
    dmodel = Transformer(config, torch.float32, "cpu")
    dmodel.load_state_dict(dense, strict=True)
    tokens = [[1, 5, 9, 30], [7, 2]]
    for lq, ld in zip(prefill_logits(qmodel.eval(), tokens), prefill_logits(dmodel.eval(), tokens)):
        torch.testing.assert_close(lq, ld, rtol=1e-4, atol=1e-4)
