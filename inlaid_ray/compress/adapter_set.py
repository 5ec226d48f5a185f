"""Compress a set of loaded LoRA adapters into cluster banks end to end (Compress then Serve,
docs/algorithms.md 9.2-9.8): fold each adapter's scaling into B, align the module sets, cluster and
compress jointly (`cluster_adapters`), and package the result as `ClusterBanks`.

Module sets: joint compression needs every adapter on the same (layer, module) set. Adapters
that adapt different modules (say q,v-only next to all-linear) are aligned by giving each a
rank-0 (exactly zero) update on the modules it does not adapt: the fit ignores it, its core
there is 0, so serving adds nothing there (`missing_modules="zero"`); "error" refuses the set.
Per-adapter errors are re-averaged over the modules each adapter really adapts, so padding
does not make an adapter look better fitted than it is.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from inlaid_ray.lora.adapter import LoRAAdapter
from inlaid_ray.lora.cluster_bank import AdapterEntry, ClusterBank, ClusterBanks
from inlaid_ray.compress.clustering import ClusterConfig, Clustering, cluster_adapters
from inlaid_ray.compress.jd import ModuleKey

MissingModules = Literal["zero", "error"]


@dataclass
class CompressedSet:
    """Cluster banks of a compressed adapter set, the clustering behind them and its wall time."""

    banks: ClusterBanks
    clustering: Clustering
    seconds: float
    own_modules: dict[str, list[ModuleKey]]  # adapter -> the modules it really adapts


def align_module_sets(
    adapters: Sequence[LoRAAdapter], missing_modules: MissingModules = "zero"
) -> list[dict[ModuleKey, tuple[Tensor, Tensor]]]:
    """Folded fp32 factors (A, s*B) per adapter over the union of modules (see module docstring)."""
    if not adapters:
        raise ValueError("no adapters to compress: the adapter list is empty")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be distinct, got {names}")
    shapes: dict[ModuleKey, tuple[int, int]] = {}
    for a in adapters:
        for key, f in a.weights.items():
            shape = (int(f.b.shape[0]), int(f.a.shape[1]))
            if shapes.setdefault(key, shape) != shape:
                raise ValueError(f"adapter {a.name!r} {key}: update shape (d_out, d_in) = {shape} differs from "
                                 f"{shapes[key]} of an earlier adapter")
    if not shapes:
        raise ValueError(f"adapters {names} have no weights")
    out = []
    for a in adapters:
        missing = sorted(set(shapes) - set(a.weights))
        if missing and missing_modules == "error":
            raise ValueError(f"adapter {a.name!r} does not adapt {len(missing)} module(s) the others do, e.g. "
                             f"{missing[:4]}; joint compression needs one module set (missing_modules='zero' pads)")
        factors = a.folded_factors()
        for key in missing:
            d_out, d_in = shapes[key]
            factors[key] = (torch.zeros(0, d_in), torch.zeros(d_out, 0))
        out.append(factors)
    return out


def compress_adapter_set(
    adapters: Sequence[LoRAAdapter],
    config: ClusterConfig,
    *,
    missing_modules: MissingModules = "zero",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> CompressedSet:
    """Cluster and jointly compress `adapters` (compute in dtype on device; banks stored in storage_dtype)."""
    factor_sets = align_module_sets(adapters, missing_modules)
    start = time.perf_counter()
    clustering = cluster_adapters(factor_sets, config, device=device, dtype=dtype, progress=progress)
    seconds = time.perf_counter() - start
    names = [a.name for a in adapters]
    raw_params = [sum(f.a.numel() + f.b.numel() for f in a.weights.values()) for a in adapters]
    banks = banks_from_clustering(clustering, names, raw_params, dtype=storage_dtype)
    own = {a.name: sorted(a.weights) for a in adapters}
    for name, entry in list(banks.adapters.items()):
        module_errors = [float(banks.clusters[entry.cluster].errors[key][entry.row]) for key in own[name]]
        banks.adapters[name] = dataclasses.replace(
            entry, error=sum(module_errors) / len(module_errors), max_module_error=max(module_errors))
    return CompressedSet(banks, clustering, seconds, own)


def banks_from_clustering(
    clustering: Clustering,
    names: Sequence[str],
    raw_params: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> ClusterBanks:
    """Package a clustering result (adapter i is names[i]) as cluster banks, optionally cast to dtype."""
    if len(names) != clustering.labels.numel() or len(set(names)) != len(names):
        raise ValueError(f"need {clustering.labels.numel()} distinct names, got {len(names)} ({len(set(names))} distinct)")
    if raw_params is not None and len(raw_params) != len(names):
        raise ValueError(f"raw_params has {len(raw_params)} entries for {len(names)} adapters")

    def cast(t: Tensor) -> Tensor:
        return (t if dtype is None else t.to(dtype)).contiguous()

    clusters, adapters, shapes = [], {}, {}
    for c, cl in enumerate(clustering.clusters):
        bank = ClusterBank(
            c, [names[i] for i in cl.members],
            {k: cast(m.U) for k, m in cl.modules.items()},
            {k: cast(m.V) for k, m in cl.modules.items()},
            {k: cast(m.sigma) for k, m in cl.modules.items()},
            {k: m.errors.float() for k, m in cl.modules.items()},
        )
        clusters.append(bank)
        per_module = torch.stack([m.errors for m in cl.modules.values()])  # [modules, n_c]
        for row, i in enumerate(cl.members):
            adapters[names[i]] = AdapterEntry(
                c, row, float(per_module[:, row].mean()), float(per_module[:, row].max()),
                int(raw_params[i]) if raw_params is not None else 0,
            )
        for k, m in cl.modules.items():
            shapes[k] = (m.U.shape[0], m.V.shape[0])
    jd = clustering.config.jd
    extra = {
        "jd": {"max_iters": jd.max_iters, "tol": jd.tol, "seed": jd.seed},
        "clustering": {
            "num_clusters": clustering.num_clusters, "error_budget": clustering.config.error_budget,
            "budget_stat": clustering.config.budget_stat, "rounds": clustering.rounds,
            "stable": clustering.stable, "budget_met": clustering.budget_met,
        },
    }
    return ClusterBanks(clusters, adapters, jd.kind, jd.rank, jd.transform, shapes, extra)
