"""AdapterBank: a mixed batch of adapters (different ranks and targets, base-only tokens) gets
exactly the per-token LoRA delta, equal to transformers+PEFT's own LoRA layers; slots are
replaced in place, freed on remove, and a full bank refuses new adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from inlaid_ray.errors import AdapterError, NoFreeSlot, TaskNotFound
from inlaid_ray.lora import AdapterBank, LoRAAdapter, LoRAFactors, load_peft_adapter
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.forward_batch import LoRABatch

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Four adapters with different ranks and target modules (PEFT semantics incl. rsLoRA/patterns).
ADAPTERS = {
    "qv_r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "all_r8_rs": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "mlp_r4_l1": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                      layers_to_transform=[1]),
    "mixed_r3": dict(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 6}, alpha_pattern={"down_proj": 2}),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest expected value


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.from_hf_dict(LlamaConfig(**TINY).to_dict())


@pytest.fixture(scope="module")
def peft_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (saved PEFT dir, live PEFT model), random A and B, different base seeds."""
    out = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)),
                               LoraConfig(init_lora_weights=False, **kwargs)).eval()
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(d))
        out[name] = (d, model)
    return out


@pytest.fixture(scope="module")
def adapters(peft_models, model_config) -> dict[str, LoRAAdapter]:
    return {name: load_peft_adapter(d, model_config, name=name) for name, (d, _) in peft_models.items()}


def expected_delta(x: torch.Tensor, token_slots: list[int], slot_adapter: dict[int, LoRAAdapter],
                   layer: int, module: str, d_out: int) -> torch.Tensor:
    """Per-token reference: scale * B @ (A @ x[t]) for the token's adapter, 0 for base tokens."""
    delta = torch.zeros(len(token_slots), d_out)
    for t, slot in enumerate(token_slots):
        f = slot_adapter[slot].weights.get((layer, module)) if slot >= 0 else None
        if f is not None:
            delta[t] = f.scale * (f.b.float() @ (f.a.float() @ x[t].float()))
    return delta


TOKEN_SLOTS = [1, -1, 0, 0, 3, 2, -1, 1, 3, 3, 0, 2, -1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_equals_per_token_loop(dtype, adapters, model_config):
    bank = AdapterBank(model_config, max_slots=6, max_rank=8, dtype=dtype)
    slot_adapter = {bank.add(a): a for a in adapters.values()}
    assert sorted(slot_adapter) == [0, 1, 2, 3]
    batch = LoRABatch.from_token_slots(torch.tensor(TOKEN_SLOTS))
    g = torch.Generator().manual_seed(0)
    for layer in range(model_config.num_layers):
        for module in LINEAR_MODULES:
            d_out, d_in = model_config.module_shape(module)
            x = torch.randn(len(TOKEN_SLOTS), d_in, generator=g).to(dtype)
            y0 = torch.randn(len(TOKEN_SLOTS), d_out, generator=g).to(dtype)
            y = y0.clone()
            bank.add_delta(y, x, layer, module, batch)
            want = y0.float() + expected_delta(x, TOKEN_SLOTS, slot_adapter, layer, module, d_out)
            tol = TOL[dtype] * float(want.abs().max())
            torch.testing.assert_close(y.float(), want, rtol=0, atol=tol, msg=f"layer {layer} {module}")


def test_delta_equals_transformers_peft(peft_models, adapters, model_config):
    """For every projection, bank delta == PEFT LoRA layer output - its base layer output,
    each token using its own adapter's PEFT model."""
    bank = AdapterBank(model_config, max_slots=4, max_rank=8)
    slot_name = {bank.add(a): name for name, a in adapters.items()}
    batch = LoRABatch.from_token_slots(torch.tensor(TOKEN_SLOTS))
    g = torch.Generator().manual_seed(1)
    checked = 0
    for layer in range(model_config.num_layers):
        for module in LINEAR_MODULES:
            d_out, d_in = model_config.module_shape(module)
            x = torch.randn(len(TOKEN_SLOTS), d_in, generator=g)
            want = torch.zeros(len(TOKEN_SLOTS), d_out)
            for t, slot in enumerate(TOKEN_SLOTS):
                if slot < 0:
                    continue
                block = peft_models[slot_name[slot]][1].base_model.model.model.layers[layer]
                proj = getattr(block.self_attn if module in LINEAR_MODULES[:4] else block.mlp, module)
                if hasattr(proj, "base_layer"):  # a PEFT LoRA layer
                    with torch.no_grad():
                        want[t] = (proj(x[t : t + 1]) - proj.base_layer(x[t : t + 1]))[0]
                    checked += 1
            y = torch.zeros(len(TOKEN_SLOTS), d_out)
            bank.add_delta(y, x, layer, module, batch)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"layer {layer} {module}")
    assert checked > 50


