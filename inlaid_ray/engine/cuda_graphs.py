"""CUDA-graph replay of fixed-shape decode steps (engine/static_decode.py), one graph per batch
bucket, with eager fallback.

A bucket's first decode step runs eagerly (it compiles the Triton kernels and makes the GPTQ
split-K tickets, which capture must not allocate); its second step captures the forward into a
graph on the bucket's persistent metadata buffers, and every later step replays it: one launch
instead of the forward's ~10 kernels per layer plus their Python. What the graph baked in at
capture is re-checked before each replay: the adapter bank's generation (a load or eviction
changes which projections launch and may move storage: every graph is dropped and recaptured).
A capture that fails leaves that bucket eager, with a warning, until the bank changes. Capture
checks only its own thread's CUDA calls ("thread_local"): the replica loads adapters and bases
on other threads.

`bench/step_trace.py` checks on CPU that the captured forward has no host sync, data-dependent
shape or step-dependent launch (tests/test_static_decode.py); graph replay equal to eager is
checked on a GPU (tests/test_static_decode.py, `gpu` marker; load_tests/gpu_pending.sh).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from inlaid_ray.model.forward_batch import ForwardBatch
from inlaid_ray.model.kv_cache import PagedKVCache

log = logging.getLogger(__name__)


class DecodeGraphs:
    """Captured decode forwards of one model, keyed by bucket (see module docstring)."""

    def __init__(self, model: Any, kv_cache: PagedKVCache, adapter_bank: Any | None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.bank = adapter_bank
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warm: set[int] = set()
        self._eager: set[int] = set()  # buckets whose capture failed
        self._generation = self._bank_generation()
        self._pool = None
        self.num_captures = self.num_replays = 0

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [bucket, vocab] of a static decode step, replayed when a graph is ready."""
        bucket = int(input_ids.shape[0])
        if self._bank_generation() != self._generation:
            self._graphs.clear()
            self._warm.clear()
            self._eager.clear()  # a failed capture is retried on the new bank layout
            self._generation = self._bank_generation()
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph[0].replay()
            self.num_replays += 1
            return graph[1]
        if bucket in self._eager or bucket not in self._warm:
            self._warm.add(bucket)
            return self.model(input_ids, batch, self.kv_cache)
        return self._capture(bucket, input_ids, batch)

    def _capture(self, bucket: int, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the replica's loader threads may allocate or copy on the GPU meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.model(input_ids, batch, self.kv_cache)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager, loudly
            log.warning("CUDA-graph capture of decode bucket %d failed (%s: %s); it stays eager",
                        bucket, type(exc).__name__, exc)
            self._eager.add(bucket)
            torch.cuda.synchronize()
            return self.model(input_ids, batch, self.kv_cache)
        self._pool = graph.pool()
        self._graphs[bucket] = (graph, out)
        self.num_captures += 1
        graph.replay()  # capture records without running: this step's logits come from a replay
        self.num_replays += 1
        return out

    def _bank_generation(self) -> int:
        return int(getattr(self.bank, "generation", 0)) if self.bank is not None else 0
