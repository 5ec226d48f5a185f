"""Llama-family model configuration read from a HF `config.json` (llama, mistral, qwen2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inlaid_ray.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Projections a LoRA adapter (or a quantizer) may target, in forward order within a block.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input, fused along their outputs at load time (one GEMM each);
# the adapter bank stores their LoRA factors side by side, so one launch pair serves the group.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family model."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 has q/k/v biases
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral; served as full attention (see module doc)
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = field(default=(2,))
    name_or_path: str = ""

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one of LINEAR_MODULES."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (q_out, self.hidden_size),
            "k_proj": (kv_out, self.hidden_size),
            "v_proj": (kv_out, self.hidden_size),
            "o_proj": (self.hidden_size, q_out),
            "gate_proj": (self.intermediate_size, self.hidden_size),
            "up_proj": (self.intermediate_size, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }
        if module not in shapes:
            raise ValueError(f"unknown module {module!r}; expected one of {LINEAR_MODULES}")
        return shapes[module]

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name_or_path: str = "") -> "ModelConfig":
        """Parse a HF config dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r} in {name_or_path or 'config'}; "
                f"supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported hidden_act {act!r} (only silu / SwiGLU)")
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type") or (rope_scaling or {}).get("rope_type") or (
            rope_scaling or {}
        ).get("type")
        if rope_type in (None, "default"):
            rope_scaling = None
        else:
            rope_scaling = {**(rope_scaling or {}), **rope_params, "rope_type": rope_type}
            rope_scaling.pop("rope_theta", None)
            rope_scaling.pop("type", None)
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name_or_path=name_or_path,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `config.json` from a HF model directory."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"no config.json in {model_dir}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_hf_dict(cfg, name_or_path=str(model_dir))
