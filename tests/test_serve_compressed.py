"""Compressed cluster banks served by Ray Serve replicas.

Fast: `ClusterResidency` over a tiny bank loads a "jd_bank" cluster as one compressed cluster
slot next to a raw cluster (the member the bank lacks loads raw), each adapter's delta equals
its source's, and evicting the cluster frees its cluster slot.
Slow: the app with `adapter_format="jd_bank"` (1 replica, real SmolLM2, real HTTP) answers
greedy chat requests of two demo tasks (one per demo cluster) with the tokens of the engine built
directly on the same compressed banks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import httpx
import pytest
import torch
from transformers import LlamaConfig

from inlaid_ray.config import Settings
from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir
from inlaid_ray.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.engine.builder import build_engine
from inlaid_ray.lora import AdapterBank, LoRAAdapter
from inlaid_ray.lora.cluster_bank import load_cluster_banks, save_cluster_banks
from inlaid_ray.compress.clustering import ClusterConfig
from inlaid_ray.compress.jd import JDConfig
from inlaid_ray.compress.adapter_set import compress_adapter_set
from inlaid_ray.lora.synthetic import random_lora_adapter
from inlaid_ray.model import ModelConfig, encode_chat, load_tokenizer
from inlaid_ray.model.config import LINEAR_MODULES
from inlaid_ray.model.loader import random_model
from inlaid_ray.registry import ClusterRecord, TaskRecord
from inlaid_ray.serve.app import AppArgs
from inlaid_ray.demo.manifest import DEMO_CLUSTERS, DEMO_MANIFEST
from inlaid_ray.serve.seed import adapter_ready, cluster_bank_dir, cluster_banks_root
from inlaid_ray.serve.replica_protocol import AdapterEntry, ClusterSpec
from inlaid_ray.serve.residency import ClusterResidency


API_KEY, ADMIN_KEY = "test-demo-key", "test-admin-key"
MAX_MODEL_LEN = 256
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


# ----------------------------------------------------------------------------- residency (fast)


def _bank_delta(bank: AdapterBank, name: str, layer: int, module: str, d_in: int) -> torch.Tensor:
    """[d_out, d_in] update the bank applies for `name` (add_delta on the identity)."""
    from inlaid_ray.model.forward_batch import LoRABatch

    x = torch.eye(d_in)
    y = torch.zeros(d_in, bank.config.module_shape(module)[0])
    batch = LoRABatch.from_token_slots(torch.full((d_in,), bank.slot_of(name)))
    bank.add_delta(y, x, layer, module, batch)
    return y.T


def test_residency_mixes_a_compressed_cluster_with_raw_adapters(tmp_path):
    config = ModelConfig.from_hf_dict(LlamaConfig(**TINY).to_dict())
    adapters = {n: random_lora_adapter(config, n, 4, ("q_proj", "v_proj"), seed, scale=0.5)
                for seed, n in enumerate(["a", "b", "c", "d"])}
    # "a", "b" compressed exactly (k = stacked rank 8); "c" joined the cluster after the bank was built.
    banks = compress_adapter_set([adapters["a"], adapters["b"]], ClusterConfig(jd=JDConfig(rank=8), num_clusters=1),
                                 progress=False).banks
    save_cluster_banks(banks, tmp_path / "bank")
    abc = [adapters[n] for n in "abc"]
    save_cluster_banks(compress_adapter_set(abc, ClusterConfig(jd=JDConfig(rank=12), num_clusters=1),
                                            progress=False).banks, tmp_path / "bank2")
    bank = AdapterBank(config, 4, 4, max_clusters=2, max_cluster_rank=12, max_cluster_size=4, kernels="reference")

    async def load_adapter(entry: AdapterEntry) -> LoRAAdapter:
        return adapters[entry.task]

    async def load_bank(uri: str):
        return load_cluster_banks(uri, model_config=config)

    jd = ClusterSpec("jd", 1, tuple(AdapterEntry(n, n) for n in "abc"), format="jd_bank", bank_uri=str(tmp_path / "bank"))
    raw = ClusterSpec("raw", 1, (AdapterEntry("d", "d"),))

    async def scenario():
        model = random_model(config, torch.float32, adapter_bank=bank)
        engine = AsyncLLMEngine(LLMEngine(model, None, EngineConfig(num_kv_blocks=8, max_model_len=64), adapter_bank=bank))
        try:
            await residency_scenario(ClusterResidency(engine, load_adapter, drain_timeout_s=0.1, load_bank=load_bank))
        finally:
            await engine.shutdown()

    async def residency_scenario(residency: ClusterResidency):
        unloaded = []
        token = await residency.load(jd, lambda cid, gen: unloaded.append(cid))
        await residency.load(raw, lambda cid, gen: None)
        assert bank.cluster_of("a")[0] == bank.cluster_of("b")[0] and bank.cluster_of("c") is None
        assert bank.cluster_of("d") is None and bank.free_slots == 2  # raw "c", "d"; "a", "b" use no raw slot
        assert residency.compressed_from("a") == jd.bank_uri and residency.compressed_from("c") == ""
        for name in "abcd":
            for layer in range(config.num_layers):
                for module in LINEAR_MODULES:
                    got = _bank_delta(bank, name, layer, module, config.module_shape(module)[1])
                    want = adapters[name].delta_weight(layer, module) if (layer, module) in adapters[name].weights \
                        else torch.zeros_like(got)
                    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=0)
        residency.evict("jd", token.generation)
        await residency.settled()
        assert sorted(bank.names) == ["d"] and len(bank.compressed.used_clusters()) == 0
        token = await residency.load(jd, lambda cid, gen: None)  # the freed cluster slot is reused
        assert bank.cluster_of("a") is not None
        # The registry moves the cluster to a bank holding "c" too: the next request reloads it whole.
        moved = dataclasses.replace(jd, version=2, bank_uri=str(tmp_path / "bank2"))
        residency.reconcile(moved)
        lease = await residency.acquire(token, moved.entry("a"))
        assert {bank.cluster_of(n)[0] for n in "abc"} == {bank.cluster_of("a")[0]} and bank.free_slots == 3
        assert len(bank.compressed.used_clusters()) == 1 and residency.compressed_from("c") == moved.bank_uri
        lease.release()

    asyncio.run(scenario())


def test_the_router_sends_a_clusters_format_and_bank_with_its_live_members():
    from inlaid_ray.serve.access import cluster_spec_for

    tasks = {n: TaskRecord(name=n, tenant="x", adapter_uri=f"/a/{n}", base_model="m", cluster="c", status=st)
             for n, st in (("t", "live"), ("u", "live"), ("r", "retired"))}

    class Records:  # the two RegistryWatcher reads cluster_spec_for makes
        def get_cluster(self, cid):
            return ClusterRecord(cluster_id="c", bank_uri="b", members=tuple(tasks), format="jd_bank")

        def get_task(self, name):
            return tasks[name]

    spec = cluster_spec_for(tasks["t"], Records())  # type: ignore[arg-type]
    assert (spec.cluster_id, spec.format, spec.bank_uri) == ("c", "jd_bank", "b")
    assert sorted(e.task for e in spec.adapters) == ["t", "u"]


# ----------------------------------------------------------------------------- app (slow)


@pytest.mark.slow
def test_app_serves_demo_clusters_compressed(smollm2_dir, tmp_path_factory):
    import ray
    from ray import serve

    from inlaid_ray.registry import connect_redis
    from inlaid_ray.serve.launcher import free_port, run_serve

    assert all(adapter_ready(demo_adapter_dir(n)) for n in DEMO_TASKS), "the demo adapters ship with the package"
    data_dir = tmp_path_factory.mktemp("registry")
    cache = tmp_path_factory.mktemp("cache")
    args = AppArgs(
        model_dir=str(smollm2_dir), data_dir=str(data_dir), seed_manifest=str(DEMO_MANIFEST), adapter_format="jd_bank",
        num_replicas=1, num_cpus_per_replica=1, torch_threads=1, dtype="float32", device="cpu",
        max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512, max_num_seqs=8, num_kv_blocks=64,
        max_clusters_per_replica=2, max_adapters_per_replica=4, predictor="task_quantile",
        namespace="t" + uuid.uuid4().hex[:8],
    )
    settings = Settings(cache_dir=cache, api_key=API_KEY, admin_key=ADMIN_KEY)
    tasks = [names[-1] for names in DEMO_CLUSTERS.values()]  # one task of each cluster
    messages = [{"role": "user", "content": "Write one short sentence about the sea."}]
    client = connect_redis(None, data_dir)
    try:
        url = run_serve(args, host="127.0.0.1", port=free_port(), blocking=False, settings=settings,
                        ray_init_kwargs=dict(num_cpus=2, include_dashboard=False))
        served = {}
        for task in tasks:
            body = dict(model=task, messages=messages, max_tokens=12, temperature=0, return_token_ids=True)
            response = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), timeout=300,
                                  headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
            assert response.status_code == 200, response.text
            served[task] = response.json()["choices"][0]["token_ids"]
        # The replica holds both clusters, every member compressed (the stats of the last request).
        replicas = httpx.get(url + "/v1/admin/replicas", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=60).json()["data"]
        members = sum(len(names) for names in DEMO_CLUSTERS.values())
        assert [(r["adapters_resident"], r["adapters_compressed"]) for r in replicas] == [(members, members)]
    finally:
        serve.shutdown()
        ray.shutdown()
        client.close()
    threads = torch.get_num_threads()
    try:
        bank_dirs = [cluster_bank_dir(cluster_banks_root(cache / "artifacts"), c) for c in DEMO_CLUSTERS]
        engine = build_engine(smollm2_dir, compressed=bank_dirs, dtype="float32", device="cpu",
                              engine_config=EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512))
        assert all(engine.adapter_bank.cluster_of(t) is not None for t in tasks)
        ids = encode_chat(load_tokenizer(smollm2_dir), messages)
        for task in tasks:
            expected = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0), [task])[0]
            assert served[task] == list(expected.token_ids), task
    finally:
        torch.set_num_threads(threads)