def test_noop_when_no_token_uses_a_targeting_adapter(adapters, model_config):
    bank = AdapterBank(model_config, max_slots=4, max_rank=8)
    qv = bank.add(adapters["qv_r2"])
    mlp = bank.add(adapters["mlp_r4_l1"])
    assert bank.targeting_slots(0, "q_proj") == {qv}
    assert bank.targeting_slots(1, "gate_proj") == {mlp} and bank.targeting_slots(0, "gate_proj") == set()
    batch = LoRABatch.from_token_slots(torch.tensor([qv, -1, qv]))
    for layer, module in [(0, "gate_proj"), (1, "down_proj"), (0, "k_proj")]:
        d_out, d_in = model_config.module_shape(module)
        y0 = torch.randn(3, d_out)
        y = y0.clone()
        bank.add_delta(y, torch.randn(3, d_in), layer, module, batch)
        assert torch.equal(y, y0)
    y0 = torch.randn(3, 32)
    for batch in (None, LoRABatch.from_token_slots(torch.tensor([-1, -1, -1]))):
        y = y0.clone()
        bank.add_delta(y, torch.randn(3, 32), 0, "q_proj", batch)
        assert torch.equal(y, y0)
    assert "o_proj" not in bank.stats()["modules_allocated"]  # never targeted: never allocated


def _slot_rows_zero(bank: AdapterBank, slot: int, keys) -> bool:
    for layer, module in keys:
        w = bank.lora_weights(layer, module)
        if w is not None and (w[0][slot].any() or w[1][slot].any()):
            return False
    return True


ALL_KEYS = [(layer, m) for layer in range(2) for m in LINEAR_MODULES]


def test_replace_in_place_keeps_slot_and_swaps_content(adapters, model_config):
    bank = AdapterBank(model_config, max_slots=3, max_rank=8)
    bank.add(adapters["qv_r2"])
    slot = bank.add(dataclasses.replace(adapters["all_r8_rs"], name="task"))
    gen = bank.generation
    new = dataclasses.replace(adapters["mlp_r4_l1"], name="task")
    assert bank.add(new) == slot and bank.slot_of("task") == slot
    assert len(bank) == 2 and bank.generation > gen
    assert bank.content_hash("task") == new.content_hash
    assert int(bank.ranks[slot]) == new.max_rank
    # Modules only the old version targeted are zero again; the new ones hold the new factors.
    assert _slot_rows_zero(bank, slot, [k for k in ALL_KEYS if k not in new.weights])
    x = torch.randn(2, 48)
    y = torch.zeros(2, 32)
    bank.add_delta(y, x, 1, "down_proj", LoRABatch.from_token_slots(torch.tensor([slot, slot])))
    torch.testing.assert_close(y, x @ new.delta_weight(1, "down_proj").t(), rtol=1e-5, atol=1e-5)
    assert bank.targeting_slots(0, "q_proj") == {bank.slot_of("qv_r2")}


def test_remove_frees_slot_and_zeroes_it(adapters, model_config):
    bank = AdapterBank(model_config, max_slots=3, max_rank=8)
    a = bank.add(adapters["all_r8_rs"])
    bank.add(adapters["qv_r2"])
    bank.remove("all_r8_rs")
    assert "all_r8_rs" not in bank and bank.names == ["qv_r2"] and int(bank.ranks[a]) == 0
    assert _slot_rows_zero(bank, a, ALL_KEYS)
    assert all(a not in bank.targeting_slots(*k) for k in ALL_KEYS)
    with pytest.raises(TaskNotFound, match=r"adapter 'all_r8_rs' is not in the bank .*'qv_r2'"):
        bank.slot_of("all_r8_rs")
    with pytest.raises(TaskNotFound):
        bank.remove("all_r8_rs")
    assert bank.add(adapters["mixed_r3"]) == a  # the freed slot is reused
    assert bank.stats()["slots_used"] == 2


