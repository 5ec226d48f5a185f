"""Paged prefill / extend attention: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against
its PyTorch reference, and the reference against the engine's padded path (gather + masked
SDPA, an independent implementation), on random block layouts, new-token counts (whole prompts,
chunks after a cached prefix, single decode tokens, mixed), GQA ratios, sliding windows and
dtypes; and the engine with the kernel generates transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.kernels.paged_prefill import (
    TOLERANCES,
    PrefillAttentionConfig,
    paged_prefill_attention,
    query_blocks,
)
from inlaid_ray.kernels.reference import paged_prefill_attention_ref
from inlaid_ray.model.attention import AttentionPlan, paged_attention
from inlaid_ray.model.forward_batch import ForwardBatch
from test_paged_attention import random_layout

CASES = [  # (heads, kv_heads, head_dim, block_size, context lengths, new tokens per sequence)
    (4, 4, 64, 16, [17, 64, 130], [17, 40, 1]),  # MHA: whole prompt, a chunk, a decode token
    (9, 3, 64, 4, [5, 33, 96, 7], [5, 33, 3, 7]),  # SmolLM2's GQA ratio
    (8, 1, 32, 16, [200, 3], [70, 3]),  # MQA, a long context with a cached prefix
    (6, 2, 48, 8, [9, 40], [9, 1]),  # head_dim that is not a power of two
]


def _inputs(heads, kv_heads, head_dim, block_size, lens, new, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, values, tables = random_layout(lens, block_size, kv_heads, head_dim, dtype, gen)
    q = torch.randn(sum(new), heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    return q, keys, values, tables, starts, torch.tensor(lens)


def _kernel(device, q, keys, values, tables, starts, ctx, new, window=None, config=PrefillAttentionConfig()):
    """The kernel on `device` (CUDA, or CPU under the interpreter); the result back on the CPU."""
    seqs, firsts = query_blocks(new, config.block_m)
    args = [t.to(device) for t in (q, keys, values, tables, starts, ctx, torch.tensor(seqs, dtype=torch.int32),
                                   torch.tensor(firsts, dtype=torch.int32))]
    return paged_prefill_attention(*args, q.shape[-1] ** -0.5, window, config).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, *(pytest.param(d, marks=pytest.mark.slow)  # slow tier: half types
                                                    for d in (torch.float16, torch.bfloat16))])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,lens,new", CASES)
def test_triton_prefill_attention_matches_reference(device, dtype, heads, kv_heads, head_dim, block_size, lens, new):
    q, keys, values, tables, starts, ctx = _inputs(heads, kv_heads, head_dim, block_size, lens, new, dtype)
    ref = paged_prefill_attention_ref(q.float(), keys.float(), values.float(), tables, starts, ctx, head_dim ** -0.5)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(_kernel(device, q, keys, values, tables, starts, ctx, new).float(), ref,
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("window", [1, 5, 24])
def test_sliding_window_and_small_blocks(device, window):
    q, keys, values, tables, starts, ctx = _inputs(4, 2, 32, 4, [40, 9, 30], [40, 2, 17], torch.float32, seed=3)
    ref = paged_prefill_attention_ref(q, keys, values, tables, starts, ctx, 32 ** -0.5, window)
    cfg = PrefillAttentionConfig(block_m=16, block_n=16)
    torch.testing.assert_close(_kernel(device, q, keys, values, tables, starts, ctx, [40, 2, 17], window, cfg), ref,
                               atol=1e-4, rtol=1e-4)


def test_query_blocks():
    assert query_blocks([3, 0, 40, 1], 16) == ([0, 2, 2, 2, 3], [0, 3, 19, 35, 43])


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,lens,new", CASES)
def test_reference_matches_the_engines_padded_attention(heads, kv_heads, head_dim, block_size, lens, new):
    """The engine's path (scatter the new K/V, gather through the block table, masked SDPA) as the
    outside check; the new tokens' K/V are taken from the pool and written back by the engine."""
    q, keys, values, tables, starts, ctx = _inputs(heads, kv_heads, head_dim, block_size, lens, new, torch.float64, 7)
    positions = torch.cat([torch.arange(c - n, c) for c, n in zip(lens, new)])
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(new))
    blocks = tables[seq, positions // block_size].long()
    slots = blocks * block_size + positions % block_size
    k_new, v_new = keys[blocks, positions % block_size].clone(), values[blocks, positions % block_size].clone()

    class Cache:  # the engine's PagedKVCache interface over this pool
        key_caches, value_caches = [keys.clone()], [values.clone()]

        def write(self, layer, slot_mapping, k, v):
            self.key_caches[layer].view(-1, kv_heads, head_dim)[slot_mapping] = k
            self.value_caches[layer].view(-1, kv_heads, head_dim)[slot_mapping] = v

    batch = ForwardBatch(positions=positions, query_start=starts, context_lens=ctx, block_tables=tables.long(),
                         slot_mapping=slots, logits_indices=starts[1:] - 1, query_lens_list=list(new),
                         context_lens_list=list(lens))
    engine = paged_attention(q, k_new, v_new, Cache(), 0, batch, AttentionPlan.build(batch, None))
    ref = paged_prefill_attention_ref(q, keys, values, tables, starts, ctx, head_dim ** -0.5)
    torch.testing.assert_close(ref, engine, atol=1e-10, rtol=1e-10)


@pytest.mark.slow  # the engine with interpreted Triton kernels: tens of seconds
def test_engine_with_the_prefill_kernel_equals_transformers_greedy(device, tiny_llama_dir):
    """Every step through the Triton kernels (prefill, mixed and decode steps; interpreted on CPU,
    fp32 on CUDA) generates what transformers' own greedy `generate` does."""
    from transformers import AutoModelForCausalLM

    from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
    from inlaid_ray.model import load_model
    from inlaid_ray.model.attention import select_decode_attention, select_prefill_attention

    prompts = [[1, 5, 7, 9, 11], [4, 4, 4], list(range(2, 31)), [3] * 20]
    model = load_model(tiny_llama_dir, device=device)
    model.decode_attention = select_decode_attention(device, "triton")
    model.prefill_attention = select_prefill_attention(device, "triton")
    # 48 tokens a step: the 4th prompt waits, then prefills beside three decodes (a mixed step)
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=48, max_num_batched_tokens=48, max_num_seqs=4)
    engine = LLMEngine(model, None, cfg)
    calls = []
    op = model.prefill_attention
    model.prefill_attention = lambda q, *args: calls.append(q.shape[0]) or op(q, *args)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert 37 in calls and 23 in calls  # the first prefill and the mixed step went through the kernel
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert list(out.token_ids) == ids[0, len(prompt):].tolist()
