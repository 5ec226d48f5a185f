"""Rotary position embeddings (HF "rotate_half" layout) with default, linear and llama3 scaling."""

from __future__ import annotations

import math

import torch

from inlaid_ray.errors import ModelLoadError
from inlaid_ray.model.config import ModelConfig
from inlaid_ray.model.layers import cast


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[head_dim/2]` (fp32), after the configured scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type")
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    raise ModelLoadError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class StepRotary:
    """cos/sin of one step's positions, computed once and applied in every layer."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin  # [T, 1, D] fp32

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q/k of shape `[T, heads, head_dim]`."""
        return _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)


class RotaryEmbedding(torch.nn.Module):
    """Rotary tables: `for_positions(positions)` once per forward, shared by every layer."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)

    def for_positions(self, positions: torch.Tensor) -> StepRotary:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return StepRotary(emb.cos()[:, None, :], emb.sin()[:, None, :])  # [T, 1, D]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = cast(x, torch.float32)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return cast(x32 * cos + rotated * sin, x.dtype)
