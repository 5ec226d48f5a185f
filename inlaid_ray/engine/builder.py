"""The one engine builder: base model directory (dense or GPTQ) + named PEFT adapters + compressed
cluster banks -> a ready `LLMEngine`, for every entry point (CLI `generate`, evaluation, the
Serve replica via `serve/engine_builder.py`, benchmarks). Device and dtype names resolve by
`inlaid_ray.devices`; the GPTQ dequantized-weight cache follows `quantized_base.loading`'s one policy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid_ray.devices import resolve_device, resolve_dtype
from inlaid_ray.engine.engine import EngineConfig, LLMEngine
from inlaid_ray.errors import AdapterError
from inlaid_ray.lora import AdapterBank, LoRAAdapter, load_peft_adapter
from inlaid_ray.lora.cluster_bank import ClusterBanks, load_cluster_banks
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.model.transformer import fuse_projections
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.sched.policy import SchedulingPolicy


@dataclass(frozen=True)
class BankCapacity:
    """Adapter bank size; None fields fit what is loaded at start-up plus room to add live."""

    max_adapters: int | None = None  # raw slots (default: max(8, adapters loaded))
    max_rank: int | None = None  # default: max(8, largest adapter rank)
    max_clusters: int | None = None  # compressed cluster slots (default: banks' clusters + 2, or 0 without banks)
    max_cluster_rank: int | None = None  # default: largest loaded cluster rank
    max_cluster_size: int | None = None  # default: largest loaded cluster + 8


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


def make_bank(config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: BankCapacity,
              loaded: Sequence[LoRAAdapter] = (), banks: Sequence[ClusterBanks] = ()) -> AdapterBank:
    """A bank sized by `capacity` holding `loaded` (raw) and every cluster of `banks` (compressed)."""
    _check_unique_names(loaded, banks)
    clusters = [cl for b in banks for cl in b.clusters]
    needed_rank = max([a.max_rank for a in loaded], default=8)
    c = capacity
    bank = AdapterBank(
        config,
        max_slots=c.max_adapters or max(8, len(loaded)),
        max_rank=c.max_rank or max(8, needed_rank),
        dtype=dtype,
        device=device,
        max_clusters=c.max_clusters if c.max_clusters is not None else (len(clusters) + 2 if clusters else 0),
        max_cluster_rank=c.max_cluster_rank or max((k for cl in clusters for k in cl.ranks.values()), default=0),
        max_cluster_size=c.max_cluster_size or (max((len(cl.members) for cl in clusters), default=0) + 8),
    )
    for adapter in loaded:
        bank.add(adapter)
    for i, b in enumerate(banks):
        for cl in b.clusters:
            bank.add_cluster(cl, label=f"bank{i}/cluster{cl.cluster_id}")
    return bank


def engine_on_base(base_dir: str | Path, bank: AdapterBank | None, engine_config: EngineConfig, *,
                   dtype: torch.dtype, device: torch.device, gptq_cache_dequantized: bool | None = None,
                   policy: SchedulingPolicy | None = None) -> LLMEngine:
    """An engine on the base at `base_dir` (dense or GPTQ) serving the adapters of `bank`."""
    model = load_base(base_dir, dtype, device, bank, gptq_cache_dequantized)
    fuse_projections(model)  # q/k/v and gate/up as one GEMM each
    return LLMEngine(model, load_tokenizer(base_dir), engine_config, adapter_bank=bank, policy=policy)


def build_engine(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    compressed: str | Path | Sequence[str | Path] | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
    engine_config: EngineConfig | None = None,
    capacity: BankCapacity = BankCapacity(),
    gptq_cache_dequantized: bool | None = None,
    policy: SchedulingPolicy | None = None,
) -> LLMEngine:
    """Load the base, put the adapters into a bank sized by `capacity`, and build the engine.

    adapters: task name -> PEFT directory (served raw). compressed: cluster-bank directories
    (written by `inlaid-ray compress` / `save_cluster_banks`); each adapter they hold is a task
    of that name served compressed. dtype/device: names as `inlaid_ray.devices` resolves them
    ("auto": bfloat16 on CUDA, float32 on CPU). gptq_cache_dequantized: None = `quantized_base.loading`'s policy.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = ModelConfig.from_dir(base_dir)
    loaded = load_adapters(adapters or {}, config, torch_dtype)
    banks = load_compressed(compressed, config, torch_dtype, str(torch_device))
    bank = make_bank(config, torch_dtype, torch_device, capacity, loaded, banks)
    return engine_on_base(base_dir, bank, engine_config or EngineConfig(), dtype=torch_dtype, device=torch_device,
                          gptq_cache_dequantized=gptq_cache_dequantized, policy=policy)
