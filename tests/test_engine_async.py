"""AsyncLLMEngine: concurrent streams equal the no-cache reference, aborts (explicit, by
cancelling or by leaving the iteration) free the request's blocks without disturbing the
other streams, step errors reach the streams as exceptions, shutdown ends open streams."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from inlaid_ray.engine import AsyncLLMEngine, EngineShutdown, LLMEngine, SamplingParams
from inlaid_ray.errors import InvalidRequest, TaskNotFound
from inlaid_ray.model import load_model
from inlaid_ray.sched import FifoPolicy
from test_engine import CFG, PROMPTS, reference_greedy

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


async def _drain(agen) -> list:
    return [out async for out in agen]


async def _until(predicate, what: str) -> None:
    """Yield to the loop until `predicate()` holds (bounded by iterations, not by time)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_two_streams_abort_one_midway(model):
    async def main():
        engine = LLMEngine(model, None, CFG)
        aeng = AsyncLLMEngine(engine)

        async def consume(rid, prompt, abort_after=None):
            outs = []
            async for out in aeng.generate(prompt, PARAMS, request_id=rid):
                outs.append(out)
                if len(outs) == abort_after:
                    aeng.abort(rid)
                if out.finish_reason == "abort":
                    assert engine.get_request(rid) is None  # blocks already returned
            return outs

        keep, drop = await asyncio.gather(consume("keep", PROMPTS[2]), consume("drop", PROMPTS[0], abort_after=3))
        await aeng.shutdown()
        return engine, keep, drop

    engine, keep, drop = asyncio.run(main())
    assert _tokens(keep) == reference_greedy(model, PROMPTS[2], 12)
    assert [o.finished for o in keep] == [False] * 11 + [True] and keep[-1].finish_reason == "length"
    assert drop[-1].finish_reason == "abort" and sum(o.finished for o in drop) == 1
    dropped = _tokens(drop)
    assert 3 <= len(dropped) < 12 and dropped == reference_greedy(model, PROMPTS[0], len(dropped))
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_leaving_the_stream_aborts_the_request(model):
    async def main():
        engine = LLMEngine(model, None, CFG)
        aeng = AsyncLLMEngine(engine)
        # 1. close the iterator early (what `async with contextlib.aclosing(...)` does)
        async with contextlib.aclosing(aeng.generate(PROMPTS[0], PARAMS, request_id="closed")) as agen:
            async for _ in agen:
                break
        await _until(lambda: engine.get_request("closed") is None, "closed stream aborted")
        # 2. cancel the consuming task
        got_one = asyncio.Event()

        async def consume():
            async for _ in aeng.generate(PROMPTS[1], PARAMS, request_id="cancelled"):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: engine.get_request("cancelled") is None, "cancelled stream aborted")
        # 3. break and drop the iterator: the loop's async-generator finalizer closes it
        agen = aeng.generate(PROMPTS[3], PARAMS, request_id="dropped")
        async for _ in agen:
            break
        del agen
        await _until(lambda: engine.get_request("dropped") is None, "dropped stream aborted")
        await _until(lambda: not engine.has_unfinished(), "engine idle")
        # the engine still serves afterwards
        outs = await _drain(aeng.generate(PROMPTS[4], PARAMS))
        await aeng.shutdown()
        return engine, outs

    engine, outs = asyncio.run(main())
    assert _tokens(outs) == reference_greedy(model, PROMPTS[4], 12)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_step_error_reaches_streams_and_engine_recovers(model):
    class FailsOnce(FifoPolicy):
        def __init__(self) -> None:
            self.calls = 0

        def order(self, waiting, running, budget):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("policy exploded on call 3")
            return super().order(waiting, running, budget)

    async def main():
        engine = LLMEngine(model, None, CFG, policy=FailsOnce())
        aeng = AsyncLLMEngine(engine)
        results = await asyncio.gather(
            _drain(aeng.generate(PROMPTS[0], PARAMS)), _drain(aeng.generate(PROMPTS[1], PARAMS)),
            return_exceptions=True,
        )
        after = await _drain(aeng.generate(PROMPTS[2], PARAMS))
        await aeng.shutdown()
        return engine, results, after

    engine, results, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results), results
    assert _tokens(after) == reference_greedy(model, PROMPTS[2], 12)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_bad_input_raises_before_streaming(model):
    async def main():
        aeng = AsyncLLMEngine(LLMEngine(model, None, CFG))
        with pytest.raises(InvalidRequest, match="empty"):
            await aeng.generate([], PARAMS).__anext__()
        with pytest.raises(TaskNotFound, match="'nope'"):
            await aeng.generate([1, 2], PARAMS, task="nope").__anext__()
        with pytest.raises(InvalidRequest, match="top_p"):
            await aeng.generate([1, 2], SamplingParams(top_p=2.0)).__anext__()
        outs = await _drain(aeng.generate(PROMPTS[1], PARAMS))
        await aeng.shutdown()
        return outs

    assert _tokens(asyncio.run(main())) == reference_greedy(model, PROMPTS[1], 12)


def test_shutdown_ends_open_streams(model):
    async def main():
        engine = LLMEngine(model, None, CFG)
        aeng = AsyncLLMEngine(engine)
        agen = aeng.generate(PROMPTS[0], SamplingParams(max_tokens=60, ignore_eos=True))
        first = await agen.__anext__()
        await aeng.shutdown()
        with pytest.raises(EngineShutdown):
            async for _ in agen:
                pass
        with pytest.raises(EngineShutdown):
            await aeng.generate(PROMPTS[1], PARAMS).__anext__()
        return engine, first

    engine, first = asyncio.run(main())
    assert not first.finished and not engine.has_unfinished()
    assert engine.allocator.num_free == engine.allocator.num_blocks
