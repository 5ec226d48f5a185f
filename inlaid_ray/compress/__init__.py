"""Offline joint compression of LoRA adapters (Compress then Serve): joint diagonalisation per
cluster (`jd`, `jd_factors`), clustering (`clustering`), a whole adapter set into cluster banks
(`adapter_set`) and the `inlaid-ray compress` command (`cli`). Serving reads the cluster banks
these write through `inlaid_ray.lora.cluster_bank`."""

from inlaid_ray.compress.adapter_set import CompressedSet, compress_adapter_set

__all__ = ["CompressedSet", "compress_adapter_set"]
