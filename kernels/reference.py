"""PyTorch references for every op in `inlaid_ray.kernels`: readable, slow, the ground truth
the Triton kernels are tested against, and the path used where Triton is unavailable.

Layouts:
- GPTQ (AutoGPTQ/GPTQModel "gptq" v1 checkpoint format, docs/algorithms.md section 3): b-bit codes
  form a little-endian bit stream along the packed dim, 32 codes per b int32 words (for
  b in {2, 4, 8}: 32/b codes per word, code j of a word at bit b*j). `qweight` packs along the
  input dim, `qzeros` along the output dim and stores `zero - 1`.
- Multi-LoRA bank: per (layer, module) `lora_a [num_slots, max_rank, d_in]`,
  `lora_b [num_slots, d_out, max_rank]` with the adapter scaling folded into `lora_b` and
  ranks below `max_rank` zero-padded; tokens pick a slot through `LoRABatch`.
- Compressed LoRA bank (Compress then Serve): per cluster c shared `V [C, d_in, k]`,
  `U [C, d_out, k]` and per-adapter cores `sigma [C, n, k, k]` (full) or `[C, n, k]` (diag);
  tokens pick (cluster, row) through `CompressedLoRABatch`.
Numerics: accumulate in fp32, return in the activation dtype.
"""

from __future__ import annotations

import torch

from inlaid_ray.kernels.compressed_lora_batch import CompressedLoRABatch
from inlaid_ray.model.forward_batch import LoRABatch
from inlaid_ray.model.layers import cast

SUPPORTED_BITS = (2, 3, 4, 8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Unpack `count` b-bit codes stored along `dim` of an int32 tensor; returns int32 codes.

    Semantics: code c sits at bits [b*c, b*c + b) of the stream formed by the words
    packed[..., k] (little-endian, word k holds stream bits 32k..32k+31).
    """
    assert bits in SUPPORTED_BITS, f"bits={bits} not in {SUPPORTED_BITS}"
    assert packed.dtype == torch.int32, f"packed dtype {packed.dtype}, expected int32"
    words = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # [..., n_words]
    assert words.shape[-1] * 32 >= count * bits, (words.shape, count, bits)
    start = torch.arange(count, device=packed.device) * bits
    word_idx, offset = start // 32, start % 32
    lo = words[..., word_idx] >> offset
    # A 3-bit code may straddle two words: take its high bits from the next word.
    spill = (offset + bits) > 32
    nxt = words[..., torch.clamp(word_idx + 1, max=words.shape[-1] - 1)]
    hi = torch.where(spill, nxt << (32 - offset), torch.zeros_like(nxt))
    codes = (lo | hi) & ((1 << bits) - 1)
    return codes.to(torch.int32).movedim(-1, dim)


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `unpack_codes`: pack int codes in [0, 2^b) along `dim` into int32 words."""
    assert bits in SUPPORTED_BITS, f"bits={bits} not in {SUPPORTED_BITS}"
    c = codes.movedim(dim, -1).to(torch.int64)
    count = c.shape[-1]
    assert (count * bits) % 32 == 0, f"{count} codes of {bits} bits do not fill whole int32 words"
    assert int(c.min()) >= 0 and int(c.max()) < (1 << bits), "codes out of range"
    n_words = count * bits // 32
    words = torch.zeros(*c.shape[:-1], n_words, dtype=torch.int64, device=codes.device)
    for j in range(count):  # clear, not fast: packing runs once per checkpoint
        start = j * bits
        w, off = divmod(start, 32)
        words[..., w] |= (c[..., j] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[..., w + 1] |= c[..., j] >> (32 - off)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).movedim(-1, dim)


def gptq_dequantize_ref(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Dense weight `W [d_out, d_in]` (dtype of `scales`) of a GPTQ v1-packed linear.

    Semantics: W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1))
    qweight: [d_in * bits / 32, d_out] int32; qzeros: [n_groups, d_out * bits / 32] int32;
    scales: [n_groups, d_out] fp16/bf16/fp32; g_idx: [d_in] int32.
    """
    d_in, d_out = g_idx.shape[0], scales.shape[1]
    q = unpack_codes(qweight, bits, d_in, dim=0)  # [d_in, d_out]
    z = unpack_codes(qzeros, bits, d_out, dim=1) + 1  # [n_groups, d_out], v1 stores zero - 1
    g = g_idx.long()
    w = scales.float()[g] * (q - z[g]).float()  # [d_in, d_out]
    return w.t().contiguous().to(scales.dtype)


def gptq_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = x @ W^T (+ bias)` for a GPTQ-packed W; x: [M, d_in]; returns [M, d_out] in x.dtype."""
    w = gptq_dequantize_ref(qweight, qzeros, scales, g_idx, bits)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """h[t] = lora_a[slot(t)] @ x[t] for tokens with an adapter, 0 elsewhere.

    x: [T, d_in]; lora_a: [num_slots, max_rank, d_in]; returns h: [T, max_rank] fp32.
    """
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot, offset, count in zip(batch.slots_list, batch.offsets_list, batch.counts_list):
        idx = batch.sorted_token_ids[offset : offset + count]
        h[idx] = x[idx].float() @ lora_a[slot].float().t()
    return h


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch) -> None:
    """y[t] += lora_b[slot(t)] @ h[t] for tokens with an adapter; y modified in place.

    y: [T, d_out]; h: [T, max_rank] fp32; lora_b: [num_slots, d_out, max_rank].
    """
    for slot, offset, count in zip(batch.slots_list, batch.offsets_list, batch.counts_list):
        idx = batch.sorted_token_ids[offset : offset + count]
        y[idx] = (y[idx].float() + h[idx] @ lora_b[slot].float().t()).to(y.dtype)


