"""ClusterResidency on a real (tiny) AdapterBank owned by a real engine (the residency submits
adapter commands, the engine applies them between steps): clusters load their adapters, Ray-style
LRU eviction frees slots only after the last request using an adapter ends, a reload during the
drain reuses the slot, version bumps replace in place, a cluster that cannot fit fails with
NoFreeSlot, and a failed load leaves the bank as it was."""

from __future__ import annotations

import asyncio
import time
import contextlib

import pytest
import torch

from inlaid_ray.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from inlaid_ray.errors import AdapterError, NoFreeSlot
from inlaid_ray.lora import AdapterBank, LoRAAdapter, LoRAFactors
from inlaid_ray.model import ModelConfig
from inlaid_ray.model.loader import random_model
from inlaid_ray.serve.replica_protocol import AdapterEntry, ClusterSpec
from inlaid_ray.serve.residency import ClusterResidency

CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, max_position_embeddings=64)


def _adapter(entry: AdapterEntry) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(hash((entry.task, entry.version)) % 2**31)
    d_out, d_in = CFG.module_shape("q_proj")
    weights = {(layer, "q_proj"): LoRAFactors(torch.randn(2, d_in, generator=gen), torch.randn(d_out, 2, generator=gen), 1.0)
               for layer in range(CFG.num_layers)}
    return LoRAAdapter(entry.task, None, weights, content_hash=f"{entry.task}-v{entry.version}")


