"""In-memory LoRA adapter: per-(layer, projection) factors `A [r, d_in]`, `B [d_out, r]` and the
scaling `s`, so a projection computes `y = W x + s * B (A x)` (docs/algorithms.md section 1).
Kept unfolded (as PEFT stores it) so loads round-trip exactly; the bank folds `s` into B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from inlaid_ray.errors import AdapterError
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig

ModuleKey = tuple[int, str]  # (layer index, projection name), e.g. (3, "q_proj")
Kind = Literal["full", "diag"]  # a compressed adapter's core: k x k matrix ("full") or k-vector ("diag")


@dataclass
class LoRAFactors:
    """One adapted projection: `delta_W = scale * b @ a`."""

    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoRAAdapter:
    """A LoRA adapter as per-(layer, projection) factors; `content_hash` is the sha256 of its file."""

    name: str
    base_model_name_or_path: str | None
    weights: dict[tuple[int, str], LoRAFactors]  # (layer_idx, module) -> factors
    content_hash: str = ""
    source: str = ""  # directory it was read from, "" if built in memory
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the raw adapter_config

    @property
    def modules(self) -> frozenset[str]:
        """Projection names (of LINEAR_MODULES) adapted in at least one layer."""
        return frozenset(m for _, m in self.weights)

    @property
    def layers(self) -> frozenset[int]:
        return frozenset(layer for layer, _ in self.weights)

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.weights.values()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size()
                   for f in self.weights.values())

    def folded_factors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(A, scale * B) per (layer, module) in fp32: the form compression works on."""
        return {k: (f.a.float(), f.b.float() * f.scale) for k, f in self.weights.items()}

    def delta_weight(self, layer_idx: int, module: str) -> torch.Tensor:
        """Dense `scale * B @ A` [d_out, d_in] in fp32 (for tests and small models only)."""
        f = self.weights[(layer_idx, module)]
        return f.scale * (f.b.float() @ f.a.float())


def check_adapter_fits(adapter: LoRAAdapter, model_config: ModelConfig) -> None:
    """Raise AdapterError unless every factor's layer and shape fit the base model."""
    for (layer, module), f in adapter.weights.items():
        where = f"adapter {adapter.name!r} layer {layer} {module}"
        if module not in LINEAR_MODULES:
            raise AdapterError(f"{where}: {module!r} is not one of the linears {LINEAR_MODULES}")
        if not 0 <= layer < model_config.num_layers:
            raise AdapterError(
                f"{where}: layer index {layer} out of range, base model has "
                f"{model_config.num_layers} layers"
            )
        d_out, d_in = model_config.module_shape(module)
        r = f.rank
        if tuple(f.a.shape) != (r, d_in) or tuple(f.b.shape) != (d_out, r):
            raise AdapterError(
                f"{where}: lora_A {tuple(f.a.shape)} / lora_B {tuple(f.b.shape)} do not fit the "
                f"base model, expected [r, {d_in}] / [{d_out}, r] with the same r"
            )
