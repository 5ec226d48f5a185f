"""Compressed multi-LoRA (Compress then Serve, docs/algorithms.md 9.10): adapters of a cluster share
bases V_c [d_in, k] and U_c [d_out, k] and differ only in a core Sigma (k x k, or k numbers for
JD-Diag). Per step and module this runs, for all clusters at once:
1. one segmented shrink H = X_c V_c per cluster (the `lora_sgmv` shrink kernel with V's strides),
2. the per-token core: diag is fused into step 3's load of H; full is a tiny gather-matvec kernel,
3. one segmented expand Y_c += G_c U_c^T per cluster (the `lora_sgmv` expand kernel).
So a batch of many adapters costs a few dense GEMMs per cluster instead of one pair per adapter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inlaid_ray.kernels._common import cdiv, is_interpreted, next_pow2
from inlaid_ray.kernels.compressed_lora_batch import CompressedLoRABatch
from inlaid_ray.kernels.lora_sgmv import (
    TOLERANCES as LORA_TOLERANCES,
    ExpandConfig,
    ShrinkConfig,
    _check_segments,
    _sgmv_shrink_kernel,
    sgmv_expand,
    sgmv_shrink,
)

__all__ = ["CompressedLoRABatch", "TOLERANCES", "compressed_lora"]

# (atol, rtol) against `compressed_lora_ref`, outputs of order 1 (same rounding as lora_sgmv).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = dict(LORA_TOLERANCES)


@triton.jit
def _sigma_full_kernel(
    h_ptr, g_ptr, sigma_ptr, clusters_ptr, rows_ptr, sorted_ids_ptr,
    R, stride_hm, stride_gm, stride_sc, stride_sn, stride_sj,
    BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (lora token, BLOCK_J outputs): g[t, j] = sum_i Sigma[c, row, j, i] * h[t, i].
    tok = tl.load(sorted_ids_ptr + tl.program_id(0)).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < R
    c = tl.load(clusters_ptr + tok).to(tl.int64)
    row = tl.load(rows_ptr + tok).to(tl.int64)
    base = sigma_ptr + c * stride_sc + row * stride_sn
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        hv = tl.load(h_ptr + tok * stride_hm + offs_r, mask=mask_r, other=0.0)
        core = tl.load(base + offs_j[:, None] * stride_sj + offs_r[None, :], mask=mask_j[:, None] & mask_r[None, :], other=0.0)
        acc += tl.sum(core.to(tl.float32) * hv[None, :], axis=1)
    tl.store(g_ptr + tok * stride_gm + offs_j, acc, mask=mask_j)


def compressed_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    batch: CompressedLoRABatch,
    *,
    shrink_config: ShrinkConfig | None = None,
    expand_config: ExpandConfig | None = None,
) -> None:
    """Add the compressed-LoRA term of every token with a cluster; y modified in place.

    Semantics:
        for each token t with c = token_clusters[t] >= 0, n = token_rows[t]:
            h[i] = sum_k x[t, k] * v[c, k, i]                       (i < k_rank)
            g[j] = sum_i sigma[c, n, j, i] * h[i]    (full)   or   g[j] = sigma[c, n, j] * h[j]   (diag)
            y[t, o] += sum_j u[c, o, j] * g[j]
    Args:
        y: [T, d_out] fp16/bf16/fp32, contiguous rows; modified in place.
        x: [T, d_in], same dtype as v/u, contiguous rows.
        v: [C, d_in, k] and u: [C, d_out, k] shared bases, contiguous.
        sigma: [C, n, k, k] (JD-Full) or [C, n, k] (JD-Diag), contiguous, any float dtype.
        batch: `CompressedLoRABatch` on x.device (token_rows < n).
    Accumulates in fp32; h/g are rounded to the bases' dtype only for the expand dot.
    """
    assert x.dim() == 2 and y.dim() == 2 and x.stride(1) == 1 and y.stride(1) == 1, "x/y must be [T, d] with contiguous rows"
    assert v.dim() == 3 and u.dim() == 3 and v.is_contiguous() and u.is_contiguous(), (tuple(v.shape), tuple(u.shape))
    num_c, d_in, rank = v.shape
    assert u.shape[0] == num_c and u.shape[2] == rank, f"u {tuple(u.shape)} does not match v {tuple(v.shape)}"
    assert sigma.is_contiguous() and sigma.dim() in (3, 4) and sigma.shape[0] == num_c, f"sigma {tuple(sigma.shape)}"
    assert sigma.shape[2:] == ((rank,) if sigma.dim() == 3 else (rank, rank)), f"sigma {tuple(sigma.shape)} for k={rank}"
    assert x.shape == (y.shape[0], d_in) and y.shape[1] == u.shape[1], (tuple(x.shape), tuple(y.shape), d_in)
    assert x.dtype == y.dtype == v.dtype == u.dtype and x.dtype in TOLERANCES, (x.dtype, y.dtype, v.dtype, u.dtype)
    tensors = (y, x, v, u, sigma, batch.token_clusters, batch.token_rows)
    assert all(t.device == x.device for t in tensors), f"tensors on {[str(t.device) for t in tensors]}"
    assert x.is_cuda or is_interpreted(_sgmv_shrink_kernel), "CPU tensors need TRITON_INTERPRET=1"
    assert batch.token_clusters.shape[0] == x.shape[0], f"{batch.token_clusters.shape[0]} ids for {x.shape[0]} tokens"
    _check_segments(batch.sorted_token_ids, batch.clusters, batch.counts, batch.offsets, x.device)
    if not batch.num_active_clusters:
        return
    seg = (batch.sorted_token_ids, batch.clusters, batch.counts, batch.offsets,
           (len(batch.counts_list), max(batch.counts_list, default=0)))
    h = torch.zeros(x.shape[0], rank, dtype=torch.float32, device=x.device)
    # V_c^T as a [k, d_in] matrix: element (c, r, k) at c*stride0 + k*stride1 + r.
    sgmv_shrink(h, x, v, (v.stride(0), v.stride(2), v.stride(1)), rank, *seg, None, shrink_config)
    u_strides = (u.stride(0), u.stride(1), u.stride(2))
    if sigma.dim() == 3:
        sgmv_expand(y, h, u, u_strides, rank, *seg, None, expand_config, sigma=sigma, rows=batch.token_rows)
        return
    g = torch.empty_like(h)  # rows of base-only tokens stay unwritten and are never read
    block_j = min(64, max(16, next_pow2(rank)))
    grid = (batch.num_lora_tokens, cdiv(rank, block_j))
    _sigma_full_kernel[grid](
        h, g, sigma, batch.token_clusters, batch.token_rows, batch.sorted_token_ids,
        rank, h.stride(0), g.stride(0), sigma.stride(0), sigma.stride(1), sigma.stride(2),
        BLOCK_J=block_j, BLOCK_R=64,
    )
    sgmv_expand(y, g, u, u_strides, rank, *seg, None, expand_config)
