"""lora_sgmv shrink / expand / shrink_expand against the references over adapter-popularity
shapes (distinct, uniform, zipf, identical, skewed, all-base, mixed base), ranks 1..64 with zero
padding, odd sizes and fp16/bf16/fp32."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.kernels.lora_sgmv import (
    TOLERANCES,
    ExpandConfig,
    ShrinkConfig,
    lora_expand,
    lora_shrink,
    lora_shrink_expand,
    lora_shrink_expand_slices,
)
from inlaid_ray.kernels.reference import (
    lora_expand_ref,
    lora_shrink_expand_ref,
    lora_shrink_expand_slices_ref,
    lora_shrink_ref,
)
from inlaid_ray.model.forward_batch import LoRABatch

NUM_SLOTS = 6


def popularity(name: str, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter slot per token (-1 = base only) for one named popularity shape."""
    if name == "distinct":  # every token its own slot, slots beyond the tokens stay empty
        return torch.arange(num_tokens) % NUM_SLOTS
    if name == "uniform":
        return torch.randint(0, NUM_SLOTS, (num_tokens,), generator=gen)
    if name == "zipf":
        p = 1.0 / torch.arange(1, NUM_SLOTS + 1, dtype=torch.float64)
        return torch.multinomial(p / p.sum(), num_tokens, replacement=True, generator=gen)
    if name == "identical":  # one slot holds every token
        return torch.full((num_tokens,), 3)
    if name == "skewed":  # one big segment (spans several m-blocks) plus singletons
        slots = torch.full((num_tokens,), 1)
        slots[-3:] = torch.tensor([4, 0, 5])
        return slots
    if name == "mixed-base":
        slots = torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=gen)
        slots[0] = -1
        return slots
    if name == "all-base":
        return torch.full((num_tokens,), -1)
    raise ValueError(name)


def make_bank(d_in, d_out, max_rank, ranks, dtype, device, gen):
    """Bank with slot s of true rank ranks[s] (zero padded), outputs of order 1."""
    a = torch.randn(NUM_SLOTS, max_rank, d_in, generator=gen) / d_in**0.5
    b = torch.randn(NUM_SLOTS, d_out, max_rank, generator=gen) / max_rank**0.5
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    return a.to(dtype).to(device), b.to(dtype).to(device), torch.tensor(ranks, dtype=torch.int32, device=device)


def batch_on(slots: torch.Tensor, device: torch.device) -> LoRABatch:
    return LoRABatch.from_token_slots(slots.to(device))


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


