"""Building blocks of the Llama-family forward: RMSNorm and the pluggable projections.

Every projection is an `AdaptedLinear`: a base linear (dense here; GPTQ-packed in
`inlaid_ray.quantized_base.linear`) plus the multi-LoRA term from the adapter bank. Neither
knows the other's storage (docs/style.md rule 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inlaid_ray.model.forward_batch import LoRABatch


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, without dispatching a no-op conversion (each dispatch is host time per step)."""
    return t if t.dtype == dtype else t.to(dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 as HF Llama does."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = cast(x, torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * cast(x32, x.dtype)


class DenseLinear(nn.Module):
    """Plain `y = x W^T + b` with W [d_out, d_in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def empty(cls, d_out: int, d_in: int, bias: bool, dtype: torch.dtype, device: torch.device | str) -> "DenseLinear":
        """Uninitialised weights, to be filled by the loader."""
        b = torch.empty(d_out, dtype=dtype, device=device) if bias else None
        return cls(torch.empty(d_out, d_in, dtype=dtype, device=device), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def concat(cls, parts: "list[DenseLinear]") -> "DenseLinear | None":
        """One projection computing every part's outputs, stacked (None: they cannot be fused)."""
        if len({(p.in_features, p.weight.dtype, p.weight.device, p.bias is None) for p in parts}) != 1:
            return None
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return cls(torch.cat([p.weight for p in parts]), bias)


@dataclass
class LoRAContext:
    """The adapter bank and this step's token->slot mapping, passed down the forward."""

    bank: Any  # inlaid_ray.lora.bank.AdapterBank (or anything with add_delta and add_fused_delta)
    batch: LoRABatch


class AdaptedLinear(nn.Module):
    """A base projection plus `scale * B_slot(A_slot x)` per token from the adapter bank."""

    def __init__(self, base: nn.Module, layer_idx: int, name: str) -> None:
        super().__init__()
        self.base = base
        self.layer_idx = layer_idx
        self.name = name

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor, lora: LoRAContext | None = None) -> torch.Tensor:
        y = self.base(x)
        # A static batch (CUDA graphs) launches whatever the step's mix, even with no adapter token.
        if lora is not None and (lora.batch.num_active_slots or lora.batch.max_count is not None):
            lora.bank.add_delta(y, x, self.layer_idx, self.name, lora.batch)
        return y


class FusedAdaptedLinear(nn.Module):
    """Projections that read the same input (q/k/v, gate/up) as ONE base GEMM over their stacked
    weights, each part keeping its own adapters: the bank adds part p's LoRA term into its
    columns of the fused output. Built at load time by `fuse_projections`."""

    def __init__(self, base: nn.Module, layer_idx: int, parts: list[tuple[str, int]]) -> None:
        super().__init__()
        self.base = base
        self.layer_idx = layer_idx
        self.parts = parts  # (module name, out_features) in output order
        self.sizes = [n for _, n in parts]
        starts = [sum(self.sizes[:i]) for i in range(len(parts))]
        self._columns = [(name, start, start + n) for (name, n), start in zip(parts, starts)]

    def forward(self, x: torch.Tensor, lora: LoRAContext | None = None) -> tuple[torch.Tensor, ...]:
        """Every part's output, in `parts` order (views of one [T, sum of parts] tensor)."""
        y = self.base(x)
        if lora is not None and (lora.batch.num_active_slots or lora.batch.max_count is not None):
            lora.bank.add_fused_delta(y, x, self.layer_idx, self._columns, lora.batch)
        return y.split(self.sizes, dim=-1)


def fuse_linears(layer_idx: int, projections: list[AdaptedLinear]) -> FusedAdaptedLinear | None:
    """The fused form of `projections` (same input), or None when their bases cannot be stacked
    (different kinds, dtypes, or GPTQ groupings); bases offer a `concat` classmethod."""
    bases = [p.base for p in projections]
    kind = type(bases[0])
    if any(type(b) is not kind for b in bases) or not hasattr(kind, "concat"):
        return None
    fused = kind.concat(bases)
    if fused is None:
        return None
    return FusedAdaptedLinear(fused, layer_idx, [(p.name, p.out_features) for p in projections])
