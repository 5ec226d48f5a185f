"""Compressed adapters served by the adapter bank and the engine (Compress then Serve): a batch
mixing raw, compressed (full and diagonal cores) and base-only tokens gets exactly each token's
own delta; clusters and projected adapters are added and removed live; bad clusters are refused
with errors naming the problem; and on the real SmolLM2 the engine with a compressed adapter
equals the dense model with the reconstructed delta merged into its weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from inlaid_ray.engine import EngineConfig, SamplingParams
from inlaid_ray.engine.builder import build_engine
from inlaid_ray.errors import AdapterError, NoFreeSlot, TaskNotFound
from inlaid_ray.lora import AdapterBank, LoRAAdapter, load_peft_adapter
from inlaid_ray.lora.cluster_bank import ClusterBank, save_cluster_banks
from inlaid_ray.compress.clustering import ClusterConfig
from inlaid_ray.compress.jd import JDConfig, project_onto_basis
from inlaid_ray.compress.adapter_set import compress_adapter_set
from inlaid_ray.lora.synthetic import random_lora_adapter
from inlaid_ray.model import load_model, prefill_logits
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.forward_batch import LoRABatch


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TOL = 1e-5  # fp32 bank, relative to the largest expected value (as tests/test_adapter_bank.py)


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_hf_dict(LlamaConfig(**TINY).to_dict())


def random_cluster(config: ModelConfig, cid: int, members: list[str], k: int, modules, kind: str, seed: int) -> ClusterBank:
    """Orthonormal bases and random cores: the serving path does not care how they were fitted."""
    gen = torch.Generator().manual_seed(seed)
    U, V, S, E = {}, {}, {}, {}
    for layer in range(config.num_layers):
        for module in modules:
            d_out, d_in = config.module_shape(module)
            key = (layer, module)
            U[key] = torch.linalg.qr(torch.randn(d_out, k, generator=gen))[0]
            V[key] = torch.linalg.qr(torch.randn(d_in, k, generator=gen))[0]
            S[key] = torch.randn(*((len(members), k, k) if kind == "full" else (len(members), k)), generator=gen)
            E[key] = torch.zeros(len(members))
    return ClusterBank(cid, members, U, V, S, E)


def dense_delta(source, name: str, key) -> torch.Tensor | None:
    """Expected [d_out, d_in] update of `name` at key from a raw adapter or a ClusterBank."""
    if isinstance(source, LoRAAdapter):
        return source.delta_weight(*key) if key in source.weights else None
    if key not in source.U:
        return None
    return source.delta(key, source.members.index(name))


def check_bank(bank: AdapterBank, config: ModelConfig, sources: dict[str, object], token_names: list[str | None],
               seed: int = 0) -> None:
    """add_delta over every projection equals the per-token dense reference."""
    slots = torch.tensor([bank.slot_of(n) if n else -1 for n in token_names])
    batch = LoRABatch.from_token_slots(slots)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(config.num_layers):
        for module in LINEAR_MODULES:
            d_out, d_in = config.module_shape(module)
            x = torch.randn(len(token_names), d_in, generator=gen)
            y0 = torch.randn(len(token_names), d_out, generator=gen)
            y = y0.clone()
            bank.add_delta(y, x, layer, module, batch)
            expected = y0.clone()
            for t, name in enumerate(token_names):
                delta = dense_delta(sources[name], name, (layer, module)) if name else None
                if delta is not None:
                    expected[t] += delta @ x[t]
            tol = TOL * float((expected - y0).abs().max().clamp(min=1.0))
            torch.testing.assert_close(y, expected, rtol=0, atol=tol, msg=f"layer {layer} {module}")


@pytest.fixture(scope="module")
def parts(config):
    raw = {"raw_qo": random_lora_adapter(config, "raw_qo", 2, ("q_proj", "o_proj"), 1, scale=0.5),
           "raw_all": random_lora_adapter(config, "raw_all", 4, LINEAR_MODULES, 2, scale=0.5)}
    full = random_cluster(config, 0, ["f0", "f1", "f2"], 4, ("q_proj", "v_proj", "down_proj"), "full", 3)
    diag = random_cluster(config, 1, ["d0", "d1"], 3, LINEAR_MODULES, "diag", 4)
    return raw, full, diag


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=pytest.mark.slow)])  # interpreted: slow tier
def test_mixed_raw_full_diag_and_base_tokens_get_their_own_delta(kernels, config, parts):
    """"triton" runs the CUDA launchers (interpreted on CPU): same slot layout, same result."""
    raw, full, diag = parts
    bank = AdapterBank(config, max_slots=3, max_rank=4, max_clusters=2, max_cluster_rank=4,
                       max_cluster_size=4, kernels=kernels)
    bank.add(raw["raw_qo"])
    bank.add_cluster(diag)  # the store starts diagonal ...
    sources = {"raw_qo": raw["raw_qo"], "d0": diag, "d1": diag}
    check_bank(bank, config, sources, ["d1", None, "raw_qo", "d0", "d1", "raw_qo"])
    bank.add(raw["raw_all"])
    bank.add_cluster(full)  # ... and switches to full cores when a full cluster arrives
    sources |= {"raw_all": raw["raw_all"], "f0": full, "f1": full, "f2": full}
    assert bank.compressed.kind == "full" and len(bank) == 7
    assert all(bank.slot_of(n) >= bank.max_slots for n in ("d0", "d1", "f0", "f1", "f2"))
    check_bank(bank, config, sources, ["f2", "raw_all", None, "d0", "f0", "f0", "raw_qo", "d1", "f1", None, "raw_all"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_bank_uses_the_kernels_and_matches_the_cpu_bank(dtype, config, parts):
    raw, full, diag = parts
    banks = [AdapterBank(config, max_slots=2, max_rank=4, dtype=dt, device=dev, max_clusters=2,
                         max_cluster_rank=4, max_cluster_size=3) for dt, dev in ((torch.float32, "cpu"), (dtype, "cuda"))]
    for bank in banks:
        bank.add(raw["raw_all"])
        bank.add_cluster(diag)
        bank.add_cluster(full)
    names = ["f2", "raw_all", None, "d0", "f0", "f0", "d1", None, "raw_all"]
    slots = torch.tensor([banks[0].slot_of(n) if n else -1 for n in names])
    gen = torch.Generator().manual_seed(3)
    for layer in range(config.num_layers):
        for module in LINEAR_MODULES:
            d_out, d_in = config.module_shape(module)
            x = torch.randn(len(names), d_in, generator=gen).to(dtype)
            y_cpu = torch.zeros(len(names), d_out)
            banks[0].add_delta(y_cpu, x.float(), layer, module, LoRABatch.from_token_slots(slots))
            y_gpu = torch.zeros(len(names), d_out, dtype=dtype, device="cuda")
            banks[1].add_delta(y_gpu, x.cuda(), layer, module, LoRABatch.from_token_slots(slots.cuda()))
            tol = 2e-2 * float(y_cpu.abs().max().clamp(min=1e-6))
            torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, rtol=0, atol=tol, msg=f"layer {layer} {module}")


def test_raw_only_and_compressed_only_batches(config, parts):
    raw, full, diag = parts
    bank = AdapterBank(config, max_slots=2, max_rank=4, max_clusters=2, max_cluster_rank=4, max_cluster_size=3)
    bank.add(raw["raw_all"])
    bank.add_cluster(full)
    sources = {"raw_all": raw["raw_all"], "f0": full, "f1": full, "f2": full}
    check_bank(bank, config, sources, ["raw_all", None, "raw_all"])
    check_bank(bank, config, sources, ["f1", "f1", None, "f0"])


def test_live_add_replace_project_and_remove(config, parts):
    raw, full, diag = parts
    bank = AdapterBank(config, max_slots=2, max_rank=4, max_clusters=2, max_cluster_rank=4, max_cluster_size=4)
    renamed = LoRAAdapter("f1", None, raw["raw_qo"].weights)
    assert bank.add(renamed) == 0  # "f1" served raw first ...
    gen0 = bank.generation
    c = bank.add_cluster(full, content_hash="v1")  # ... then its compressed version replaces it
    assert bank.generation > gen0 and bank.free_slots == 2 and bank.cluster_of("f1") == (c, 1)
    assert bank.content_hash("f1") == "v1" and bank.cluster_members(c) == ["f0", "f1", "f2"]
    # Onboarding by projection: a new adapter's cores on the resident bases go into a free row.
    new = random_lora_adapter(config, "new", 2, ("q_proj", "v_proj", "down_proj"), 7, scale=0.5)
    cores = {}
    for key in new.weights:
        U, V = bank.cluster_basis(c, key)
        f = new.weights[key]
        cores[key] = project_onto_basis(f.a, f.b * f.scale, U, V, "full")
    slot = bank.add_to_cluster("new", c, cores)
    assert slot == bank.slot_of("new") and bank.cluster_of("new") == (c, 3)
    projected = ClusterBank(9, ["new"], {k: bank.cluster_basis(c, k)[0].clone() for k in cores},
                            {k: bank.cluster_basis(c, k)[1].clone() for k in cores},
                            {k: v.unsqueeze(0) for k, v in cores.items()}, {k: torch.zeros(1) for k in cores})
    check_bank(bank, config, {"f0": full, "f2": full, "new": projected}, ["new", "f0", None, "new", "f2"])
    # A raw add of a compressed name takes it back to raw; removal frees rows, then the cluster.
    bank.add(renamed)
    assert bank.cluster_of("f1") is None and bank.slot_of("f1") < bank.max_slots
    check_bank(bank, config, {"f1": renamed, "f0": full}, ["f1", "f0"])
    for name in ("f0", "f2"):
        bank.remove(name)
    assert bank.compressed.used_clusters() == [c] and bank.cluster_members(c) == ["new"]
    bank.remove("new")
    assert bank.compressed.used_clusters() == [] and bank.names == ["f1"]
    with pytest.raises(TaskNotFound, match="'new'"):
        bank.slot_of("new")
    assert bank.add_cluster(diag) in (0, 1) and bank.remove_cluster(bank.cluster_of("d0")[0]) == ["d0", "d1"]
    assert bank.names == ["f1"] and bank.stats()["clusters_used"] == 0


def test_bad_clusters_are_refused_and_leave_the_bank_untouched(config, parts):
    raw, full, diag = parts
    bank = AdapterBank(config, max_slots=2, max_rank=4, max_clusters=1, max_cluster_rank=3, max_cluster_size=2)
    with pytest.raises(AdapterError, match="3 members > bank max_cluster_size 2"):
        bank.add_cluster(full)
    small = random_cluster(config, 0, ["a", "b"], 4, ("q_proj",), "full", 5)
    with pytest.raises(AdapterError, match="rank 4 > bank max_cluster_rank 3"):
        bank.add_cluster(small)
    wrong = random_cluster(ModelConfig.from_hf_dict(LlamaConfig(**(TINY | {"hidden_size": 40})).to_dict()),
                           0, ["a"], 2, ("k_proj",), "diag", 6)
    with pytest.raises(AdapterError, match=r"layers\.0\.k_proj.*do not fit"):
        bank.add_cluster(wrong)
    empty = random_cluster(config, 0, [], 2, ("q_proj",), "diag", 7)
    with pytest.raises(AdapterError, match="has no members"):
        bank.add_cluster(empty)
    assert len(bank) == 0 and bank.generation == 0
    c = bank.add_cluster(diag)
    with pytest.raises(NoFreeSlot, match="no free cluster slot"):
        bank.add_cluster(random_cluster(config, 1, ["z"], 2, ("q_proj",), "diag", 8))
    with pytest.raises(AdapterError, match=r"missing \[\(0, 'down_proj'\)"):
        bank.add_to_cluster("x", c, {(0, "q_proj"): torch.zeros(3)})
    with pytest.raises(NoFreeSlot, match="is full"):
        bank.add_to_cluster("x", c, {k: torch.zeros(3) for k in diag.U})
    assert bank.names == ["d0", "d1"]
    no_room = AdapterBank(config, max_slots=1, max_rank=1)
    with pytest.raises(AdapterError, match="not resident"):
        no_room.cluster_basis(0, (0, "q_proj"))


# ---------------------------------------------------------------------------------------------
# Real SmolLM2 through build_engine: compressed + raw + base requests in one batch.
# ---------------------------------------------------------------------------------------------

PROMPTS = [[1, 504, 3012, 28, 253, 1183, 30], [1, 9519, 314, 260, 3575, 282], [1, 7312, 1812, 30, 2]]
MODULES = ("q_proj", "v_proj", "down_proj")


def merged(base_dir, deltas: dict) -> torch.nn.Module:
    """The dense model with W + delta for every (layer, module) in deltas."""
    model = load_model(base_dir)
    with torch.no_grad():
        for (layer, module), delta in deltas.items():
            block = model.model.layers[layer]
            proj = getattr(block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, module)
            proj.base.weight += delta.to(proj.base.weight.dtype)
    return model


@pytest.fixture
def one_thread():
    """The CI box has 2 shared cores: torch's OpenMP threads then contend (prefill and the JD QRs
    measured ~10x slower with 2 threads than with 1), so the real-model test runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_engine_serves_compressed_next_to_raw_and_base_on_smollm2(smollm2_dir, tmp_path, one_thread):
    from inlaid_ray.demo.paths import demo_adapter_dir

    config = ModelConfig.from_dir(smollm2_dir)
    # Two rank-4 adapters squeezed into a shared rank 4: lossy, so serving raw factors would differ.
    members = [random_lora_adapter(config, f"c{i}", 4, MODULES, 10 + i, scale=0.02) for i in range(2)]
    cset = compress_adapter_set(members, ClusterConfig(jd=JDConfig(rank=4, max_iters=3), num_clusters=1), progress=False)
    assert all(e.error > 1e-2 for e in cset.banks.adapters.values())
    bank_dir = save_cluster_banks(cset.banks, tmp_path / "bank")
    sentiment = demo_adapter_dir("sentiment")
    engine = build_engine(smollm2_dir, {"sentiment": sentiment}, compressed=bank_dir, device="cpu",
                          engine_config=EngineConfig(num_kv_blocks=64, max_model_len=256))
    bank = engine.adapter_bank
    assert bank.cluster_of("c1") == (0, 1) and bank.cluster_of("sentiment") is None

    raw = load_peft_adapter(sentiment, config, name="sentiment")
    refs = {
        "c1": merged(smollm2_dir, {k: cset.banks.delta("c1", k) for k in members[1].weights}),
        "sentiment": merged(smollm2_dir, {k: raw.delta_weight(*k) for k in raw.weights}),
        None: load_model(smollm2_dir),
    }
    tasks = ["c1", "sentiment", None]
    logits = prefill_logits(engine.model, PROMPTS, [bank.slot_of(t) if t else -1 for t in tasks])
    for got, prompt, task in zip(logits, PROMPTS, tasks):
        want = prefill_logits(refs[task], [prompt])[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3, msg=f"task {task}")
    assert float((prefill_logits(refs[None], [PROMPTS[0]])[0] - logits[0]).abs().max()) > 1e-1  # c1 matters

    # Engine greedy decoding (prefill, then KV-cached decode steps of the mixed batch): every
    # token is the argmax of the merged reference given the same prefix (teacher-forced check,
    # equivalent to equal greedy sequences by induction).
    n = 6
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True), tasks=tasks)
    for out, prompt, task in zip(outs, PROMPTS, tasks):
        tokens = list(out.token_ids)
        ref = prefill_logits(refs[task], [prompt + tokens[:-1]])[0][len(prompt) - 1:]
        assert ref.argmax(-1).tolist() == tokens, f"task {task}"


def test_build_engine_refuses_a_name_in_raw_and_compressed(tiny_llama_dir, tmp_path):
    config = ModelConfig.from_dir(tiny_llama_dir)
    a = random_lora_adapter(config, "dup", 2, ("q_proj",), 0, scale=0.5)
    from inlaid_ray.lora import save_peft_adapter

    save_peft_adapter(a, tmp_path / "dup")
    cset = compress_adapter_set([a], ClusterConfig(jd=JDConfig(rank=2, max_iters=5), num_clusters=1), progress=False)
    save_cluster_banks(cset.banks, tmp_path / "bank")
    with pytest.raises(AdapterError, match="'dup' is in both raw adapters and compressed bank 0"):
        build_engine(tiny_llama_dir, {"dup": tmp_path / "dup"}, compressed=tmp_path / "bank", device="cpu")
