"""Engine configuration (sizes, limits, defaults derived from the model) and its stats snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizes and limits; None fields are derived from the model at start-up."""

    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: kv_memory_fraction of free device memory
    kv_memory_fraction: float = 0.5  # of free memory (CUDA: mem_get_info, CPU: available RAM)
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prefill and decode together)
    max_model_len: int | None = None  # prompt + output; None: min(model limit, max_num_batched_tokens)
    dtype: torch.dtype | None = None  # KV cache dtype; None: the model's
    device: str | None = None  # None: the model's
    policy: str = "fifo"  # registered scheduling policy name (used when no policy object is given)
    policy_options: dict[str, Any] = field(default_factory=dict)  # fields of that policy's config
    # step-cost model JSON fitted on this device (inlaid_ray/bench/step_cost.py) for policies that
    # price steps (inlaid); None: their default, the analytic H100 / Llama-2-7B 4-bit model
    step_cost_model: str | None = None
    seed: int = 0  # seeds the generators of sampled requests that bring no seed
    kv_watermark: float = 0.01  # fraction of blocks kept free when admitting next to running requests
    # Decode-only steps through fixed-shape metadata buffers padded to batch buckets
    # (engine/static_decode.py; reserves one scratch KV block). None: on when cuda_graphs is.
    static_decode: bool | None = None
    # Replay those steps as CUDA graphs, one per bucket (engine/cuda_graphs.py; CUDA only). Both
    # are off by default until graph replay has been checked on a GPU (load_tests/gpu_pending.sh).
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2 (one prompt + one output token)")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"kv_watermark={self.kv_watermark} must be in [0, 1)")
        if self.cuda_graphs and self.static_decode is False:
            raise ValueError("cuda_graphs needs static_decode (graphs replay the fixed-shape decode steps)")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and routing."""

    num_running: int
    num_paused: int
    num_waiting: int
    num_kv_blocks: int
    num_free_blocks: int
    kv_usage: float  # fraction of KV blocks in use
    num_steps: int
    num_preemptions: int
    num_finished: int
    last_step_num_seqs: int
    last_step_num_tokens: int
    last_step_num_adapters: int  # distinct adapters (tasks) in the last step
    num_adapters_resident: int = 0  # in the adapter bank, raw and compressed
    num_adapters_compressed: int = 0
    running_adapters: tuple[str, ...] = ()  # tasks of running or paused requests (vLLM's lora_requests_info)
    waiting_adapters: tuple[str, ...] = ()  # tasks of waiting requests
