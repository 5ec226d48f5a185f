"""Kernels of inlaid-ray (installed as `inlaid_ray.kernels`): Triton ops with PyTorch
references of identical signature in `reference.py`; `ops` picks one by device
(`ops.gptq_matmul`, `ops.lora_shrink_expand`, `ops.compressed_lora`).

Importing this package never imports Triton; the Triton modules (`gptq_gemm`, `lora_sgmv`,
`compressed_lora`) import it and work without a GPU under TRITON_INTERPRET=1."""

from inlaid_ray.kernels import ops
from inlaid_ray.kernels.compressed_lora_batch import CompressedLoRABatch

__all__ = ["CompressedLoRABatch", "ops"]
