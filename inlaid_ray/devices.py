"""Device and dtype names as users give them ("auto", "cuda:1", "bfloat16"), resolved by one rule
for every entry point (CLI, Serve replica, offline jobs, benchmarks)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' or None -> cuda when a GPU is visible, else cpu; any other name as torch parses it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float16' -> torch.float16 (ValueError naming the allowed names otherwise)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere (CPU matmuls in half precision are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name)
