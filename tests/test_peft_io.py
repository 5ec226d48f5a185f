"""PEFT adapter loading/saving against real adapters written by `peft` on a tiny random Llama:
tensors and scaling equal PEFT's own modules, every unsupported or broken input is an
AdapterError naming the problem, and pickle files are never unpickled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from inlaid_ray.errors import AdapterError
from inlaid_ray.lora import LoRAAdapter, load_peft_adapter, save_peft_adapter
from inlaid_ray.model.config import ModelConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
SMOL_PATH = "/root/.cache/inlaid-ray/models/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def hf_config() -> LlamaConfig:
    return LlamaConfig(**TINY)


@pytest.fixture(scope="module")
def model_config(hf_config) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf_config.to_dict(), name_or_path=SMOL_PATH)


def make_peft(hf_config: LlamaConfig, out: Path, seed: int = 0, **lora_kwargs):
    """Write a real PEFT adapter (random A and B) to `out`; returns the PEFT model."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(LlamaForCausalLM(hf_config),
                                LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    peft_model.save_pretrained(str(out))
    return peft_model


def peft_factors(peft_model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, module) -> (A, B, scaling) read from PEFT's live LoRA layers."""
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
            out[(int(m[1]), m[2])] = (mod.lora_A["default"].weight.detach(),
                                      mod.lora_B["default"].weight.detach(), mod.scaling["default"])
    return out


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn) -> None:
    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

