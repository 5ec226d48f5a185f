"""Assemble a ready engine from a base model directory, named PEFT adapters and compressed
cluster banks (used by the CLI, the demo, benchmarks and the Serve replica)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from inlaid_ray.engine.engine import EngineConfig, LLMEngine
from inlaid_ray.errors import AdapterError
from inlaid_ray.lora import AdapterBank, LoRAAdapter, load_peft_adapter
from inlaid_ray.lora.cluster_bank import ClusterBanks, load_cluster_banks
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.quant.loading import load_base
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


def load_compressed(
    paths: str | Path | Sequence[str | Path] | None, config: ModelConfig, dtype: torch.dtype, device: str
) -> list[ClusterBanks]:
    """Read cluster-bank directories (validated against the base's shapes) onto `device`."""
    if paths is None:
        return []
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return [load_cluster_banks(p, model_config=config, device=device, dtype=dtype) for p in paths]


def _check_unique_names(loaded: Sequence[LoRAAdapter], banks: Sequence[ClusterBanks]) -> None:
    seen: dict[str, str] = {a.name: "raw adapters" for a in loaded}
    for i, b in enumerate(banks):
        for name in b.adapters:
            if name in seen:
                raise AdapterError(f"task {name!r} is in both {seen[name]} and compressed bank {i}; names must be unique")
            seen[name] = f"compressed bank {i}"


def build_engine(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    compressed: str | Path | Sequence[str | Path] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    engine_config: EngineConfig | None = None,
    max_adapters: int | None = None,
    max_rank: int | None = None,
    max_clusters: int | None = None,
    max_cluster_rank: int | None = None,
    max_cluster_size: int | None = None,
    policy: SchedulingPolicy | None = None,
) -> LLMEngine:
    """Load the base, put the adapters into a bank sized for them, and build the engine.

    adapters: task name -> PEFT directory (served raw). compressed: cluster-bank directories
    (written by `inlaid-ray compress` / `save_cluster_banks`); each adapter they hold is a task
    of that name served compressed. Cluster capacity defaults to what is loaded plus room to
    add live: 2 more clusters, 8 more rows per cluster (set max_clusters etc. to size it).
    """
    torch_dtype = parse_dtype(dtype)
    device = device or default_device()
    config = ModelConfig.from_dir(base_dir)
    loaded = load_adapters(adapters or {}, config, torch_dtype)
    banks = load_compressed(compressed, config, torch_dtype, device)
    _check_unique_names(loaded, banks)
    clusters = [cl for b in banks for cl in b.clusters]
    needed_rank = max([a.max_rank for a in loaded], default=8)
    bank = AdapterBank(
        config,
        max_slots=max_adapters or max(8, len(loaded)),
        max_rank=max_rank or max(8, needed_rank),
        dtype=torch_dtype,
        device=device,
        max_clusters=max_clusters if max_clusters is not None else (len(clusters) + 2 if clusters else 0),
        max_cluster_rank=max_cluster_rank or max((k for cl in clusters for k in cl.ranks.values()), default=0),
        max_cluster_size=max_cluster_size or (max((len(cl.members) for cl in clusters), default=0) + 8),
    )
    for adapter in loaded:
        bank.add(adapter)
    for i, b in enumerate(banks):
        for cl in b.clusters:
            bank.add_cluster(cl, label=f"bank{i}/cluster{cl.cluster_id}")
    model = load_base(base_dir, dtype=torch_dtype, device=device, adapter_bank=bank)
    return LLMEngine(model, load_tokenizer(base_dir), engine_config or EngineConfig(), adapter_bank=bank, policy=policy)
