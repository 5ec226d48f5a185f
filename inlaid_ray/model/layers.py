"""Building blocks of the Llama-family forward: RMSNorm and the pluggable projections.

Every projection is an `AdaptedLinear`: a base linear (dense here; GPTQ-packed in
`inlaid_ray.quant.gptq_linear`) plus the multi-LoRA term from the adapter bank. Neither
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


@dataclass
class LoRAContext:
    """The adapter bank and this step's token->slot mapping, passed down the forward."""

    bank: Any  # inlaid_ray.lora.bank.AdapterBank (or anything with add_delta)
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
        if lora is not None and lora.batch.num_active_slots:
            lora.bank.add_delta(y, x, self.layer_idx, self.name, lora.batch)
        return y
