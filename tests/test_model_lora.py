"""Our model + adapter bank equals transformers + PEFT, for one adapter and for a batch
mixing several adapters (different ranks / targets) and base-only sequences."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.lora import AdapterBank, load_peft_adapter
from inlaid_ray.model import ModelConfig, encode_chat, load_model, load_tokenizer, prefill_logits

SEQS = [[1, 5, 7, 9, 11, 3, 2], [4, 4, 4, 8], list(range(2, 30)), [9, 8, 7]]


def _make_peft_adapter(base_dir, out_dir, seed, **lora_kwargs):
    """A PEFT adapter with random (non-zero) A and B saved in the standard format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # keep the delta small, like a trained adapter, so logits stay sane
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft.save_pretrained(str(out_dir))
    return out_dir


def _peft_logits(base_dir, adapter_dir, seqs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in seqs]


def _hf_logits(base_dir, seqs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in seqs]


ADAPTER_SPECS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
    dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
]


def test_mixed_adapter_batch_matches_peft(tmp_path, tiny_llama_dir):
    config = ModelConfig.from_dir(tiny_llama_dir)
    bank = AdapterBank(config, max_slots=4, max_rank=8)
    dirs = []
    for i, spec in enumerate(ADAPTER_SPECS):
        d = _make_peft_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i, **spec)
        bank.add(load_peft_adapter(d, config, name=f"a{i}"))
        dirs.append(d)
    model = load_model(tiny_llama_dir, adapter_bank=bank)
    # one batch: three adapters and a base-only sequence, different lengths
    slots = [bank.slot_of("a0"), bank.slot_of("a1"), -1, bank.slot_of("a2")]
    ours = prefill_logits(model, SEQS, token_slots=slots, block_size=4)
    for i, (seq, got) in enumerate(zip(SEQS, ours)):
        ref = _hf_logits(tiny_llama_dir, [seq])[0] if slots[i] < 0 else _peft_logits(
            tiny_llama_dir, dirs[[0, 1, None, 2][i]], [seq]
        )[0]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_with_adapter_matches_peft(tmp_path, smollm2_dir):
    config = ModelConfig.from_dir(smollm2_dir)
    adapter_dir = _make_peft_adapter(smollm2_dir, tmp_path / "adapter", seed=3, r=8, lora_alpha=16,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    bank = AdapterBank(config, max_slots=2, max_rank=8)
    bank.add(load_peft_adapter(adapter_dir, config, name="t"))
    model = load_model(smollm2_dir, adapter_bank=bank)
    tok = load_tokenizer(smollm2_dir)
    seqs = [encode_chat(tok, [{"role": "user", "content": "Name three colours."}]), list(range(200, 230))]
    ours = prefill_logits(model, seqs, token_slots=[bank.slot_of("t"), -1])
    ref_adapter = _peft_logits(smollm2_dir, adapter_dir, seqs[:1])[0]
    ref_base = _hf_logits(smollm2_dir, seqs[1:])[0]
    assert (ref_adapter - _hf_logits(smollm2_dir, seqs[:1])[0]).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours[0], ref_adapter, atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1], ref_base, atol=5e-4, rtol=1e-4)
