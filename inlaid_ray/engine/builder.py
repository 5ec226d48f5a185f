"""Assemble a ready engine from a base model directory and named PEFT adapters (used by
the CLI, the demo, benchmarks and the Serve replica)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from inlaid_ray.engine.engine import EngineConfig, LLMEngine
from inlaid_ray.lora import AdapterBank, LoRAAdapter, load_peft_adapter
from inlaid_ray.model import ModelConfig, load_model, load_tokenizer
from inlaid_ray.sched.policy import SchedulingPolicy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float16' -> torch.float16 (ValueError naming the allowed names otherwise)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def default_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_adapters(adapters: Mapping[str, str | Path], config: ModelConfig, dtype: torch.dtype) -> list[LoRAAdapter]:
    """Read every named PEFT directory (validated against the base's shapes)."""
    return [load_peft_adapter(path, config, name=name, dtype=dtype) for name, path in adapters.items()]


def build_engine(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    engine_config: EngineConfig | None = None,
    max_adapters: int | None = None,
    max_rank: int | None = None,
    policy: SchedulingPolicy | None = None,
) -> LLMEngine:
    """Load the base, put the adapters into a bank sized for them, and build the engine."""
    torch_dtype = parse_dtype(dtype)
    device = device or default_device()
    config = ModelConfig.from_dir(base_dir)
    loaded = load_adapters(adapters or {}, config, torch_dtype)
    needed_rank = max([a.max_rank for a in loaded], default=8)
    bank = AdapterBank(
        config,
        max_slots=max_adapters or max(8, len(loaded)),
        max_rank=max_rank or max(8, needed_rank),
        dtype=torch_dtype,
        device=device,
    )
    for adapter in loaded:
        bank.add(adapter)
    model = load_model(base_dir, dtype=torch_dtype, device=device, adapter_bank=bank)
    return LLMEngine(model, load_tokenizer(base_dir), engine_config or EngineConfig(), adapter_bank=bank, policy=policy)
