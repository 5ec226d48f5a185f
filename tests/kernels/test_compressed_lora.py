"""compressed_lora (shared V/U per cluster, per-adapter Sigma) against compressed_lora_ref, for
full and diagonal cores, cluster-popularity shapes, shared ranks 1..128, fp16/bf16/fp32; and
the algebra itself: with Sigma = the adapter's own core it equals the dense LoRA delta."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.kernels.compressed_lora import TOLERANCES, CompressedLoRABatch, compressed_lora
from inlaid_ray.kernels.lora_sgmv import ExpandConfig, ShrinkConfig
from inlaid_ray.kernels.reference import compressed_lora_ref

NUM_CLUSTERS, ROWS = 3, 5
SMALL = ShrinkConfig(block_m=16, block_k=64, split_k=2, num_stages=2)
EXPAND = ExpandConfig(block_m=16, block_n=32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_bank(d_in, d_out, k, full, dtype, device, gen):
    """Shared bases and cores scaled so the added term is of order 1."""
    v = torch.randn(NUM_CLUSTERS, d_in, k, generator=gen) / d_in**0.5
    u = torch.randn(NUM_CLUSTERS, d_out, k, generator=gen) / k**0.5
    shape = (NUM_CLUSTERS, ROWS, k, k) if full else (NUM_CLUSTERS, ROWS, k)
    sigma = torch.randn(*shape, generator=gen) / (k**0.5 if full else 1.0)
    return v.to(dtype).to(device), u.to(dtype).to(device), sigma.to(dtype).to(device)


def clusters_for(shape: str, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    if shape == "uniform":
        return torch.randint(-1, NUM_CLUSTERS, (num_tokens,), generator=gen)
    if shape == "one-cluster":
        return torch.full((num_tokens,), 2)
    if shape == "skewed":
        c = torch.zeros(num_tokens, dtype=torch.int64)
        c[-2:] = torch.tensor([2, -1])
        return c
    if shape == "all-base":
        return torch.full((num_tokens,), -1)
    raise ValueError(shape)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def run(device, dtype, full, shape, num_tokens=20, d_in=96, d_out=67, k=20, seed=0, configs=(SMALL, EXPAND)):
    gen = torch.Generator().manual_seed(seed)
    v, u, sigma = make_bank(d_in, d_out, k, full, dtype, device, gen)
    ids = clusters_for(shape, num_tokens, gen)
    batch = CompressedLoRABatch.from_ids(ids.to(device), torch.randint(0, ROWS, (num_tokens,), generator=gen).to(device))
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype).to(device)
    y0 = torch.randn(num_tokens, d_out, generator=gen).to(dtype).to(device)
    out, ref = y0.clone(), y0.clone()
    compressed_lora(out, x, v, u, sigma, batch, shrink_config=configs[0], expand_config=configs[1])
    compressed_lora_ref(ref, x, v, u, sigma, batch)
    check(out, ref, dtype)
    base = batch.token_clusters < 0
    assert torch.equal(out[base], y0[base]), "base-only tokens must be untouched"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("shape", ["uniform", "one-cluster", "skewed", "all-base"])
def test_matches_reference(device, shape, full, dtype):
    run(device, DTYPES[dtype], full, shape, seed=sum(map(ord, shape + dtype)) + full)


@pytest.mark.parametrize("k", [1, 16, 128])
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_shared_ranks(device, k, full):
    run(device, torch.float16, full, "uniform", num_tokens=9, d_in=64, d_out=48, k=k, seed=k)


def test_single_token_default_config(device):
    run(device, torch.float16, True, "one-cluster", num_tokens=1, seed=5, configs=(None, None))


def test_equals_dense_lora_delta():
    """Reference algebra: V = A^T, U = B, Sigma = I reproduces y += B A x (CPU; the reference
    computes in fp32, so fp32 tolerance)."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(8, 32, generator=gen, dtype=torch.float64), torch.randn(24, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    y = torch.zeros(4, 24, dtype=torch.float64)
    batch = CompressedLoRABatch.from_ids(torch.tensor([0, -1, 0, 0]), torch.zeros(4, dtype=torch.int64))
    compressed_lora_ref(y, x, a.t()[None].contiguous(), b[None], torch.eye(8, dtype=torch.float64)[None, None], batch)
    expected = x @ a.t() @ b.t()
    expected[1] = 0
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_batch_grouping_walkthrough():
    batch = CompressedLoRABatch.from_ids(torch.tensor([1, -1, 0, 1]), torch.tensor([5, 0, 2, 3]))
    assert batch.sorted_token_ids.tolist() == [2, 0, 3]
    assert batch.clusters_list == [0, 1] and batch.counts_list == [1, 2] and batch.offsets.tolist() == [0, 1]
    assert batch.num_lora_tokens == 3


@pytest.mark.gpu
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_llama_shape_decode_batch(device, full):
    """4096 x 4096, shared rank 64, 32 decode tokens of 32 adapters in 2 clusters."""
    gen = torch.Generator().manual_seed(21)
    v = (torch.randn(2, 4096, 64, generator=gen) / 64).half().to(device)
    u = (torch.randn(2, 4096, 64, generator=gen) / 8).half().to(device)
    sigma = (torch.randn(2, 16, 64, 64, generator=gen) / 8) if full else torch.randn(2, 16, 64, generator=gen)
    sigma = sigma.half().to(device)
    batch = CompressedLoRABatch.from_ids((torch.arange(32) % 2).to(device), (torch.arange(32) // 2).to(device))
    x = torch.randn(32, 4096, generator=gen).half().to(device)
    out, ref = torch.zeros(32, 4096, dtype=torch.float16, device=device), torch.zeros(32, 4096, dtype=torch.float16, device=device)
    compressed_lora(out, x, v, u, sigma, batch)
    compressed_lora_ref(ref, x, v, u, sigma, batch)
    check(out, ref, torch.float16)