# The reference op gathers each token's factors when that moves at most this many elements per
# adapter segment it saves (a segment costs ~6 dispatched ops; on the 2-core CPU of
# load_tests/bench_host_overhead.py the gather halved the step's LoRA cost at 8 tokens x 8
# adapters and broke even at 64 x 8); otherwise, e.g. a long prefill, it loops over segments.
GATHER_ELEMENTS_PER_SEGMENT = 1 << 15


def lora_shrink_expand_slices_ref(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
    widths: tuple[int, ...],
) -> None:
    """Reference of `lora_shrink_expand_slices`: `lora_shrink_expand_ref` on each slice's views
    (y's and lora_b's columns of slice p, lora_a's rows p*R:(p+1)*R)."""
    rank = lora_b.shape[2]
    start = 0
    for p, width in enumerate(widths):
        lora_shrink_expand_ref(y[:, start:start + width], x, lora_a[:, p * rank:(p + 1) * rank],
                               lora_b[:, start:start + width], batch)
        start += width


def lora_shrink_expand_ref(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch
) -> None:
    """y[t] += lora_b[s] @ (lora_a[s] @ x[t]) with s = batch.token_slots[t] >= 0; y in place.

    The same arithmetic as `lora_expand_ref(y, lora_shrink_ref(x, ...), ...)` (fp32 h, fp32 sum,
    one rounding to y's dtype), with one gather and one scatter of the activations for all slots.
    This is the CPU serving path, where every dispatched op is host time, so the number of ops
    should not grow with the number of distinct adapters: with several adapters each token gets
    its own slot's factors (punica's BGMV: gathered factors, a fixed op count for any mix)
    unless the gather is large for the segments it saves (GATHER_ELEMENTS_PER_SEGMENT); one
    adapter, or a long prefill, loops over the adapter segments (contiguous slices of the
    slot-sorted tokens)."""
    if not batch.num_active_slots:
        return
    f32 = torch.float32
    n_real = batch.num_lora_tokens
    ids = batch.sorted_token_ids[:n_real]  # a static batch pads its device arrays past the real tokens
    xs = cast(x.index_select(0, ids), f32)  # [T_lora, d_in], grouped by slot
    n, rank = xs.shape[0], lora_a.shape[1]
    segments = batch.num_active_slots
    if segments > 1 and n * rank * (lora_a.shape[2] + lora_b.shape[1]) <= GATHER_ELEMENTS_PER_SEGMENT * segments:
        a = cast(lora_a.index_select(0, batch.sorted_slots[:n_real]), f32)  # [T_lora, R, d_in]
        b = cast(lora_b.index_select(0, batch.sorted_slots[:n_real]), f32)  # [T_lora, d_out, R]
        # Broadcast products, not bmm: the CPU's bmm runs one small GEMV per token.
        h = (a * xs.unsqueeze(1)).sum(2)  # [T_lora, R]
        delta = (b * h.unsqueeze(1)).sum(2)  # [T_lora, d_out]
    else:
        deltas = [
            (xs[offset : offset + count] @ cast(lora_a[slot], f32).t()) @ cast(lora_b[slot], f32).t()
            for slot, offset, count in zip(batch.slots_list, batch.offsets_list, batch.counts_list)
        ]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
    y.index_copy_(0, ids, cast(cast(y.index_select(0, ids), f32) + delta, y.dtype))


