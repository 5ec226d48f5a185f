"""Paged KV cache storage: fixed-size blocks per layer. Which block belongs to which
sequence is the engine's business (its block allocator and block tables)."""

from __future__ import annotations

import torch

from inlaid_ray.model.config import ModelConfig
from inlaid_ray.model.layers import cast


class PagedKVCache:
    """Per-layer K and V pools of shape `[num_blocks, block_size, num_kv_heads, head_dim]`."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.key_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V (to size the pool from a memory budget)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values `[T, num_kv_heads, head_dim]` at flat slots `block*block_size+offset`."""
        kc, vc = self.key_caches[layer], self.value_caches[layer]
        kc.view(-1, *kc.shape[2:])[slot_mapping] = cast(k, kc.dtype)
        vc.view(-1, *vc.shape[2:])[slot_mapping] = cast(v, vc.dtype)
