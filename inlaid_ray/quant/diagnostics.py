"""Diagnostics of shared-base quantization (used by load_tests/quant_collapse.py and its tests):
a GPTQ checkpoint dequantized with the PyTorch reference, a Hessian's definiteness, and the
aggregates of the same per-task Hessians that the MLGPTQ methods and their variants build."""

from __future__ import annotations

from pathlib import Path

import torch

from inlaid_ray.kernels.reference import gptq_dequantize_ref
from inlaid_ray.quantized_base.checkpoint import load_gptq_checkpoint, split_layers
from inlaid_ray.quant.mlgptq import GROUP_OF, aggregate_hessians
from inlaid_ray.quant.stats_store import StatsStore


def dequantized(ckpt: Path, bits: int) -> dict[str, torch.Tensor]:
    """{HF prefix: dense weight} of a GPTQ checkpoint, dequantized by the PyTorch reference."""
    _, _, tensors = load_gptq_checkpoint(ckpt, "cpu")
    return {p: gptq_dequantize_ref(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], bits).float()
            for p, t in split_layers(tensors).items()}


def min_eig_over_mean_diag(h: torch.Tensor) -> tuple[float, int]:
    """(smallest eigenvalue / mean diagonal, number of negative eigenvalues) of a symmetric matrix."""
    ev = torch.linalg.eigvalsh(h.double())
    return float(ev.min() / h.diagonal().double().mean()), int((ev < 0).sum())


def aggregate_variants(store: StatsStore, tasks: list[str], layer: int, module: str) -> dict[str, torch.Tensor]:
    """The per-task Hessians of one module aggregated four ways: mix, element-wise max (as MLGPTQ,
    eigenvalue-clipped), that max shifted to PSD by its most negative eigenvalue, channel max."""
    parts = [store.task_layer(t, layer)[GROUP_OF[module]] for t in tasks]
    counts = [store.tasks[t].mix_weight for t in tasks]
    elementwise = aggregate_hessians("mlgptq", parts, counts)
    shift = -float(torch.linalg.eigvalsh(elementwise.double()).min()) * 1.01
    return {"mix": aggregate_hessians("gptq-mixed", parts, counts), "elementwise max (eig-clipped)": elementwise,
            "elementwise max shifted to PSD": elementwise + shift * torch.eye(len(elementwise)),
            "channel max": aggregate_hessians("mlgptq-channel", parts, counts)}


def shared_token_hessian(h_all: torch.Tensor, n_all: int, h_rest: torch.Tensor, n_rest: float) -> torch.Tensor:
    """H of the tokens a `sink_weight=0` collection left out (each sequence's first `sink_tokens`),
    from the same task's full Hessian (`n_all` tokens) and that collection's (`n_rest` weight):
    `(n_all H_all - n_rest H_rest) / (n_all - n_rest)`, computed in fp64."""
    if not 0 <= n_rest < n_all:
        raise ValueError(f"n_rest={n_rest} must be in [0, n_all={n_all})")
    out = (n_all * h_all.double() - n_rest * h_rest.double()) / (n_all - n_rest)
    return ((out + out.t()) / 2).float()


def shared_mean_max_aggregate(shared: list[torch.Tensor], rest: list[torch.Tensor], n_shared: list[float],
                              n_rest: list[float]) -> torch.Tensor:
    """The element-wise max over tasks applied only to the tokens that differ between tasks, the
    tokens every task shares (sink, system prompt) pooled: `f_s mix_t(H_shared) + f_r max_t(H_rest)`
    with f_s the pooled share of shared tokens. Equals every H_t when all tasks are identical."""
    total_shared, total = sum(n_shared), sum(n_shared) + sum(n_rest)
    pooled = sum(n * h.double() for n, h in zip(n_shared, shared)) / total_shared
    top = torch.stack([h.double() for h in rest]).amax(0)
    return (total_shared / total * pooled + (1 - total_shared / total) * top).float()
