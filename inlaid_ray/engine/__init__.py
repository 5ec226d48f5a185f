"""Continuous-batching engine: paged KV blocks, scheduling, sampling, detokenization, streaming."""

from inlaid_ray.engine.async_engine import AsyncLLMEngine, EngineShutdown
from inlaid_ray.engine.block_allocator import BlockAllocator, blocks_for
from inlaid_ray.engine.detokenizer import IncrementalDetokenizer
from inlaid_ray.engine.config import EngineConfig, EngineStats
from inlaid_ray.engine.engine import LLMEngine
from inlaid_ray.engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams, TokenLogprob
from inlaid_ray.engine.sampling import sample, sampling_probs

__all__ = [
    "AsyncLLMEngine",
    "BlockAllocator",
    "EngineConfig",
    "EngineShutdown",
    "EngineStats",
    "FinishReason",
    "IncrementalDetokenizer",
    "LLMEngine",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "TokenLogprob",
    "blocks_for",
    "sample",
    "sampling_probs",
]
