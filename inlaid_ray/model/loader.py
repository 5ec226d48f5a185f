"""Load a Llama-family HF directory (safetensors, single file or sharded) into `Transformer`.

A directory holding a GPTQ v1 checkpoint (`quantize_config.json`, or `config.json` with a
`quantization_config` of `quant_method: "gptq"`) is loaded with `GPTQLinear` projections: its
`prefix.qweight/qzeros/scales/g_idx(/bias)` tensors map to `prefix.base.*`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from inlaid_ray.errors import ModelLoadError
from inlaid_ray.model.config import ModelConfig
from inlaid_ray.model.tokenizer import load_tokenizer  # noqa: F401  (re-exported)
from inlaid_ray.model.transformer import LinearFactory, Transformer

_PROJ = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.(weight|bias|qweight|qzeros|scales|g_idx)$")
_GPTQ_CONFIG = "quantize_config.json"


def read_safetensors_dir(model_dir: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise ModelLoadError(f"{model_dir} holds only pickle weights (*.bin/*.pt); convert to safetensors")
        raise ModelLoadError(f"no model.safetensors (or index) in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {f}: {exc}") from exc
    return tensors


def map_hf_names(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names -> our parameter names (projection weights live under `.base`)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        m = _PROJ.match(name)
        out[f"{m.group(1)}.base.{m.group(2)}" if m else name] = t
    if config.tie_word_embeddings:
        out.setdefault("lm_head.weight", out.get("model.embed_tokens.weight"))
    return out


def is_gptq_dir(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a GPTQ checkpoint (quantize_config.json or a gptq quantization_config)."""
    model_dir = Path(model_dir)
    if (model_dir / _GPTQ_CONFIG).is_file():
        return True
    try:
        qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method", "gptq") == "gptq" and "bits" in qc


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    adapter_bank: object | None = None,
    make_linear: LinearFactory | None = None,
    cache_dequantized: bool = False,
) -> Transformer:
    """Build the model for `model_dir` on `device` in `dtype` and load its weights.

    GPTQ directories get `GPTQLinear` projections (scales in fp32 for an fp32 model, so the
    dequantized weights are exactly the quantizer's grid values; fp16 otherwise);
    `cache_dequantized` keeps their dense weights (speed of a dense model, memory of one).
    """
    model_dir = Path(model_dir)
    if is_gptq_dir(model_dir) and make_linear is None:
        return _load_gptq_model(model_dir, dtype, device, adapter_bank, cache_dequantized)
    config = ModelConfig.from_dir(model_dir)
    model = Transformer(config, dtype=dtype, device=device, make_linear=make_linear, adapter_bank=adapter_bank)
    state = map_hf_names(read_safetensors_dir(model_dir, device), config)
    return _load_state(model, state, model_dir)


def _load_gptq_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device | str, adapter_bank: object | None, cache_dequantized: bool
) -> Transformer:
    # Imported here: inlaid_ray.quant imports inlaid_ray.model.config (no import cycle at start-up).
    from inlaid_ray.quant.gptq_format import load_gptq_checkpoint
    from inlaid_ray.quant.gptq_linear import gptq_linear_factory

    hf_config, qc, tensors = load_gptq_checkpoint(model_dir, device)  # validates every packed layer
    config = ModelConfig.from_hf_dict(hf_config, name_or_path=str(model_dir))
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    factory = gptq_linear_factory(qc.grid.bits, qc.grid.group_size, scale_dtype, device, cache_dequantized)
    model = Transformer(config, dtype=dtype, device=device, make_linear=factory, adapter_bank=adapter_bank)
    return _load_state(model, map_hf_names(tensors, config), model_dir)


def _load_state(model: Transformer, state: dict[str, torch.Tensor], model_dir: Path) -> Transformer:
    config = model.config
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{model_dir}: weights do not match a {config.model_type} model of this config; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelLoadError(f"{model_dir}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def random_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    adapter_bank: object | None = None,
    make_linear: LinearFactory | None = None,
) -> Transformer:
    """A model of `config` shape with N(0, 0.02) weights (benchmarks of 7B shapes, no checkpoint)."""
    model = Transformer(config, dtype=dtype, device=device, make_linear=make_linear, adapter_bank=adapter_bank)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()
