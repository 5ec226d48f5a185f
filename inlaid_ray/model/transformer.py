"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain PyTorch, gpt-fast style,
over a paged KV cache. Module names mirror HF checkpoints (`model.layers.N.self_attn.q_proj`)
so weights, GPTQ checkpoints and PEFT adapters map by name; each projection's weights live
in its `.base` linear, which is pluggable (dense, GPTQ-packed, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inlaid_ray.model.attention import (
    AttentionPlan,
    paged_attention,
    select_decode_attention,
    select_prefill_attention,
)
from inlaid_ray.model.config import FUSED_PROJECTIONS, ModelConfig
from inlaid_ray.model.forward_batch import ForwardBatch
from inlaid_ray.model.kv_cache import PagedKVCache
from inlaid_ray.model.layers import AdaptedLinear, DenseLinear, FusedAdaptedLinear, LoRAContext, RMSNorm, fuse_linears
from inlaid_ray.model.rope import RotaryEmbedding, StepRotary

# (layer_idx, module name, d_out, d_in, has_bias) -> base linear module
LinearFactory = Callable[[int, str, int, int, bool], nn.Module]


def dense_linear_factory(dtype: torch.dtype, device: torch.device | str) -> LinearFactory:
    """Factory of uninitialised dense projections (the loader fills them)."""
    return lambda layer, name, d_out, d_in, bias: DenseLinear.empty(d_out, d_in, bias, dtype, device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            d_out, d_in = config.module_shape(name)
            bias = config.attention_bias and name != "o_proj"
            setattr(self, name, AdaptedLinear(make_linear(layer_idx, name, d_out, d_in, bias), layer_idx, name))
        self.qkv_proj: FusedAdaptedLinear | None = None  # set by `fuse_projections` (then q/k/v are gone)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
        rotary: StepRotary,
        lora: LoRAContext | None,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x, lora)
        else:
            q, k, v = self.q_proj(x, lora), self.k_proj(x, lora), self.v_proj(x, lora)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k)
        out = paged_attention(q, k, v, kv_cache, self.layer_idx, batch, plan)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim), lora)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            d_out, d_in = config.module_shape(name)
            setattr(self, name, AdaptedLinear(make_linear(layer_idx, name, d_out, d_in, config.mlp_bias), layer_idx, name))
        self.gate_up_proj: FusedAdaptedLinear | None = None  # set by `fuse_projections`

    def forward(self, x: torch.Tensor, lora: LoRAContext | None) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x, lora)
        else:
            gate, up = self.gate_proj(x, lora), self.up_proj(x, lora)
        return self.down_proj(F.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory, dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer_idx, make_linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, layer_idx, make_linear)

    def forward(self, x, batch, kv_cache, rotary, lora, plan) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, kv_cache, rotary, lora, plan)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, make_linear: LinearFactory, dtype, device) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, make_linear, dtype, device) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


class Transformer(nn.Module):
    """Llama-family causal LM; `forward` runs one engine step over a flattened batch."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        make_linear: LinearFactory | None = None,
        adapter_bank: object | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, make_linear or dense_linear_factory(dtype, device), dtype, device)
        self.lm_head = DenseLinear.empty(config.vocab_size, config.hidden_size, False, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config, device)
        self.adapter_bank = adapter_bank  # anything with add_delta(y, x, layer, module, lora_batch)
        self.decode_attention = select_decode_attention(device)  # None: the padded reference path
        self.prefill_attention = select_prefill_attention(device)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """input_ids [T] -> fp32 logits [S, vocab] at `batch.logits_indices` (or [T, vocab])."""
        lora = None
        if batch.lora is not None and (batch.lora.num_active_slots or batch.lora.max_count is not None):
            if self.adapter_bank is None:
                raise ValueError("batch uses adapter slots but the model has no adapter bank")
            lora = LoRAContext(self.adapter_bank, batch.lora)
        plan = AttentionPlan.build(batch, self.config.sliding_window, self.decode_attention, self.prefill_attention)
        rotary = self.rotary.for_positions(batch.positions)
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        for layer in self.model.layers:
            x = layer(x, batch, kv_cache, rotary, lora, plan)
        if not all_logits:
            x = x[batch.logits_indices]  # [S, hidden]: only last tokens need logits
        return self.lm_head(self.model.norm(x)).float()


def fuse_projections(model: Transformer) -> int:
    """Load-time fusion (gpt-fast style): q/k/v and gate/up of every layer become one GEMM each
    where their bases can be stacked (dense; GPTQ with one grouping); each part keeps its own
    adapters. Call after the weights are loaded; calibration and checkpoint code keep the
    per-module layout. Returns the number of fused groups."""
    fused = 0
    for block in model.model.layers:
        qkv, gate_up = FUSED_PROJECTIONS
        for owner, names, attr in ((block.self_attn, qkv, "qkv_proj"), (block.mlp, gate_up, "gate_up_proj")):
            if getattr(owner, attr) is not None:
                continue
            group = fuse_linears(getattr(owner, names[0]).layer_idx, [getattr(owner, n) for n in names])
            if group is None:
                continue
            setattr(owner, attr, group)
            for n in names:
                delattr(owner, n)
            fused += 1
    return fused
