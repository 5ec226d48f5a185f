"""Our paged-KV forward equals transformers' modeling code (tiny random models and SmolLM2)."""

from __future__ import annotations

import pytest
import torch

from conftest import write_tiny_hf_model
from inlaid_ray.errors import ModelLoadError
from inlaid_ray.model import ModelConfig, encode_chat, load_model, load_tokenizer, prefill_logits
from inlaid_ray.model.rope import rope_inv_freq

SEQS = [[1, 5, 7, 9, 11, 3, 2], [4, 4, 4], list(range(2, 45))]


def _hf_logits(model_dir, seqs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0] for s in seqs]


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   "rope_theta": 500000.0}),
        ("mistral", {"sliding_window": None}),
        ("qwen2", {"num_key_value_heads": 2}),
    ],
    ids=["llama-gqa", "llama-tied-mqa", "llama3-rope", "mistral", "qwen2-bias"],
)
def test_tiny_models_match_transformers(tmp_path, model_type, overrides):
    model_dir = write_tiny_hf_model(tmp_path / model_type, model_type, **overrides)
    ours = prefill_logits(load_model(model_dir), SEQS, block_size=4)
    for got, ref in zip(ours, _hf_logits(model_dir, SEQS)):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(ModelConfig.from_hf_dict(hf_cfg.to_dict()))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_sliding_window_masks_old_keys(tmp_path):
    model_dir = write_tiny_hf_model(tmp_path / "m", "mistral", sliding_window=8)
    seq = list(range(3, 40))
    got = prefill_logits(load_model(model_dir), [seq], block_size=4)[0]
    full = prefill_logits(load_model(write_tiny_hf_model(tmp_path / "f", "mistral", sliding_window=None)), [seq])[0]
    torch.testing.assert_close(got[:8], full[:8], atol=2e-5, rtol=1e-4)  # inside the window: same
    assert (got[20:] - full[20:]).abs().max() > 1e-3  # beyond it: old keys are masked out


def test_bad_model_dirs_fail_clearly(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    chat = encode_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    seqs = [chat, chat[:9], list(range(100, 140))]
    ours = prefill_logits(load_model(smollm2_dir), seqs, block_size=16)
    for got, ref in zip(ours, _hf_logits(smollm2_dir, seqs)):
        torch.testing.assert_close(got, ref, atol=5e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