def compressed_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    batch: CompressedLoRABatch,
) -> None:
    """y[t] += U_c (Sigma_c[row] (V_c^T x[t])) for tokens with a cluster c >= 0; y modified in place.

    Compress then Serve (docs/algorithms.md 9.10); scaling and norms live inside Sigma.
    x: [T, d_in]; y: [T, d_out]; v: [C, d_in, k]; u: [C, d_out, k];
    sigma: [C, n, k, k] (JD-Full, g = Sigma h) or [C, n, k] (JD-Diag, g = sigma * h).
    """
    for c, offset, count in zip(batch.clusters_list, batch.offsets_list, batch.counts_list):
        idx = batch.sorted_token_ids[offset : offset + count]
        h = x[idx].float() @ v[c].float()  # [count, k]
        core = sigma[c, batch.token_rows[idx]].float()  # [count, k] or [count, k, k]
        g = h * core if sigma.dim() == 3 else torch.einsum("tji,ti->tj", core, h)
        y[idx] = (y[idx].float() + g @ u[c].float().t()).to(y.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One decode query per sequence over its paged K/V: out[s] = softmax(q[s] K_s^T * scale) V_s.

    q: [S, H, D]; key_cache, value_cache: [num_blocks, block_size, KVH, D]; block_tables:
    [S, max_blocks] (entries past a sequence's blocks are ignored); context_lens: [S], the keys
    of sequence s are its first context_lens[s] cache positions (the query sits at the last one);
    `sliding_window` keeps only the last that many keys. Query head h reads KV head
    h // (H / KVH) (GQA). Returns [S, H, D] in q.dtype; computed in fp32 (fp64 for fp64
    inputs), one sequence at a time.
    """
    num_seqs, num_heads, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    out = torch.empty_like(q)
    for s, ctx in enumerate(context_lens.tolist()):
        start = max(0, ctx - sliding_window) if sliding_window is not None else 0
        pos = torch.arange(start, ctx, device=q.device)
        blocks = block_tables[s, pos // block_size].long()
        k = key_cache[blocks, pos % block_size].to(acc)  # [n, KVH, D]
        v = value_cache[blocks, pos % block_size].to(acc)
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [n, H, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[s].to(acc), k) * scale
        out[s] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's new tokens over its paged context.

    q: [T, H, D], sequence s's new tokens at rows query_start[s]:query_start[s+1]; they are the
    LAST q_len of its context_lens[s] cache positions (their K/V already written), so new token j
    sits at position context_lens[s] - q_len + j and sees keys 0..that position (the last
    `sliding_window` of them when set). key_cache/value_cache: [num_blocks, block_size, KVH, D];
    query head h reads KV head h // (H / KVH). Returns [T, H, D] in q.dtype, computed in fp32
    (fp64 for fp64 inputs), one sequence at a time.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    starts, ctxs = query_start.tolist(), context_lens.tolist()
    for s, ctx in enumerate(ctxs):
        a, b = starts[s], starts[s + 1]
        if a == b:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[s, pos // block_size].long()
        k = key_cache[blocks, pos % block_size].to(acc).repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = value_cache[blocks, pos % block_size].to(acc).repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - (b - a), ctx, device=q.device)  # [q_len]
        visible = pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= pos[None, :] > q_pos[:, None] - sliding_window
        scores = torch.einsum("thd,nhd->htn", q[a:b].to(acc), k) * scale
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[a:b] = torch.einsum("htn,nhd->thd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