class _Loader:
    """Builds adapters in memory and records what was loaded; `fail` names tasks that raise."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, int]] = []
        self.fail: set[str] = set()

    async def __call__(self, entry: AdapterEntry) -> LoRAAdapter:
        await asyncio.sleep(0)
        if entry.task in self.fail:
            raise AdapterError(f"cannot read {entry.task}")
        self.loaded.append((entry.task, entry.version))
        return _adapter(entry)


def _spec(cid: str, *tasks: str, version: int = 1) -> ClusterSpec:
    return ClusterSpec(cid, 1, tuple(AdapterEntry(t, f"/x/{t}", version) for t in tasks))


@contextlib.asynccontextmanager
async def _setup(slots: int = 4):
    bank = AdapterBank(CFG, max_slots=slots, max_rank=4)
    engine = AsyncLLMEngine(LLMEngine(random_model(CFG, torch.float32, adapter_bank=bank), None,
                                      EngineConfig(num_kv_blocks=8, max_model_len=64), adapter_bank=bank))
    loader = _Loader()
    unloads: list[tuple[str, int]] = []
    try:
        yield bank, loader, ClusterResidency(engine, loader, drain_timeout_s=5.0), unloads.append
    finally:
        await engine.shutdown()


def test_load_acquire_and_deferred_eviction():
    async def main():
        async with _setup(slots=4) as (bank, loader, res, on_unload):
            token_a = await res.load(_spec("A", "t1", "t2"), on_unload)
            assert sorted(bank.names) == ["t1", "t2"] and res.resident_clusters == ["A"]
            lease = await res.acquire(token_a, AdapterEntry("t1", "/x/t1", 1))
            assert lease is not None and res.in_flight("t1") == 1
            # Ray evicts A (LRU) while t1 is running: t2 leaves now, t1 when its request ends.
            res.evict("A", token_a.generation)
            await res.settled()
            assert res.resident_clusters == [] and bank.names == ["t1"]
            assert await res.acquire(token_a, AdapterEntry("t1", "/x/t1", 1)) is None  # stale token
            lease.release()
            lease.release()  # idempotent
            await res.settled()
            assert bank.names == [] and res.in_flight("t1") == 0

    asyncio.run(main())


def test_reload_during_drain_keeps_the_slot_and_skips_the_read():
    async def main():
        async with _setup(slots=4) as (bank, loader, res, on_unload):
            token = await res.load(_spec("A", "t1"), on_unload)
            lease = await res.acquire(token, AdapterEntry("t1", "/x/t1", 1))
            slot = bank.slot_of("t1")
            res.evict("A", token.generation)
            token2 = await res.load(_spec("A", "t1"), on_unload)
            assert token2.generation != token.generation
            assert bank.slot_of("t1") == slot and loader.loaded == [("t1", 1)]
            lease.release()
            await res.settled()
            assert bank.names == ["t1"]  # owned again by the reloaded cluster
            res.evict("A", token.generation)  # a stale eviction (old token collected late) is ignored
            assert res.resident_clusters == ["A"]

    asyncio.run(main())


def test_load_waits_for_draining_adapters_then_succeeds():
    async def main():
        async with _setup(slots=2) as (bank, loader, res, on_unload):
            token_a = await res.load(_spec("A", "t1", "t2"), on_unload)
            lease = await res.acquire(token_a, AdapterEntry("t2", "/x/t2", 1))
            res.evict("A", token_a.generation)
            await res.settled()
            assert bank.names == ["t2"]  # t1 freed at once, t2 still in use
            load_b = asyncio.ensure_future(res.load(_spec("B", "t3", "t4"), on_unload))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not load_b.done() and res.loading_clusters == ["B"]
            lease.release()
            token_b = await load_b
            assert sorted(bank.names) == ["t3", "t4"] and res.resident_clusters == ["B"] and token_b.cluster_id == "B"

    asyncio.run(main())


def test_cluster_larger_than_bank_and_busy_bank_fail_with_no_free_slot():
    async def main():
        async with _setup(slots=2) as (bank, loader, res, on_unload):
            with pytest.raises(NoFreeSlot, match="needs 3 adapter slots"):
                await res.load(_spec("big", "t1", "t2", "t3"), on_unload)
            await res.load(_spec("A", "t1", "t2"), on_unload)  # resident, nothing draining
            with pytest.raises(NoFreeSlot, match="free adapter slots"):
                await res.load(_spec("B", "t3"), on_unload)
            assert sorted(bank.names) == ["t1", "t2"]

    asyncio.run(main())


def test_failed_load_leaves_bank_unchanged():
    async def main():
        async with _setup(slots=4) as (bank, loader, res, on_unload):
            await res.load(_spec("A", "t1"), on_unload)
            loader.fail.add("t3")
            with pytest.raises(AdapterError):
                await res.load(_spec("B", "t1", "t2", "t3"), on_unload)
            await res.settled()
            assert bank.names == ["t1"] and res.resident_clusters == ["A"]

    asyncio.run(main())


def test_new_member_and_new_version_load_on_acquire():
    async def main():
        async with _setup(slots=4) as (bank, loader, res, on_unload):
            token = await res.load(_spec("A", "t1"), on_unload)
            lease = await res.acquire(token, AdapterEntry("t9", "/x/t9", 1))  # joined after the load
            assert lease is not None and "t9" in bank
            slot = bank.slot_of("t1")
            lease2 = await res.acquire(token, AdapterEntry("t1", "/x/t1", 2))  # re-onboarded
            assert bank.slot_of("t1") == slot and bank.content_hash("t1") == "t1-v2"
            assert loader.loaded == [("t1", 1), ("t9", 1), ("t1", 2)]
            lease.release(), lease2.release()
            res.evict("A", token.generation)  # the late member goes with its cluster
            await res.settled()
            assert bank.names == []

    asyncio.run(main())


def test_a_cancelled_load_does_not_leak_its_slot():
    """The caller of a load goes away while the engine applies it: the landed adapter, owned by no
    cluster, is evicted, and a later cluster gets both slots."""
    async def main():
        async with _setup(slots=2) as (bank, loader, res, on_unload):
            load = asyncio.ensure_future(res.load(_spec("A", "t1"), on_unload))
            for _ in range(200):  # until its LoadAdapter is queued in the engine
                await asyncio.sleep(0)
                if load.done() or loader.loaded:
                    break
            load.cancel()
            with pytest.raises(asyncio.CancelledError):
                await load
            # The racy order (seen under CPU load): the engine's thread has put t1 into the bank,
            # but the loop has not delivered that load's future yet when B asks for capacity.
            for _ in range(2000):
                if "t1" in bank.view.raw:
                    break
                time.sleep(0.001)  # blocks the loop on purpose: no callback runs meanwhile
            await res.load(_spec("B", "t2", "t3"), on_unload)
            await res.settled()
            assert sorted(bank.names) == ["t2", "t3"]

    asyncio.run(main())


def test_an_eviction_refused_while_a_request_finishes_still_frees_the_slot_for_a_waiting_load():
    """The lease is released before the engine has applied the request's abort: the eviction is
    refused (AdapterInUse) and retried, and the load waiting for that slot waits for it instead
    of failing with NoFreeSlot."""
    from inlaid_ray.engine import SamplingParams

    async def main():
        async with _setup(slots=1) as (bank, loader, res, on_unload):
            engine = res._host
            token = await res.load(_spec("A", "t1"), on_unload)
            lease = await res.acquire(token, AdapterEntry("t1", "/x/t1", 1))
            stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True), task="t1")
            await stream.__anext__()
            res.evict("A", token.generation)
            load_b = asyncio.ensure_future(res.load(_spec("B", "t2"), on_unload))
            for _ in range(20):
                await asyncio.sleep(0)
            lease.release()  # the request's abort reaches the engine only later

            async def abort_later():
                await asyncio.sleep(0.02)
                await stream.aclose()

            await asyncio.gather(load_b, abort_later())
            await res.settled()
            assert bank.names == ["t2"]

    asyncio.run(main())
