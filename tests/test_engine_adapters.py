"""The engine owns its adapters: loads and evictions submitted while requests stream run in the
engine's worker thread between steps (never during a forward), in submission order; an eviction
of an adapter a request still uses is refused; stats ship with each step; shutdown fails what is
still queued. Requests streaming through all of it produce the tokens of an undisturbed run."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from inlaid_ray.engine import AsyncLLMEngine, EngineConfig, EngineShutdown, LLMEngine, SamplingParams
from inlaid_ray.engine.adapters import AdapterInUse, EvictAdapter, LoadAdapter
from inlaid_ray.errors import TaskNotFound
from inlaid_ray.lora import AdapterBank
from inlaid_ray.lora.synthetic import random_lora_adapter
from inlaid_ray.model import ModelConfig
from inlaid_ray.model.loader import random_model

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=128)
ENGINE = EngineConfig(num_kv_blocks=32, block_size=8, max_model_len=96, max_num_seqs=8)
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
PROMPT = [5, 17, 33, 2, 8, 61]


class _RecordingBank(AdapterBank):
    """A real bank that notes the thread of every write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.write_threads: list[str] = []

    def add(self, adapter):
        self.write_threads.append(threading.current_thread().name)
        return super().add(adapter)

    def remove(self, name):
        self.write_threads.append(threading.current_thread().name)
        return super().remove(name)


def _adapter(name: str, seed: int):
    return random_lora_adapter(CFG, name, 4, ("q_proj", "v_proj", "down_proj"), seed=seed, b_std=0.2)


def _engine(slots: int = 4) -> tuple[LLMEngine, _RecordingBank, list[tuple[int, int]]]:
    """Engine over a random model; the model's forward records the bank generation before and after."""
    bank = _RecordingBank(CFG, max_slots=slots, max_rank=4)
    model = random_model(CFG, torch.float32, adapter_bank=bank, seed=3)
    generations: list[tuple[int, int]] = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        before = bank.generation
        out = forward(*args, **kwargs)
        generations.append((before, bank.generation))
        return out

    model.forward = recording_forward
    return LLMEngine(model, None, ENGINE, adapter_bank=bank), bank, generations


def _undisturbed(task: str, seed: int) -> list[int]:
    engine, _, _ = _engine()
    engine.apply_adapter_command(LoadAdapter(_adapter(task, seed)))
    return list(engine.generate([PROMPT], PARAMS, [task])[0].token_ids)


def test_commands_apply_between_steps_in_the_engine_thread_and_streams_are_undisturbed():
    async def main():
        engine, bank, generations = _engine()
        aeng = AsyncLLMEngine(engine)
        assert await aeng.submit_adapter_command(LoadAdapter(_adapter("a", 1))) == 0
        assert aeng.stats().num_adapters_resident == 1

        async def churn():  # loads and evicts other adapters while "a" streams
            for i in range(6):
                await aeng.submit_adapter_command(LoadAdapter(_adapter(f"x{i}", 10 + i)))
                await asyncio.sleep(0)
                await aeng.submit_adapter_command(EvictAdapter(f"x{i}"))

        async def stream():
            return [t async for out in aeng.generate(PROMPT, PARAMS, "a") for t in out.token_ids]

        tokens, _ = await asyncio.gather(stream(), churn())
        await aeng.shutdown()
        return tokens, bank, generations

    tokens, bank, generations = asyncio.run(main())
    assert tokens == _undisturbed("a", 1)
    base_engine, _, _ = _engine()
    assert tokens != list(base_engine.generate([PROMPT], PARAMS)[0].token_ids)  # the adapter matters
    assert len(generations) >= PARAMS.max_tokens and all(before == after for before, after in generations)
    assert len(bank.write_threads) == 13 and {name.split("_")[0] for name in bank.write_threads} == {"inlaid-engine"}
    assert bank.names == ["a"]


def test_eviction_of_an_adapter_in_use_is_refused_until_its_request_ends():
    async def main():
        engine, bank, _ = _engine()
        aeng = AsyncLLMEngine(engine)
        await aeng.submit_adapter_command(LoadAdapter(_adapter("a", 1)))
        stream = aeng.generate(PROMPT, PARAMS, "a")
        tokens = list((await stream.__anext__()).token_ids)
        with pytest.raises(AdapterInUse, match="'a' is used by a request in flight"):
            await aeng.submit_adapter_command(EvictAdapter("a"))
        tokens += [t async for out in stream for t in out.token_ids]
        await aeng.submit_adapter_command(EvictAdapter("a"))
        with pytest.raises(TaskNotFound):
            await aeng.submit_adapter_command(EvictAdapter("a"))
        assert aeng.stats().num_adapters_resident == 0 and aeng.adapter_view.raw == frozenset()
        await aeng.shutdown()
        return tokens

    assert asyncio.run(main()) == _undisturbed("a", 1)


def test_commands_keep_submission_order_and_shutdown_fails_the_queue():
    async def main():
        engine, bank, _ = _engine(slots=1)
        aeng = AsyncLLMEngine(engine)
        first = aeng.submit_adapter_command(LoadAdapter(_adapter("a", 1)))
        evict = aeng.submit_adapter_command(EvictAdapter("a"))
        second = aeng.submit_adapter_command(LoadAdapter(_adapter("b", 2)))  # needs the slot "a" frees
        assert (await first, await evict, await second) == (0, None, 0)
        assert aeng.adapter_view.raw == frozenset({"b"}) and "a" not in aeng.adapter_view
        await aeng.shutdown()
        late = aeng.submit_adapter_command(LoadAdapter(_adapter("c", 3)))
        with pytest.raises(EngineShutdown):
            await late

    asyncio.run(main())


def test_stats_ship_with_each_step():
    async def main():
        engine, _, _ = _engine()
        aeng = AsyncLLMEngine(engine)
        seen = []
        async for out in aeng.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)):
            seen.append(aeng.stats())
        await aeng.shutdown()
        return seen

    seen = asyncio.run(main())
    assert [s.num_steps for s in seen] == [1, 2, 3, 4]
    assert [s.num_running for s in seen] == [1, 1, 1, 0] and seen[-1].num_finished == 1


def test_stats_name_the_adapters_of_running_and_waiting_requests():
    """What vLLM's lora_requests_info reports: tasks with requests running (or paused) and waiting."""
    engine, _, _ = _engine()
    for name, seed in (("a", 1), ("b", 2)):
        engine.apply_adapter_command(LoadAdapter(_adapter(name, seed)))
    engine.add_request(PROMPT, PARAMS, task="a")
    engine.add_request(PROMPT, PARAMS, task="b")
    engine.add_request(PROMPT, PARAMS)  # the base model: no adapter
    s = engine.stats()
    assert (s.running_adapters, s.waiting_adapters) == ((), ("a", "b"))
    engine.step()
    s = engine.stats()
    assert (s.running_adapters, s.waiting_adapters) == (("a", "b"), ())
    while engine.has_unfinished():
        engine.step()
    assert (engine.stats().running_adapters, engine.stats().waiting_adapters) == ((), ())
