"""Llama-family model: config, weights, paged-KV forward with pluggable projections."""

from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.forward_batch import ForwardBatch, LoRABatch
from inlaid_ray.model.kv_cache import PagedKVCache
from inlaid_ray.model.layers import AdaptedLinear, DenseLinear, LoRAContext
from inlaid_ray.model.loader import load_model, random_model, read_safetensors_dir
from inlaid_ray.model.runner import build_prefill_batch, prefill_logits
from inlaid_ray.model.tokenizer import encode_chat, encode_text, load_tokenizer
from inlaid_ray.model.transformer import LinearFactory, Transformer

__all__ = [
    "LINEAR_MODULES",
    "AdaptedLinear",
    "DenseLinear",
    "ForwardBatch",
    "LinearFactory",
    "LoRABatch",
    "LoRAContext",
    "ModelConfig",
    "PagedKVCache",
    "Transformer",
    "build_prefill_batch",
    "encode_chat",
    "encode_text",
    "load_model",
    "load_tokenizer",
    "prefill_logits",
    "random_model",
    "read_safetensors_dir",
]
