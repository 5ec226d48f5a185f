"""Device dispatch for the kernels: the Triton op on CUDA tensors, the PyTorch reference
otherwise. The choice is by device only and explicit: a CUDA call never falls back to the
reference on error (a failing kernel raises), and Triton is imported only on the CUDA path so
CPU-only installs need no Triton. Extra keyword arguments are performance hints for the Triton
path (they never change the result) and are ignored by the reference.
"""

from __future__ import annotations

import torch

from inlaid_ray.kernels.compressed_lora_batch import CompressedLoRABatch
from inlaid_ray.kernels.reference import (
    compressed_lora_ref,
    gptq_matmul_ref,
    lora_shrink_expand_ref,
    lora_shrink_expand_slices_ref,
)
from inlaid_ray.model.forward_batch import LoRABatch

GPTQ_KERNEL_BITS = (2, 4, 8)  # bit widths the Triton GEMM unpacks; 3-bit codes straddle int32 words


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """`x @ W^T (+ bias)` for a GPTQ v1-packed W; see `gptq_gemm.gptq_matmul` for shapes."""
    if x.is_cuda:
        from inlaid_ray.kernels.gptq_gemm import gptq_matmul as triton_op

        return triton_op(x, qweight, qzeros, scales, g_idx, bits, bias, group_size=group_size)
    return gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, bits, bias)


def lora_shrink_expand(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    *,
    ranks: torch.Tensor | None = None,
) -> None:
    """y[t] += lora_b[s] @ (lora_a[s] @ x[t]) for tokens with slot s >= 0; y modified in place."""
    if x.is_cuda:
        from inlaid_ray.kernels.lora_sgmv import lora_shrink_expand as triton_op

        triton_op(y, x, lora_a, lora_b, batch, ranks=ranks)
    else:
        lora_shrink_expand_ref(y, x, lora_a, lora_b, batch)


def lora_shrink_expand_slices(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    slices: tuple[tuple[int, ...], torch.Tensor],
    *,
    ranks: torch.Tensor | None = None,
) -> None:
    """The LoRA terms of output-fused projections (q/k/v, gate/up) in one shrink and one expand;
    see `lora_sgmv.lora_shrink_expand_slices` for the layout."""
    if x.is_cuda:
        from inlaid_ray.kernels.lora_sgmv import lora_shrink_expand_slices as triton_op

        triton_op(y, x, lora_a, lora_b, batch, slices, ranks=ranks)
    else:
        lora_shrink_expand_slices_ref(y, x, lora_a, lora_b, batch, slices[0])


def compressed_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    batch: CompressedLoRABatch,
) -> None:
    """y[t] += U_c Sigma_c[row] V_c^T x[t] for tokens with a cluster; y modified in place."""
    if x.is_cuda:
        from inlaid_ray.kernels.compressed_lora import compressed_lora as triton_op

        triton_op(y, x, v, u, sigma, batch)
    else:
        compressed_lora_ref(y, x, v, u, sigma, batch)
