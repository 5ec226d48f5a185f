"""GPTQ v1 format (docs/algorithms.md section 3): packing round-trips exactly through the kernel
references, the v1 zero convention, and checkpoint save/load of a whole (tiny) model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inlaid_ray.errors import ModelLoadError
from inlaid_ray.kernels.reference import gptq_dequantize_ref, unpack_codes
from inlaid_ray.model.config import LINEAR_MODULES
from inlaid_ray.quant import (
    HessianAccumulator,
    QuantGrid,
    gptq_quantize,
)
from inlaid_ray.quantized_base import (
    QuantizeConfig,
    load_gptq_checkpoint,
    pack_gptq_result,
    save_gptq_checkpoint,
)

AUTOGPTQ_KEYS = {
    "bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
    "model_name_or_path", "model_file_base_name", "quant_method", "checkpoint_format",
}


def _quantize(W: torch.Tensor, grid: QuantGrid, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    acc = HessianAccumulator(W.shape[1])
    acc.add_batch(torch.randn(256, W.shape[1], generator=g) * (torch.rand(W.shape[1], generator=g) + 0.1))
    return gptq_quantize(W, acc.H, grid)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_round_trip_is_exact(bits: int, desc_act: bool, sym: bool) -> None:
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)) * 0.05
    r = _quantize(W, QuantGrid(bits=bits, group_size=32, desc_act=desc_act, sym=sym))
    t = pack_gptq_result(r)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (128 * bits // 32, 64)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (4, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (4, 64)
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"], r.g_idx)
    assert torch.equal(unpack_codes(t["qweight"], bits, 128, dim=0), r.codes.t())
    assert torch.equal(unpack_codes(t["qzeros"], bits, 64, dim=1) + 1, r.zeros)
    # dequantized weight == the quantizer's grid values, exactly (fp32 scales hold fp16 values)
    deq32 = gptq_dequantize_ref(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], bits)
    assert torch.equal(deq32, r.Q)
    deq16 = gptq_dequantize_ref(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert deq16.dtype == torch.float16 and torch.equal(deq16, r.Q.half())


def test_v1_zero_convention_sym_4bit_nibbles_are_7() -> None:
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    t = pack_gptq_result(_quantize(W, QuantGrid(bits=4, group_size=32, sym=True)))
    word = sum(7 << (4 * j) for j in range(8))  # 0x77777777
    assert torch.all(t["qzeros"] == word)


def test_asymmetric_zero_point_0_cannot_be_written_as_v1() -> None:
    W = torch.rand(32, 64, generator=torch.Generator().manual_seed(0))  # all >= 0: zero point 0
    r = _quantize(W, QuantGrid(bits=4, group_size=-1, sym=False))
    assert int(r.zeros.min()) == 0
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq_result(r)


def _quantized_tiny_model(model_dir: Path, grid: QuantGrid):
    """Every projection of the tiny model GPTQ-quantized; the rest as HF tensors."""
    state = load_file(str(model_dir / "model.safetensors"))
    layers, other = {}, {}
    for name, w in state.items():
        prefix = name.removesuffix(".weight")
        if prefix.rsplit(".", 1)[-1] in LINEAR_MODULES:
            bias = torch.randn(w.shape[0]) if "q_proj" in prefix else None  # exercise the optional bias
            layers[prefix] = pack_gptq_result(_quantize(w, grid), bias=bias)
        else:
            other[name] = w
    return layers, other


def _save(tiny_llama_dir: Path, out: Path, grid: QuantGrid, **kw) -> tuple[dict, dict]:
    layers, other = _quantized_tiny_model(tiny_llama_dir, grid)
    hf_config = json.loads((tiny_llama_dir / "config.json").read_text())
    meta = {"method": "mlgptq", "task_ids": ["a", "b"], "aggregation": "max", "activation_source": "fp16",
            "damping": {"model.layers.0.self_attn.q_proj": 0.01}}
    save_gptq_checkpoint(out, layers, other, hf_config, QuantizeConfig(grid, "tiny"), meta, **kw)
    return layers, other


def test_checkpoint_round_trip_bit_exact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"fake": true}')
    grid = QuantGrid(bits=4, group_size=32, desc_act=True)
    layers, other = _save(tiny_llama_dir, tmp_path / "q", grid, tokenizer_dir=tok)
    config, qc, tensors = load_gptq_checkpoint(tmp_path / "q")

    assert len(layers) == 2 * len(LINEAR_MODULES)
    for prefix, layer in layers.items():
        for name, t in layer.items():
            loaded = tensors[f"{prefix}.{name}"]
            expected = t.to(torch.float16) if name == "bias" else t
            assert loaded.dtype == expected.dtype and torch.equal(loaded, expected), f"{prefix}.{name}"
    for name, t in other.items():
        assert tensors[name].dtype == torch.float16 and torch.equal(tensors[name], t.half())

    qjson = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert AUTOGPTQ_KEYS <= set(qjson)
    assert qjson["quant_method"] == "gptq" and qjson["checkpoint_format"] == "gptq"
    assert (qjson["bits"], qjson["group_size"], qjson["desc_act"], qjson["sym"]) == (4, 32, True, True)
    assert qjson["meta"]["aggregation"] == "max" and qjson["meta"]["task_ids"] == ["a", "b"]
    assert config["quantization_config"] == qjson
    assert qc.grid == grid and qc.meta["damping"] == {"model.layers.0.self_attn.q_proj": 0.01}
    assert (tmp_path / "q" / "tokenizer.json").read_text() == '{"fake": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "tok"]  # no temp dirs left behind


def test_existing_directory_needs_overwrite(tiny_llama_dir: Path, tmp_path: Path) -> None:
    grid = QuantGrid(bits=4, group_size=32)
    _save(tiny_llama_dir, tmp_path / "q", grid)
    with pytest.raises(FileExistsError, match="already exists"):
        _save(tiny_llama_dir, tmp_path / "q", grid)
    grid8 = QuantGrid(bits=8, group_size=-1)
    _save(tiny_llama_dir, tmp_path / "q", grid8, overwrite=True)
    assert load_gptq_checkpoint(tmp_path / "q")[1].grid == grid8
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.fixture(scope="module")
def saved(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "q"
    _save(tiny_llama_dir, out, QuantGrid(bits=4, group_size=32))
    return out


def _corrupt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


P = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__(f"{P}.qweight", t[f"{P}.qweight"].to(torch.int64)), "qweight has dtype torch.int64"),
    (lambda t: t.__setitem__(f"{P}.qzeros", t[f"{P}.qzeros"][:, :4].contiguous()), r"qzeros has shape \(3, 4\)"),
    (lambda t: t.__setitem__(f"{P}.g_idx", t[f"{P}.g_idx"] + 3), r"g_idx values span \[3, 5\]"),
    (lambda t: t.pop(f"{P}.scales"), r"missing GPTQ tensors \['scales'\]"),
    (lambda t: t.__setitem__(f"{P}.scales", t[f"{P}.scales"].to(torch.int32)), "scales has dtype"),
])
def test_load_rejects_corrupt_tensors(saved: Path, tmp_path: Path, edit, match: str) -> None:
    bad = _corrupt(saved, tmp_path / "bad", edit)
    with pytest.raises(ModelLoadError, match=match):
        load_gptq_checkpoint(bad)


def test_load_rejects_layer_not_fitting_model(saved: Path, tmp_path: Path) -> None:
    def swap(t):  # put an up_proj (96 x 64) where down_proj (64 x 96) belongs
        for n in ("qweight", "qzeros", "scales", "g_idx"):
            t[f"{P}.{n}"] = t[f"model.layers.1.mlp.up_proj.{n}"].clone()
    with pytest.raises(ModelLoadError, match=r"down_proj: quantized shape \(d_out=96, d_in=64\)"):
        load_gptq_checkpoint(_corrupt(saved, tmp_path / "bad", swap))


def test_load_rejects_unsupported_configs(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    qpath = bad / "quantize_config.json"
    q = json.loads(qpath.read_text())
    qpath.write_text(json.dumps({**q, "checkpoint_format": "gptq_v2"}))
    with pytest.raises(ModelLoadError, match="gptq_v2"):
        load_gptq_checkpoint(bad)
    qpath.write_text(json.dumps({**q, "bits": 5}))
    with pytest.raises(ModelLoadError, match="bits=5"):
        load_gptq_checkpoint(bad)
    qpath.unlink()  # falls back to config.json["quantization_config"]
    assert load_gptq_checkpoint(bad)[1].grid.bits == 4
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_gptq_checkpoint(bad)


def test_save_validates_layers_and_names(tiny_llama_dir: Path, tmp_path: Path) -> None:
    grid = QuantGrid(bits=4, group_size=32)
    layers, other = _quantized_tiny_model(tiny_llama_dir, grid)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    broken = {**layers, P: {**layers[P], "qweight": layers[P]["qweight"][:-1]}}
    with pytest.raises(ModelLoadError, match=f"{P}.qweight has shape"):
        save_gptq_checkpoint(tmp_path / "q", broken, other, cfg, QuantizeConfig(grid))
    clash = {**other, f"{P}.scales": torch.zeros(1)}
    with pytest.raises(ValueError, match="both a quantized-layer tensor"):
        save_gptq_checkpoint(tmp_path / "q", layers, clash, cfg, QuantizeConfig(grid))
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []
