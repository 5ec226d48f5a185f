"""Paged decode attention: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against its PyTorch
reference, and the reference against the engine's attention (gather + padded SDPA, an
independent implementation), on random block layouts, context lengths, GQA ratios, sliding
windows and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from inlaid_ray.kernels.paged_attention import TOLERANCES, DecodeAttentionConfig, paged_decode_attention
from inlaid_ray.kernels.reference import paged_decode_attention_ref
from inlaid_ray.model.attention import AttentionPlan, paged_attention
from inlaid_ray.model.forward_batch import ForwardBatch


def random_layout(context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype,
                  gen: torch.Generator, spare_blocks: int = 5):
    """A cache pool filled with noise and each sequence's blocks scattered at random over it."""
    need = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + 2  # wider than any sequence needs: padding entries must never be read
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    keys = torch.randn(shape, generator=gen).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    return keys, values, tables


CASES = [  # (heads, kv_heads, head_dim, block_size, context lengths)
    (4, 4, 64, 16, [1, 17, 64, 130]),  # MHA
    (9, 3, 64, 4, [5, 1, 33, 96, 7]),  # SmolLM2's GQA ratio
    (8, 1, 32, 16, [200, 3]),  # MQA, long context
    (6, 2, 48, 8, [9, 40]),  # head_dim that is not a power of two
]


@pytest.mark.parametrize("dtype", [torch.float32, *(pytest.param(d, marks=pytest.mark.slow)  # slow tier: half types
                                                    for d in (torch.float16, torch.bfloat16))])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,lens", CASES)
def test_triton_decode_attention_matches_reference(device, dtype, heads, kv_heads, head_dim, block_size, lens):
    gen = torch.Generator().manual_seed(len(lens) * 31 + head_dim)
    keys, values, tables = random_layout(lens, block_size, kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    args = [t.to(device) for t in (q, keys, values, tables, ctx)]
    scale = head_dim ** -0.5
    got = paged_decode_attention(*args, scale, config=DecodeAttentionConfig(num_splits=4, block_n=16))
    ref = paged_decode_attention_ref(q.float(), keys.float(), values.float(), tables, ctx, scale)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float().cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("window", [1, 6, 50])
def test_triton_decode_attention_sliding_window(device, window):
    gen = torch.Generator().manual_seed(window)
    lens = [3, 20, 77]
    keys, values, tables = random_layout(lens, 8, 2, 32, torch.float32, gen)
    q = torch.randn(len(lens), 4, 32, generator=gen)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_decode_attention(*[t.to(device) for t in (q, keys, values, tables, ctx)], 0.2, window,
                                 DecodeAttentionConfig(num_splits=3, block_n=16))
    ref = paged_decode_attention_ref(q, keys, values, tables, ctx, 0.2, window)
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_more_splits_than_keys_leaves_empty_splits_harmless(device):
    gen = torch.Generator().manual_seed(3)
    lens = [1, 2, 5]
    keys, values, tables = random_layout(lens, 4, 1, 16, torch.float32, gen)
    q = torch.randn(3, 2, 16, generator=gen)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_decode_attention(*[t.to(device) for t in (q, keys, values, tables, ctx)], 0.25,
                                 config=DecodeAttentionConfig(num_splits=8, block_n=16))
    ref = paged_decode_attention_ref(q, keys, values, tables, ctx, 0.25)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,lens", CASES)
def test_reference_matches_the_engines_padded_attention(heads, kv_heads, head_dim, block_size, lens):
    """The engine's path (scatter, gather through the block table, masked SDPA) as the outside check."""
    gen = torch.Generator().manual_seed(7)
    keys, values, tables = random_layout(lens, block_size, kv_heads, head_dim, torch.float64, gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen, dtype=torch.float64)
    ctx = torch.tensor(lens)
    # The decode token's own K/V are the last context position: let the engine write them there.
    last = torch.tensor([n - 1 for n in lens])
    blocks = tables[torch.arange(len(lens)), last // block_size].long()
    k_new, v_new = keys[blocks, last % block_size].clone(), values[blocks, last % block_size].clone()

    class Cache:  # the engine's PagedKVCache interface over this pool
        key_caches, value_caches = [keys.clone()], [values.clone()]

        def write(self, layer, slot_mapping, k, v):
            self.key_caches[layer].view(-1, kv_heads, head_dim)[slot_mapping] = k
            self.value_caches[layer].view(-1, kv_heads, head_dim)[slot_mapping] = v

    batch = ForwardBatch(
        positions=last, query_start=torch.arange(len(lens) + 1), context_lens=ctx,
        block_tables=tables.long(), slot_mapping=blocks * block_size + last % block_size,
        logits_indices=torch.arange(len(lens)), query_lens_list=[1] * len(lens), context_lens_list=lens)
    engine = paged_attention(q, k_new, v_new, Cache(), 0, batch, AttentionPlan.build(batch, None))
    ref = paged_decode_attention_ref(q, keys, values, tables, ctx, head_dim ** -0.5)
    torch.testing.assert_close(ref, engine, atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
def test_decode_launch_is_the_same_at_every_context_length(device):
    """CUDA-graph safety: capture at short contexts, replay at long ones, equal to eager."""
    gen = torch.Generator().manual_seed(0)
    lens = [300, 1000]
    keys, values, tables = random_layout(lens, 16, 2, 64, torch.float16, gen)
    q = torch.randn(2, 8, 64, generator=gen).half()
    q, keys, values, tables = (t.to(device) for t in (q, keys, values, tables))
    ctx = torch.tensor([1, 2], dtype=torch.int32, device=device)
    paged_decode_attention(q, keys, values, tables, ctx, 0.125)  # warm-up compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, keys, values, tables, ctx, 0.125)
    ctx.copy_(torch.tensor(lens, dtype=torch.int32, device=device))
    graph.replay()
    torch.testing.assert_close(out, paged_decode_attention(q, keys, values, tables, ctx, 0.125))


@pytest.mark.slow  # the engine with an interpreted Triton kernel: tens of seconds
def test_engine_decode_steps_through_the_triton_kernel_equal_transformers_greedy(tiny_llama_dir):
    """The whole engine with decode steps on the Triton kernel (interpreted on CPU) generates what
    transformers' own greedy `generate` does."""
    from transformers import AutoModelForCausalLM

    from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
    from inlaid_ray.model import load_model
    from inlaid_ray.model.attention import select_decode_attention

    prompts = [[1, 5, 7, 9, 11], [4, 4, 4], list(range(2, 31))]
    model = load_model(tiny_llama_dir)
    model.decode_attention = select_decode_attention("cpu", "triton")
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=64, max_num_batched_tokens=128, max_num_seqs=4)
    outs = LLMEngine(model, None, cfg).generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert list(out.token_ids) == ids[0, len(prompt):].tolist()
