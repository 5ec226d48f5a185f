"""`GPTQLinear`: a GPTQ v1-packed projection, drop-in for the model's pluggable base linear
(`inlaid_ray.model.layers.DenseLinear`): `forward(x [T, d_in]) -> [T, d_out]`, `in_features`,
`out_features`. The LoRA term is added by `AdaptedLinear` around it (docs/style.md rule 11).

The matmul is chosen in one place, `select_gptq_matmul`: the fused Triton W4A16 kernel
(`kernels.ops.gptq_matmul`) for fp16/bf16 activations on CUDA at 2/4/8 bits, else the PyTorch
reference (`kernels.reference.gptq_matmul_ref`: dequantize, then an fp32 matmul). The kernel's
per-tile scale path needs the promise g_idx[i] == i // group_size; it is checked once per layer
(one device sync) on the first CUDA call and again after any load or move.

Optional dequantized-weight cache (`cache_dequantized=True`, off by default): keeps W in the
scales dtype (fp16: 4x the bytes of 4-bit codes, i.e. the memory of an unquantized model) so the
reference path does not unpack every call. It is correct because the cache remembers the exact
buffer objects and their version counters it was built from: any in-place write
(`load_state_dict`, a hot-swap copy) bumps a version, any reassignment (`.to()`, a swap of
tensors) changes identity, and either rebuilds it. Buffers that are inference tensors carry no
version counter, so for them the cache is bypassed rather than trusted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from inlaid_ray.kernels import ops
from inlaid_ray.kernels.reference import gptq_dequantize_ref, gptq_matmul_ref
from inlaid_ray.quantized_base.checkpoint import check_gptq_tensors

GPTQMatmul = Callable[..., torch.Tensor]  # (x, qweight, qzeros, scales, g_idx, bits, bias) -> y
LinearFactory = Callable[[int, str, int, int, bool], nn.Module]


_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_UNCHECKED = -2  # group-size hint not yet computed (None = g_idx is not monotone)


def select_gptq_matmul(device: torch.device, bits: int = 4, dtype: torch.dtype = torch.float16) -> GPTQMatmul:
    """The one place a GPTQ matmul implementation is chosen (same signature as `gptq_matmul_ref`).

    Explicit by device, bits and activation dtype, never a silent fallback on a failed kernel."""
    if device.type == "cuda" and bits in ops.GPTQ_KERNEL_BITS and dtype in _KERNEL_DTYPES:
        return ops.gptq_matmul
    return gptq_matmul_ref


class GPTQLinear(nn.Module):
    """y = x @ W^T (+ bias) with W stored as GPTQ v1 tensors (docs/algorithms.md section 3).

    qweight int32 [d_in*b/32, d_out]; qzeros int32 [n_groups, d_out*b/32]; scales [n_groups, d_out]
    (fp16 in checkpoints); g_idx int32 [d_in]; bias [d_out] or None. Output in x.dtype, fp32
    accumulation; equals `x @ gptq_dequantize_ref(...).T` exactly.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
        cache_dequantized: bool = False,
    ) -> None:
        super().__init__()
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
        if bias is not None:
            tensors["bias"] = bias
        self.out_features, self.in_features, _ = check_gptq_tensors("GPTQLinear", tensors, bits)
        self.bits = bits
        self.cache_dequantized = cache_dequantized
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", bias)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._group_hint: int | None = _UNCHECKED

    @classmethod
    def from_checkpoint_tensors(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor], bits: int, cache_dequantized: bool = False
    ) -> "GPTQLinear":
        """Build from flat checkpoint tensors named `{prefix}.qweight`, ... (`load_gptq_checkpoint`)."""
        prefix = prefix.rstrip(".")
        names = ("qweight", "qzeros", "scales", "g_idx", "bias")
        layer = {n: tensors[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in tensors}
        check_gptq_tensors(prefix, layer, bits)  # names the prefix in errors
        return cls(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, layer.get("bias"),
                   cache_dequantized=cache_dequantized)

    @classmethod
    def empty(
        cls,
        d_out: int,
        d_in: int,
        bias: bool,
        bits: int,
        group_size: int,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        cache_dequantized: bool = False,
    ) -> "GPTQLinear":
        """Zero-filled buffers of the right shapes, to be filled by `load_state_dict`."""
        n_groups = math.ceil(d_in / (d_in if group_size == -1 else group_size))
        g = d_in if group_size == -1 else group_size
        return cls(
            torch.zeros(d_in * bits // 32, d_out, dtype=torch.int32, device=device),
            torch.zeros(n_groups, d_out * bits // 32, dtype=torch.int32, device=device),
            torch.zeros(n_groups, d_out, dtype=scale_dtype, device=device),
            (torch.arange(d_in, device=device) // g).to(torch.int32),
            bits,
            torch.zeros(d_out, dtype=scale_dtype, device=device) if bias else None,
            cache_dequantized=cache_dequantized,
        )

    @classmethod
    def concat(cls, parts: "list[GPTQLinear]") -> "GPTQLinear | None":
        """One GPTQ projection whose outputs are every part's, stacked (the codes pack along the
        input and every d_out * bits is a multiple of 32, so packed columns concatenate);
        None when the parts differ in bits, input, grouping (g_idx), scale dtype or bias."""
        first = parts[0]
        if any(p.bits != first.bits or p.in_features != first.in_features or p.scales.dtype != first.scales.dtype
               or (p.bias is None) != (first.bias is None) or not torch.equal(p.g_idx, first.g_idx) for p in parts):
            return None
        cat = lambda name: torch.cat([getattr(p, name) for p in parts], dim=-1)  # noqa: E731
        return cls(cat("qweight"), cat("qzeros"), cat("scales"), first.g_idx.clone(), first.bits,
                   None if first.bias is None else cat("bias"), cache_dequantized=first.cache_dequantized)

    def dequantized_weight(self) -> torch.Tensor:
        """Dense W [d_out, d_in] in the scales dtype (through the cache when enabled)."""
        if not self.cache_dequantized:
            return self._dequantize()
        bufs = (self.qweight, self.qzeros, self.scales, self.g_idx)
        if any(b.is_inference() for b in bufs):
            return self._dequantize()  # no version counters: cannot prove a cache is fresh
        key = tuple((b, b._version) for b in bufs)
        if self._cache is not None and all(a is b and va == vb for (a, va), (b, vb) in zip(self._cache[0], key)):
            return self._cache[1]
        w = self._dequantize()
        self._cache = (key, w)
        return w

    def _dequantize(self) -> torch.Tensor:
        return gptq_dequantize_ref(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [T, d_in]
        if self.cache_dequantized:
            # Same arithmetic as gptq_matmul_ref (fp32 matmul of the scales-dtype W), reusing W.
            y = x2.float() @ self.dequantized_weight().float().t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        else:
            matmul = select_gptq_matmul(x.device, self.bits, x.dtype)
            if matmul is gptq_matmul_ref:
                y = matmul(x2, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias)
            else:
                y = matmul(x2, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias,
                           group_size=self._group_size_hint())
        return y.reshape(*lead, self.out_features)

    def _group_size_hint(self) -> int | None:
        if self._group_hint == _UNCHECKED:
            from inlaid_ray.kernels.gptq_gemm import monotone_group_size  # CUDA path only: imports triton

            self._group_hint = monotone_group_size(self.g_idx)
        return self._group_hint

    def _load_from_state_dict(self, *args, **kwargs):  # new g_idx: the kernel's group promise is re-checked
        self._cache, self._group_hint = None, _UNCHECKED
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):  # .to()/.cuda()/.half() replace buffers: drop the stale cache now
        self._cache, self._group_hint = None, _UNCHECKED
        return super()._apply(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, n_groups={self.scales.shape[0]}"
        )


def gptq_linear_factory(
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    cache_dequantized: bool = False,
) -> LinearFactory:
    """A `transformer.LinearFactory` (layer, name, d_out, d_in, bias) -> empty `GPTQLinear`."""
    return lambda layer, name, d_out, d_in, bias: GPTQLinear.empty(
        d_out, d_in, bias, bits, group_size, scale_dtype, device, cache_dequantized
    )