def test_full_bank_raises_no_free_slot(adapters, model_config):
    bank = AdapterBank(model_config, max_slots=2, max_rank=8)
    bank.add(adapters["qv_r2"])
    bank.add(adapters["mixed_r3"])
    with pytest.raises(NoFreeSlot, match=r"full \(2/2 slots: 'qv_r2', 'mixed_r3'\).*'mlp_r4_l1'"):
        bank.add(adapters["mlp_r4_l1"])
    assert bank.names == ["qv_r2", "mixed_r3"]
    bank.add(adapters["qv_r2"])  # replacing a resident adapter needs no free slot


def test_rejected_adapter_leaves_bank_untouched(adapters, model_config):
    bank = AdapterBank(model_config, max_slots=2, max_rank=4, dtype=torch.float16)
    bank.add(adapters["qv_r2"])
    before = (bank.generation, bank.names, bank.stats())
    with pytest.raises(AdapterError, match=r"'all_r8_rs' has rank 8 > bank max_rank 4"):
        bank.add(adapters["all_r8_rs"])
    wide = dataclasses.replace(model_config, hidden_size=64)
    with pytest.raises(AdapterError, match=r"do not fit the base model, expected \[r, 64\]"):
        AdapterBank(wide, max_slots=1, max_rank=8).add(adapters["qv_r2"])
    f = adapters["qv_r2"].weights[(0, "q_proj")]
    huge = LoRAAdapter("huge", None, {(0, "q_proj"): LoRAFactors(f.a, f.b * 0 + 6e4, scale=4.0)})
    with pytest.raises(AdapterError, match=r"'huge' layer 0 q_proj: non-finite .*scale 4.0 .*float16"):
        bank.add(huge)
    assert (bank.generation, bank.names, bank.stats()) == before


def test_stats_count_allocated_and_adapter_bytes(adapters, model_config):
    bank = AdapterBank(model_config, max_slots=5, max_rank=8, dtype=torch.bfloat16)
    for a in (adapters["qv_r2"], adapters["mlp_r4_l1"]):
        bank.add(a)
    stats = bank.stats()
    # q/k/v and gate/up are allocated as groups (one launch pair each): k_proj comes with q and v.
    modules = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    per_module = {m: sum(model_config.module_shape(m)) for m in modules}
    want = sum(model_config.num_layers * 5 * 8 * (d_sum) * 2 for d_sum in per_module.values())
    assert stats["modules_allocated"] == modules
    assert stats["bytes_allocated"] == want
    assert stats["adapter_bytes"] == adapters["qv_r2"].num_bytes + adapters["mlp_r4_l1"].num_bytes
    assert stats["slots_used"] == 2 and stats["max_slots"] == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_bank_matches_cpu_bank(dtype, adapters, model_config):
    cpu = AdapterBank(model_config, max_slots=4, max_rank=8, dtype=torch.float32)
    gpu = AdapterBank(model_config, max_slots=4, max_rank=8, dtype=dtype, device="cuda")
    for a in adapters.values():
        assert cpu.add(a) == gpu.add(a)
    slots = torch.tensor(TOKEN_SLOTS)
    g = torch.Generator().manual_seed(2)
    for layer in range(model_config.num_layers):
        for module in LINEAR_MODULES:
            d_out, d_in = model_config.module_shape(module)
            x = torch.randn(len(TOKEN_SLOTS), d_in, generator=g).to(dtype)
            y_cpu = torch.zeros(len(TOKEN_SLOTS), d_out)
            cpu.add_delta(y_cpu, x.float(), layer, module, LoRABatch.from_token_slots(slots))
            y_gpu = torch.zeros(len(TOKEN_SLOTS), d_out, dtype=dtype, device="cuda")
            gpu.add_delta(y_gpu, x.cuda(), layer, module, LoRABatch.from_token_slots(slots.cuda()))
            tol = TOL[torch.bfloat16] * float(y_cpu.abs().max().clamp(min=1e-6))
            torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, rtol=0, atol=tol)