SMALL = ShrinkConfig(block_m=16, block_k=64, split_k=2, num_stages=2)
EXPAND = ExpandConfig(block_m=16, block_n=32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", ["distinct", "uniform", "zipf", "identical", "skewed", "mixed-base", "all-base"])
def test_shrink_expand_popularity(device, shape, dtype):
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(sum(map(ord, shape + dtype)))
    num_tokens = 24
    a, b, ranks = make_bank(96, 67, 16, [16, 8, 1, 16, 4, 12], dt, device, gen)
    batch = batch_on(popularity(shape, num_tokens, gen), device)
    x = torch.randn(num_tokens, 96, generator=gen).to(dt).to(device)
    y0 = torch.randn(num_tokens, 67, generator=gen).to(dt).to(device)
    out, ref = y0.clone(), y0.clone()
    lora_shrink_expand(out, x, a, b, batch, ranks=ranks, shrink_config=SMALL, expand_config=EXPAND)
    lora_shrink_expand_ref(ref, x, a, b, batch)
    check(out, ref, dt)
    base_only = batch.token_slots < 0
    assert torch.equal(out[base_only], y0[base_only]), "base-only tokens must be untouched"


@pytest.mark.parametrize("max_rank", [1, 8, 64, 128])
@pytest.mark.parametrize("use_ranks", [True, False], ids=["ranks", "padded"])
def test_ranks(device, max_rank, use_ranks):
    gen = torch.Generator().manual_seed(max_rank)
    ranks = [max_rank, 1, max(1, max_rank // 2), max_rank, 1, max_rank]
    a, b, rank_t = make_bank(64, 48, max_rank, ranks, torch.float16, device, gen)
    batch = batch_on(popularity("uniform", 10, gen), device)
    x = torch.randn(10, 64, generator=gen).half().to(device)
    h = lora_shrink(x, a, batch, ranks=rank_t if use_ranks else None, config=SMALL)
    check(h, lora_shrink_ref(x, a, batch), torch.float16)
    y, ref = torch.zeros(10, 48, dtype=torch.float16, device=device), torch.zeros(10, 48, dtype=torch.float16, device=device)
    lora_expand(y, h, b, batch, ranks=rank_t if use_ranks else None, config=EXPAND)
    lora_expand_ref(ref, h, b, batch)
    check(y, ref, torch.float16)


@pytest.mark.parametrize("num_tokens", [1, 40])
def test_single_token_and_long_segment_fp32_default_config(device, num_tokens):
    """M = 1 (decode) and one segment longer than a block, with the configs picked by size."""
    gen = torch.Generator().manual_seed(num_tokens)
    a, b, _ = make_bank(96, 40, 8, [8] * NUM_SLOTS, torch.float32, device, gen)
    batch = batch_on(torch.full((num_tokens,), 2), device)
    x = torch.randn(num_tokens, 96, generator=gen).to(device)
    out, ref = torch.zeros(num_tokens, 40, device=device), torch.zeros(num_tokens, 40, device=device)
    lora_shrink_expand(out, x, a, b, batch)
    lora_shrink_expand_ref(ref, x, a, b, batch)
    check(out, ref, torch.float32)


def test_odd_output_size_and_strided_rows(device):
    """d_out = 1 and x/y rows views into wider buffers (row stride != width)."""
    gen = torch.Generator().manual_seed(11)
    a, b, _ = make_bank(64, 1, 4, [4, 2, 1, 4, 3, 4], torch.float16, device, gen)
    batch = batch_on(popularity("uniform", 7, gen), device)
    x = torch.randn(7, 100, generator=gen).half().to(device)[:, :64]
    ybuf = torch.randn(7, 5, generator=gen).half().to(device)
    ref = ybuf[:, 2:3].clone()
    lora_shrink_expand(ybuf[:, 2:3], x, a, b, batch, shrink_config=SMALL, expand_config=EXPAND)
    lora_shrink_expand_ref(ref, x, a, b, batch)
    check(ybuf[:, 2:3], ref, torch.float16)


def make_sliced_bank(d_in, widths, slice_rank, ranks, dtype, device, gen):
    """A fused projection's bank: A [S, P*R, d_in] with slice p in rows p*R.., B [S, sum(widths), R];
    slot s has rank ranks[s] in every slice (rows and columns beyond it zero)."""
    a = torch.randn(NUM_SLOTS, len(widths) * slice_rank, d_in, generator=gen) / d_in**0.5
    b = torch.randn(NUM_SLOTS, sum(widths), slice_rank, generator=gen) / slice_rank**0.5
    for s, r in enumerate(ranks):
        for p in range(len(widths)):
            a[s, p * slice_rank + r:(p + 1) * slice_rank] = 0
        b[s, :, r:] = 0
    return a.to(dtype).to(device), b.to(dtype).to(device), torch.tensor(ranks, dtype=torch.int32, device=device)


def dense_sliced_delta(x, a, b, slots, widths, slice_rank):
    """float64, token by token: every slice's B_p (A_p x) concatenated (0 for base-only tokens)."""
    out = torch.zeros(x.shape[0], sum(widths), dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        start = 0
        for p, width in enumerate(widths):
            a_p = a[s, p * slice_rank:(p + 1) * slice_rank].double().cpu()
            out[t, start:start + width] = b[s, start:start + width].double().cpu() @ (a_p @ x[t].double().cpu())
            start += width
    return out


SLOW = pytest.mark.slow  # the interpreter runs each case for ~0.5 s: the fast tier keeps a spread of them


@pytest.mark.parametrize("shape,slice_rank,use_ranks,dtype", [
    ("uniform", 16, True, "fp16"), ("mixed-base", 12, True, "fp32"), ("skewed", 8, True, "fp16"),
    ("all-base", 16, False, "fp32"),
    *[pytest.param(shape, r, u, d, marks=SLOW) for shape in ("uniform", "mixed-base", "skewed")
      for r, u in ((16, True), (16, False), (8, True), (12, True)) for d in ("fp32", "fp16")
      if (shape, r, u, d) not in {("uniform", 16, True, "fp16"), ("mixed-base", 12, True, "fp32"),
                                  ("skewed", 8, True, "fp16")}],
])
def test_sliced_shrink_expand_equals_each_slice_and_dense(device, shape, slice_rank, use_ranks, dtype):
    """q/k/v-like slices of unequal widths (one narrower than a column block, one spanning two) in
    two launches: equal to the per-slice reference and to a dense float64 product."""
    dt = torch.float32 if dtype == "fp32" else torch.float16
    gen = torch.Generator().manual_seed(sum(map(ord, shape)) + slice_rank)
    widths = (64, 24, 24)
    ranks = [slice_rank, 8 if slice_rank > 8 else 4, 1, slice_rank, 4, min(12, slice_rank)]
    a, b, rank_t = make_sliced_bank(96, widths, slice_rank, ranks, dt, device, gen)
    slots = popularity(shape, 20, gen)
    batch = batch_on(slots, device)
    x = torch.randn(20, 96, generator=gen).to(dt).to(device)
    y0 = torch.randn(20, sum(widths), generator=gen).to(dt).to(device)
    bounds = torch.tensor([0, 64, 88, 112], dtype=torch.int32, device=device)
    out, ref = y0.clone(), y0.clone()
    lora_shrink_expand_slices(out, x, a, b, batch, (widths, bounds), ranks=rank_t if use_ranks else None,
                              shrink_config=SMALL, expand_config=EXPAND)
    lora_shrink_expand_slices_ref(ref, x, a, b, batch, widths)
    check(out, ref, dt)
    dense = y0.double().cpu() + dense_sliced_delta(x, a, b, slots, widths, slice_rank)
    check(out.cpu(), dense, dt)
    assert torch.equal(out[batch.token_slots < 0], y0[batch.token_slots < 0]), "base-only tokens must be untouched"


def test_launcher_rejects_mismatched_inputs(device):
    gen = torch.Generator().manual_seed(12)
    a, b, _ = make_bank(64, 32, 8, [8] * NUM_SLOTS, torch.float16, device, gen)
    batch = batch_on(torch.tensor([0, 1]), device)
    with pytest.raises(AssertionError, match="dtype"):
        lora_shrink(torch.randn(2, 64, device=device), a, batch)
    with pytest.raises(AssertionError, match="token slots"):
        lora_shrink(torch.randn(3, 64, device=device).half(), a, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("num_adapters", [1, 8, 32])
def test_llama_shape_decode_batch(device, num_adapters):
    """4096 x 4096, rank 16, batch of 32 decode tokens over 1..32 distinct adapters."""
    gen = torch.Generator().manual_seed(num_adapters)
    a = (torch.randn(64, 16, 4096, generator=gen) / 64).half().to(device)
    b = (torch.randn(64, 4096, 16, generator=gen) / 4).half().to(device)
    batch = batch_on(torch.arange(32) % num_adapters, device)
    x = torch.randn(32, 4096, generator=gen).half().to(device)
    out, ref = torch.zeros(32, 4096, dtype=torch.float16, device=device), torch.zeros(32, 4096, dtype=torch.float16, device=device)
    lora_shrink_expand(out, x, a, b, batch)
    lora_shrink_expand_ref(ref, x, a, b, batch)
    check(out, ref, torch.float16)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(device):
    gen = torch.Generator().manual_seed(13)
    a, b, ranks = make_bank(512, 256, 16, [16] * NUM_SLOTS, torch.float16, device, gen)
    batch = batch_on(torch.tensor([0, 3, 3, -1, 5, 0, 1, 2]), device)
    x = torch.randn(8, 512, device=device, dtype=torch.float16)
    y = torch.zeros(8, 256, device=device, dtype=torch.float16)
    lora_shrink_expand(y, x, a, b, batch, ranks=ranks)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_shrink_expand(y, x, a, b, batch, ranks=ranks)
    x.copy_(torch.randn_like(x))
    y.zero_()
    graph.replay()
    ref = torch.zeros_like(y)
    lora_shrink_expand_ref(ref, x, a, b, batch)
    check(y, ref, torch.float16)


@pytest.mark.gpu
def test_sliced_cuda_graph_replay_equals_eager(device):
    """The fused-group op (q/k/v-like slices) captured in a CUDA graph and replayed on new inputs."""
    gen = torch.Generator().manual_seed(14)
    widths = (512, 128, 128)
    a, b, ranks = make_sliced_bank(512, widths, 16, [16, 8, 16, 4, 16, 1], torch.float16, device, gen)
    batch = batch_on(torch.tensor([0, 3, 3, -1, 5, 0, 1, 2]), device)
    slices = (widths, torch.tensor([0, 512, 640, 768], dtype=torch.int32, device=device))
    x = torch.randn(8, 512, device=device, dtype=torch.float16)
    y = torch.zeros(8, sum(widths), device=device, dtype=torch.float16)
    lora_shrink_expand_slices(y, x, a, b, batch, slices, ranks=ranks)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_shrink_expand_slices(y, x, a, b, batch, slices, ranks=ranks)
    x.copy_(torch.randn_like(x))
    y.zero_()
    graph.replay()
    ref = torch.zeros_like(y)
    lora_shrink_expand_slices_ref(ref, x, a, b, batch, widths)
    check(y, ref, torch.float16)
