"""Build a replica's engine from a `ReplicaSpec` through the one engine builder (`engine.builder`):
base model, adapter bank, `LLMEngine` and its asyncio front. No Ray here: the replica deployment calls an injectable factory with this
signature (`build_engine` by default), as Ray Serve LLM injects its engine class.

A base directory holding a GPTQ checkpoint (`quantize_config.json`, e.g. the MLGPTQ 4-bit
base) loads with `GPTQLinear` projections through `inlaid_ray.quantized_base.loading.load_base`, like a
dense one, under its one dequantized-weight cache policy. Adapters come as raw PEFT directories (`load_cluster_adapter`) or as
compressed cluster banks (`load_bank`, `ClusterSpec.format == "jd_bank"`); the bank reserves
`compressed_cluster_slots` cluster slots for the latter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid_ray.devices import resolve_device, resolve_dtype
from inlaid_ray.engine import AsyncLLMEngine, EngineConfig
from inlaid_ray.engine.builder import BankCapacity, engine_on_base, make_bank
from inlaid_ray.errors import AdapterError
from inlaid_ray.lora import AdapterBank, LoRAAdapter, load_peft_adapter
from inlaid_ray.lora.cluster_bank import ClusterBanks, load_cluster_banks
from inlaid_ray.model import ModelConfig
from inlaid_ray.serve.replica_protocol import AdapterEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to build its engine (derived from AppArgs by `serve.app.app_specs`)."""

    model_dir: str
    artifact_dir: str  # root of relative adapter URIs
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    torch_threads: int = 1  # intra-op threads of the replica process (CPU serving)
    max_adapters_per_replica: int = 16  # adapter bank slots
    max_lora_rank: int = 16
    max_clusters_per_replica: int = 2  # Ray multiplex LRU bound
    compressed_cluster_slots: int = 0  # compressed cluster slots of the bank (0: "jd_bank" clusters load raw)
    max_cluster_rank: int = 16  # largest shared rank of a compressed cluster
    max_cluster_size: int = 8  # most members of a compressed cluster
    drain_timeout_s: float = 120.0  # how long a cluster load waits for evicted adapters to drain
    gptq_cache_dequantized: bool | None = None  # GPTQ base: None = only where no fused kernel serves it
    engine: EngineConfig = EngineConfig()  # its `policy` names the scheduling policy


@dataclass
class EngineBundle:
    """What a factory returns: the streaming engine, its bank (None = base only) and model config."""

    engine: AsyncLLMEngine
    bank: AdapterBank | None
    model_config: ModelConfig


def resolve_adapter_path(uri: str, artifact_dir: str | Path) -> Path:
    """Local directory of an adapter URI: absolute path, file:// URI, or relative to `artifact_dir`."""
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        if scheme != "file":
            raise AdapterError(f"adapter URI {uri!r}: scheme {scheme!r} is not supported (use a path or file://)")
        uri = rest
    path = Path(uri)
    return path if path.is_absolute() else Path(artifact_dir) / path


def load_cluster_adapter(
    entry: AdapterEntry, model_config: ModelConfig, dtype: torch.dtype, device: torch.device, artifact_dir: str | Path
) -> LoRAAdapter:
    """Read one member of a cluster (raw PEFT) and check it is the version the registry names."""
    adapter = load_peft_adapter(resolve_adapter_path(entry.uri, artifact_dir), model_config, name=entry.task,
                                dtype=dtype, device=device)
    if entry.sha256 and adapter.content_hash != entry.sha256:
        raise AdapterError(
            f"adapter of task {entry.task!r} at {entry.uri!r} has sha256 {adapter.content_hash[:12]}..., "
            f"the registry expects {entry.sha256[:12]}... (version {entry.version})"
        )
    return adapter


def load_bank(uri: str, model_config: ModelConfig, dtype: torch.dtype, device: torch.device,
              artifact_dir: str | Path) -> ClusterBanks:
    """Read a compressed cluster bank (checksums verified, shapes checked against the base)."""
    return load_cluster_banks(resolve_adapter_path(uri, artifact_dir), model_config=model_config, device=device,
                              dtype=dtype)


def build_engine(spec: ReplicaSpec) -> EngineBundle:
    """Default engine factory: the one engine builder (`engine.builder`) with the spec's bank size."""
    torch.set_num_threads(max(1, spec.torch_threads))
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model_config = ModelConfig.from_dir(spec.model_dir)
    capacity = BankCapacity(max_adapters=spec.max_adapters_per_replica, max_rank=spec.max_lora_rank,
                            max_clusters=spec.compressed_cluster_slots, max_cluster_rank=spec.max_cluster_rank,
                            max_cluster_size=spec.max_cluster_size)
    bank = make_bank(model_config, dtype, device, capacity)
    engine = engine_on_base(spec.model_dir, bank, spec.engine, dtype=dtype, device=device,
                            gptq_cache_dequantized=spec.gptq_cache_dequantized)
    if engine.structured_output is not None:
        engine.structured_output.prepare()  # here, not on the event loop of the first JSON request
    log.info("engine ready: %s on %s (%s), %d KV blocks, max_model_len %d",
             spec.model_dir, device, dtype, engine.allocator.num_blocks, engine.max_model_len)
    return EngineBundle(AsyncLLMEngine(engine), bank, model_config)
