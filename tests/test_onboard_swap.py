"""Replica hot-swap of the base between engine steps (serve/residency.py `BaseResidency` with the
replica's `engine_for_base`), on two tiny random Llamas of the same shape and one shared adapter
bank: a request in flight when the new base arrives finishes on the weights it started with, new
requests run on the new base, the old engine shuts down once drained, a rolled-back version swaps
back at once, and a base that cannot load changes nothing. References: each base's own engine
run directly (greedy, so tokens identify the weights that produced them)."""

from __future__ import annotations

import asyncio

import pytest

from inlaid_ray.engine import EngineConfig, SamplingParams
from inlaid_ray.lora import AdapterBank
from inlaid_ray.model import ModelConfig
from inlaid_ray.serve.engine_builder import ReplicaSpec
from inlaid_ray.serve.replica import engine_for_base
from inlaid_ray.serve.base_residency import BaseRef, BaseResidency
from test_mlgptq_setup import write_tiny_base

PROMPT = [1, 5, 7, 9, 11, 13]
LONG = SamplingParams(max_tokens=48, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, ignore_eos=True)
POLL = 2000  # bounded polls for background work; never a timing assertion


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    return write_tiny_base(root / "a", seed=0), write_tiny_base(root / "b", seed=1)


def _spec(model_dir) -> ReplicaSpec:
    return ReplicaSpec(model_dir=str(model_dir), artifact_dir="/nonexistent", dtype="float32", device="cpu",
                       engine=EngineConfig(block_size=16, num_kv_blocks=32, max_model_len=128,
                                           max_num_batched_tokens=256, max_num_seqs=8))


def _reference(model_dir, params: SamplingParams) -> list[int]:
    cfg = ModelConfig.from_dir(model_dir)
    engine = engine_for_base(str(model_dir), _spec(model_dir), AdapterBank(cfg, 2, 4), cfg).engine
    return list(engine.generate([PROMPT], params)[0].token_ids)


async def _collect(stream) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


async def _until(predicate) -> None:
    for _ in range(POLL):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("background swap did not happen")


def test_swap_keeps_requests_on_their_base_and_drains_the_old_engine(bases):
    a, b = bases
    ref_a_long, ref_b_short, ref_a_short = _reference(a, LONG), _reference(b, SHORT), _reference(a, SHORT)
    assert ref_a_long[: len(ref_b_short)] != ref_b_short  # the two bases really differ

    async def main():
        cfg = ModelConfig.from_dir(a)
        bank = AdapterBank(cfg, 2, 4)  # one bank shared by both engines, as in a replica
        spec = _spec(a)
        loads: list[str] = []

        async def load(ref: BaseRef):
            loads.append(ref.uri)
            return await asyncio.to_thread(engine_for_base, ref.uri, spec, bank, cfg)

        res = BaseResidency(engine_for_base(str(a), spec, bank, cfg), str(a), load)
        old = res.acquire()
        stream = old.engine.generate(PROMPT, LONG)
        first = await stream.__anext__()  # the long request is running on base a
        with bank.lock:  # hold every engine step: the long request cannot finish during the swap
            res.want(BaseRef(1, str(b)))
            await _until(lambda: res.current.uri == str(b))
            assert res.current.version == 1 and res.draining == [old] and old.engine.engine.has_unfinished()
            res.want(BaseRef(1, str(b)))  # the same version again: nothing to do
        new = res.acquire()
        assert new is res.current and new is not old
        short_b = await _collect(new.engine.generate(PROMPT, SHORT))
        res.release(new)
        long_a = list(first.token_ids) + await _collect(stream)
        res.release(old)
        await _until(lambda: not old.engine.is_running and res.draining == [])
        assert long_a == ref_a_long and short_b == ref_b_short and loads == [str(b)]

        # Roll back to a while a request is still draining on b: swap back without loading anything.
        held = res.acquire()
        stream_b = held.engine.generate(PROMPT, LONG)
        await stream_b.__anext__()
        res.want(BaseRef(2, str(b)))  # same directory, newer number: adopted, nothing loaded
        assert res.current is held and held.version == 2
        res.want(BaseRef(3, str(a)))
        await _until(lambda: res.current.uri == str(a))
        assert loads == [str(b), str(a)]
        back = res.acquire()
        assert await _collect(back.engine.generate(PROMPT, SHORT)) == ref_a_short
        res.release(back)
        assert await _collect(stream_b) and held in res.draining
        res.release(held)
        await _until(lambda: res.draining == [])

        # A base that cannot be loaded: logged, the replica keeps serving on what it has.
        res.want(BaseRef(4, str(a.parent / "missing")))
        await _until(lambda: res.loading is None)
        assert res.current.uri == str(a) and res.draining == []
        again = res.acquire()
        assert await _collect(again.engine.generate(PROMPT, SHORT)) == ref_a_short
        res.release(again)
        await res.current.engine.shutdown()

    asyncio.run(main())


def test_a_base_of_another_shape_is_refused(bases, tmp_path):
    a, _ = bases
    other = write_tiny_base(tmp_path / "wide", seed=2, hidden_size=96, intermediate_size=128)
    cfg = ModelConfig.from_dir(a)
    with pytest.raises(ValueError, match="hidden_size"):
        engine_for_base(str(other), _spec(a), AdapterBank(cfg, 2, 4), cfg)


def test_a_restarted_replica_serves_only_the_named_base(bases):
    """A replica starts on the model directory of its spec, a base the registry does not name
    (after a restart: the unquantized base). The first request waits for the named base and is
    served by it; later version changes load in the background while the named base serves."""
    a, b = bases
    ref_b = _reference(b, SHORT)

    async def main():
        cfg = ModelConfig.from_dir(a)
        bank = AdapterBank(cfg, 2, 4)
        spec = _spec(a)
        gate = asyncio.Event()

        async def load(ref: BaseRef):
            await gate.wait()  # the load takes as long as the test says
            return await asyncio.to_thread(engine_for_base, ref.uri, spec, bank, cfg)

        res = BaseResidency(engine_for_base(str(a), spec, bank, cfg), str(a), load)
        first = asyncio.create_task(res.settle(BaseRef(1, str(b)), timeout_s=600))
        await asyncio.sleep(0.05)
        assert not first.done() and res.current.uri == str(a)  # waiting, not served on the unnamed base
        gate.set()
        await first
        slot = res.acquire()
        assert slot.uri == str(b) and slot.version == 1
        assert await _collect(slot.engine.generate(PROMPT, SHORT)) == ref_b
        res.release(slot)
        gate.clear()
        await res.settle(BaseRef(2, str(a)), timeout_s=600)  # a named base serves while the next loads
        assert res.current.uri == str(b) and res.loading == BaseRef(2, str(a))
        gate.set()
        await _until(lambda: res.current.uri == str(a))
        await _until(lambda: res.draining == [])
        await res.current.engine.shutdown()

    asyncio.run(main())