LORA_CASES = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora_all_linear": dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "patterns_layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                            rank_pattern={"k_proj": 2, "model.layers.1.mlp.down_proj": 6},
                            alpha_pattern={"up_proj": 3}, layers_to_transform=[1]),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj", "o_proj"],
                            rank_pattern={"o_proj": 7}, alpha_pattern={"v_proj": 5}),
    "regex": dict(r=3, lora_alpha=6, target_modules=r".*\.1\.self_attn\.(q|o)_proj|.*\.0\.mlp\.gate_proj"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_load_matches_peft_tensors_and_scaling(case, hf_config, model_config, tmp_path):
    peft_model = make_peft(hf_config, tmp_path, **LORA_CASES[case])
    expected = peft_factors(peft_model)
    adapter = load_peft_adapter(tmp_path, model_config, name="t")
    assert set(adapter.weights) == set(expected)
    for key, (a, b, scale) in expected.items():
        f = adapter.weights[key]
        assert torch.equal(f.a, a) and torch.equal(f.b, b), key
        assert f.scale == pytest.approx(scale, rel=1e-12), key
    assert adapter.max_rank == max(a.shape[0] for a, _, _ in expected.values())
    assert adapter.modules == {m for _, m in expected}
    assert adapter.num_bytes == sum((a.numel() + b.numel()) * 4 for a, b, _ in expected.values())
    assert adapter.content_hash == hashlib.sha256((tmp_path / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_load_converts_dtype_and_keeps_scale(hf_config, model_config, tmp_path):
    peft_model = make_peft(hf_config, tmp_path, **LORA_CASES["patterns_layers"])
    adapter = load_peft_adapter(tmp_path, model_config, dtype=torch.bfloat16)
    for key, (a, b, scale) in peft_factors(peft_model).items():
        f = adapter.weights[key]
        assert f.a.dtype == torch.bfloat16 and torch.equal(f.a, a.to(torch.bfloat16))
        assert torch.equal(f.b, b.to(torch.bfloat16)) and f.scale == pytest.approx(scale)


def test_legacy_all_linear_string_and_unknown_keys(hf_config, model_config, tmp_path):
    """Older PEFT wrote target_modules="all-linear" verbatim; unknown keys must be ignored."""
    peft_model = make_peft(hf_config, tmp_path, **LORA_CASES["rslora_all_linear"])
    edit_config(tmp_path, target_modules="all-linear", some_future_key={"x": 1}, exclude_modules=None)
    adapter = load_peft_adapter(tmp_path, model_config)
    assert set(adapter.weights) == set(peft_factors(peft_model))


def test_save_round_trips_through_peft(hf_config, model_config, tmp_path):
    """Saved adapters fold the scaling (lora_alpha = r) and PEFT reads back the same delta."""
    make_peft(hf_config, tmp_path / "src", **LORA_CASES["patterns_layers"])
    adapter = load_peft_adapter(tmp_path / "src", model_config)
    digest = save_peft_adapter(adapter, tmp_path / "out")
    reloaded = load_peft_adapter(tmp_path / "out", model_config)
    assert reloaded.content_hash == digest
    assert set(reloaded.weights) == set(adapter.weights)
    peft_back = PeftModel.from_pretrained(LlamaForCausalLM(hf_config), str(tmp_path / "out"))
    peft_back_factors = peft_factors(peft_back)
    assert set(peft_back_factors) == set(adapter.weights)
    for key in adapter.weights:
        want = adapter.delta_weight(*key)
        assert reloaded.weights[key].scale == 1.0
        torch.testing.assert_close(reloaded.delta_weight(*key), want, rtol=1e-6, atol=1e-6)
        a, b, scale = peft_back_factors[key]
        assert scale == 1.0
        torch.testing.assert_close(scale * b @ a, want, rtol=1e-6, atol=1e-6)


def test_save_ragged_coverage_is_exact(hf_config, model_config, tmp_path):
    """Different modules per layer: PEFT must not create extra (zero) modules on reload."""
    make_peft(hf_config, tmp_path / "src", **LORA_CASES["regex"])
    adapter = load_peft_adapter(tmp_path / "src", model_config)
    save_peft_adapter(adapter, tmp_path / "out")
    peft_back = PeftModel.from_pretrained(LlamaForCausalLM(hf_config), str(tmp_path / "out"))
    assert set(peft_factors(peft_back)) == set(adapter.weights)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def good_dir(hf_config, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    make_peft(hf_config, d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return d


def _write(d: Path, name: str, data: bytes) -> None:
    (d / name).write_bytes(data)


def _random_bytes(n: int) -> bytes:
    g = torch.Generator().manual_seed(0)
    return bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())


def _set(tname: str, fn):
    return lambda d: edit_tensors(d, lambda t: t.__setitem__(tname, fn(t[tname])))


def _poke(value: float):
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[0, 0] = value
        return t
    return fn


BAD_CASES = {
    # name: (mutate(dir), model-config changes, load kwargs, message regex)
    "no_files": (lambda d: [p.unlink() for p in list(d.iterdir())], {}, {},
                 r"no adapter_model\.safetensors in .*found: \[\]"),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), {}, {}, r"no adapter_config\.json in"),
    "random_bytes": (lambda d: _write(d, "adapter_model.safetensors", _random_bytes(4096)), {}, {},
                     r"adapter_model\.safetensors is not a valid safetensors file"),
    "truncated": (lambda d: _write(d, "adapter_model.safetensors",
                                   (d / "adapter_model.safetensors").read_bytes()[:-7]), {}, {},
                  r"not a valid safetensors file: .*incomplete"),
    "empty_file": (lambda d: _write(d, "adapter_model.safetensors", b""), {}, {}, r"not a valid safetensors"),
    "invalid_json": (lambda d: _write(d, "adapter_config.json", b'{"r": 4,'), {}, {},
                     r"adapter_config\.json is not valid JSON"),
    "json_not_object": (lambda d: _write(d, "adapter_config.json", b"[4]"), {}, {},
                        r"must hold a JSON object, got list"),
    "peft_type": (lambda d: edit_config(d, peft_type="PREFIX_TUNING"), {}, {}, r"peft_type is 'PREFIX_TUNING'"),
    "dora": (lambda d: edit_config(d, use_dora=True), {}, {}, r"DoRA .*use_dora=True"),
    "bias": (lambda d: edit_config(d, bias="lora_only"), {}, {}, r"bias='lora_only' is not supported"),
    "modules_to_save": (lambda d: edit_config(d, modules_to_save=["lm_head"]), {}, {},
                        r"modules_to_save=\['lm_head'\]"),
    "fan_in_fan_out": (lambda d: edit_config(d, fan_in_fan_out=True), {}, {}, r"fan_in_fan_out"),
    "target_lm_head": (lambda d: edit_config(d, target_modules=["q_proj", "v_proj", "lm_head"]), {}, {},
                       r"target_modules \['lm_head'\] are not among"),
    "target_regex_embed": (lambda d: edit_config(d, target_modules=r".*(q_proj|v_proj|embed_tokens)"), {}, {},
                           r"matches \['model\.embed_tokens', 'embed_tokens'\]"),
    "target_bad_regex": (lambda d: edit_config(d, target_modules="(q_proj"), {}, {}, r"regex '\(q_proj' is invalid"),
    "embedding_tensor": (lambda d: edit_tensors(d, lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 64)})), {}, {},
        r"'base_model\.model\.model\.embed_tokens\.lora_embedding_A' is an embedding LoRA"),
    "lm_head_tensor": (lambda d: edit_tensors(d, lambda t: t.update({
        "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(64, 4)})), {}, {},
        r"targets 'lm_head', which is not one of the supported linears"),
    "dora_magnitude_tensor": (lambda d: edit_tensors(d, lambda t: t.update({
        f"{Q0}.lora_magnitude_vector": torch.ones(32)})), {}, {}, r"unexpected tensor .*lora_magnitude_vector"),
    "shape_mismatch": (lambda d: None, {"hidden_size": 64}, {},
                       r"layer 0 q_proj: lora_A \(4, 32\) / lora_B \(32, 4\) do not fit the base model, "
                       r"expected \[r, 64\]"),
    "layer_out_of_range": (lambda d: None, {"num_layers": 1}, {},
                           r"layer index 1 out of range, base model has 1 layers"),
    "rank_mismatch": (_set(f"{Q0}.lora_B.weight", lambda b: torch.zeros(32, 5)), {}, {},
                      r"q_proj: rank mismatch, lora_A \(4, 32\) has r=4 but lora_B \(32, 5\) has r=5"),
    "missing_partner": (lambda d: edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), {}, {},
                        r"layers\.0\.self_attn\.q_proj: lora_B\.weight is missing"),
    "rank_vs_config": (lambda d: edit_config(d, r=3), {}, {}, r"tensors have rank 4 but the config .* gives r=3"),
    "not_targeted": (lambda d: edit_config(d, target_modules=["q_proj"]), {}, {},
                     r"v_proj: not selected by target_modules=\('q_proj',\)"),
    "layer_not_transformed": (lambda d: edit_config(d, layers_to_transform=[0]), {}, {},
                              r"layers\.1\.self_attn\.q_proj: not selected .*layers_to_transform=\(0,\)"),
    "int_tensor": (_set(f"{Q0}.lora_A.weight", lambda a: a.to(torch.int32)), {}, {}, r"must be floating point"),
    "nan": (_set(f"{Q0}.lora_A.weight", _poke(float("nan"))), {}, {}, r"q_proj: lora_A has 1 NaN/Inf"),
    "inf": (_set(f"{Q0}.lora_B.weight", _poke(float("inf"))), {}, {}, r"q_proj: lora_B has 1 NaN/Inf"),
    "fp16_overflow": (_set(f"{Q0}.lora_A.weight", _poke(1e6)), {}, {"dtype": torch.float16},
                      r"lora_A has 1 NaN/Inf values \(after conversion to torch.float16\)"),
    "other_family": (lambda d: edit_config(d, base_model_name_or_path="mistralai/Mistral-7B-Instruct-v0.2"), {}, {},
                     r"'mistralai/Mistral-7B-Instruct-v0\.2' \(mistral\) is a different model family .*\(smollm\)"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_adapter_raises_clear_error(case, good_dir, model_config, tmp_path):
    mutate, cfg_changes, kwargs, message = BAD_CASES[case]
    d = tmp_path / "adapter"
    shutil.copytree(good_dir, d)
    mutate(d)
    config = dataclasses.replace(model_config, **cfg_changes)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(d, config, **kwargs)


def test_missing_directory(model_config, tmp_path):
    with pytest.raises(AdapterError, match=rf"adapter directory {re.escape(str(tmp_path / 'nope'))} does not exist"):
        load_peft_adapter(tmp_path / "nope", model_config)


@pytest.mark.parametrize("base", ["HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "/data/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123abcd",
                                  "my-org/finetune-v3", "/ckpt/run-17", None])
def test_base_name_compared_only_when_recognisable(base, good_dir, model_config, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(good_dir, d)
    edit_config(d, base_model_name_or_path=base)
    assert load_peft_adapter(d, model_config).base_model_name_or_path == base
    anonymous_base = dataclasses.replace(model_config, name_or_path="")
    d2 = tmp_path / "mistral"
    shutil.copytree(good_dir, d2)
    edit_config(d2, base_model_name_or_path="mistralai/Mistral-7B-v0.1")
    load_peft_adapter(d2, anonymous_base)  # served base has no recognisable name: shapes decide


class _Payload:
    """Unpickling this creates `path` (stands in for any code a pickle could run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_adapter_refused_and_never_unpickled(good_dir, model_config, tmp_path):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists(), "payload must create its marker when unpickled, else the test proves nothing"

    marker = tmp_path / "marker"
    d = tmp_path / "adapter"
    d.mkdir()
    shutil.copy(good_dir / "adapter_config.json", d)
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(AdapterError, match=r"adapter_model\.bin is a pickle file and is refused"):
        load_peft_adapter(d, model_config)
    assert not marker.exists()

    shutil.copy(good_dir / "adapter_model.safetensors", d)  # with safetensors present, .bin is ignored
    adapter = load_peft_adapter(d, model_config)
    assert isinstance(adapter, LoRAAdapter) and not marker.exists()
