"""Load a Llama-family HF directory (safetensors, single file or sharded) into `Transformer`.

This module knows dense checkpoints only. Quantized formats plug their projection modules in
at load time (gpt-fast style): `inlaid_ray.quantized_base.loading.load_base` reads a GPTQ checkpoint,
builds the model with its `GPTQLinear` factory and hands the tensors to `load_weights` here;
the `prefix.qweight/qzeros/scales/g_idx(/bias)` names map to `prefix.base.*` like dense ones.
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
_QUANT_CONFIG = "quantize_config.json"  # AutoGPTQ's file beside config.json


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


def quantization_config(model_dir: str | Path) -> dict | None:
    """The `quantization_config` of `config.json`, or `quantize_config.json` (AutoGPTQ), if any."""
    model_dir = Path(model_dir)
    if (model_dir / _QUANT_CONFIG).is_file():
        return json.loads((model_dir / _QUANT_CONFIG).read_text())
    try:
        qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None
    return qc if isinstance(qc, dict) else None


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    adapter_bank: object | None = None,
    make_linear: LinearFactory | None = None,
) -> Transformer:
    """Build the model for a dense `model_dir` on `device` in `dtype` and load its weights
    (`make_linear` swaps the projection modules, which must then accept the stored tensors)."""
    model_dir = Path(model_dir)
    if make_linear is None and quantization_config(model_dir) is not None:
        raise ModelLoadError(f"{model_dir} holds a quantized checkpoint: load it with "
                             "inlaid_ray.quantized_base.loading.load_base (the engine builders do)")
    config = ModelConfig.from_dir(model_dir)
    model = Transformer(config, dtype=dtype, device=device, make_linear=make_linear, adapter_bank=adapter_bank)
    return load_weights(model, map_hf_names(read_safetensors_dir(model_dir, device), config), model_dir)


def load_weights(model: Transformer, state: dict[str, torch.Tensor], model_dir: Path) -> Transformer:
    """Load `state` (our names) into `model`, refusing missing, unexpected or misshaped tensors."""
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
