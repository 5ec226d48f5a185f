"""Scale evidence for Compress then Serve on CPU (docs/algorithms.md 9.4-9.9): cluster and jointly compress
1000 synthetic rank-8 adapters on SmolLM2-135M shapes with a planted cluster structure.

Reports time, peak memory, per-adapter errors (and their ratio to the error on the planted bases),
recovery of the planted clusters (adjusted Rand index), bytes compressed vs raw, a bank save/load
round trip, onboarding of held-out adapters by projection, and two sweeps on a subset of layers:
error vs shared rank k (clusters fixed) and error vs number of clusters K (the "auto" search).
Writes load_tests/results/compression_scale.json and compression_scale.png.

    python load_tests/bench_compression.py            # full run (~10 min on 2 busy shared cores)
    python load_tests/bench_compression.py --quick    # smaller smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.lora.cluster_bank import (
    bank_size_report,
    load_cluster_banks,
    save_cluster_banks,
)
from inlaid_ray.compress.adapter_set import banks_from_clustering
from inlaid_ray.compress.clustering import (
    ClusterConfig,
    adjusted_rand_index,
    assign_new_adapter,
    cluster_adapters,
)
from inlaid_ray.compress.jd import JDConfig, fit_stacked, project_factors, stack_factors
from inlaid_ray.lora.synthetic import SMOLLM2_135M, SyntheticAdapters, SyntheticSpec, make_synthetic_adapters
from inlaid_ray.lora.synthetic import raw_lora_params
from inlaid_ray.model.config import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model_config() -> tuple[ModelConfig, str]:
    """SmolLM2's shape from the converted model's config.json when present, else the built-in copy."""
    try:
        from inlaid_ray.config import Settings
        from inlaid_ray.model.prepare import prepare_smollm2

        path = prepare_smollm2(Settings.from_env().cache_dir)
        return ModelConfig.from_dir(path), str(path / "config.json")
    except Exception as exc:  # no converted model here: the constant was checked against it in tests
        return SMOLLM2_135M, f"built-in SMOLLM2_135M ({type(exc).__name__})"


def _stats(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "p50": float(x.median()), "p99": float(torch.quantile(x, 0.99)),
            "max": float(x.max())}


def _planted_basis_errors(syn: SyntheticAdapters, idx: list[int]) -> torch.Tensor:
    """Per-adapter error (mean over modules) on its own planted basis (rank s): the error the noise
    alone causes there. Not a lower bound: a fitted basis may absorb some of the noise."""
    err = torch.zeros(len(idx), dtype=torch.float64)
    labels = syn.labels[idx]
    for key, pairs in syn.bases.items():
        for c, (U, V) in enumerate(pairs):
            rows = (labels == c).nonzero().flatten().tolist()
            if rows:
                _, e = project_factors([syn.adapters[idx[r]][key] for r in rows], U, V, "full")
                err[rows] += e
    return err / len(syn.bases)


def _subset(syn: SyntheticAdapters, layers: tuple[int, ...], count: int) -> list[dict]:
    return [{k: v for k, v in ad.items() if k[0] in layers} for ad in syn.adapters[:count]]


def _refit(adapters: list[dict], groups: list[list[int]], jd: JDConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Fit every cluster of a fixed assignment at another rank/kind; per-adapter error stats."""
    n = len(adapters)
    err = torch.zeros(n, dtype=torch.float64)
    core = shared = 0
    t0 = time.perf_counter()
    for members in groups:
        for key in adapters[0]:
            st = stack_factors([adapters[i][key] for i in members], jd.transform == "normalize", "cpu", dtype)
            k = min(jd.rank, st.stacked_rank)
            mod = fit_stacked(st, JDConfig(k, jd.kind, jd.transform, jd.max_iters, jd.tol, jd.seed))
            err[members] += mod.errors / len(adapters[0])
            core += mod.sigma.numel()
            shared += mod.U.numel() + mod.V.numel()
    raw = sum(raw_lora_params(a) for a in adapters)
    return {"rank": jd.rank, "kind": jd.kind, "mean_error": float(err.mean()), "max_error": float(err.max()),
            "params_per_adapter": (core + shared) / n, "raw_params_per_adapter": raw / n,
            "compression_ratio": raw / (core + shared), "fit_s": time.perf_counter() - t0}


def _plot(path: Path, rank_rows: list[dict], k_rows: list[dict], planted: int, planted_err: float, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, marker in (("full", "o"), ("diag", "s")):
        rows = [r for r in rank_rows if r["kind"] == kind]
        if rows:
            ks = [r["rank"] for r in rows]
            ax1.plot(ks, [r["mean_error"] for r in rows], marker=marker, label=f"JD-{kind} mean")
            ax1.plot(ks, [r["max_error"] for r in rows], marker=marker, ls="--", label=f"JD-{kind} max")
    ax1.axhline(planted_err, color="gray", ls=":", label="planted bases (reference)")
    ax1.set(xscale="log", yscale="log", xlabel="shared rank k", ylabel="relative squared error",
            title=f"error vs rank (K = {planted} clusters fixed)")
    ax1.legend(fontsize=8)
    Ks = [r["num_clusters"] for r in k_rows]
    ax2.plot(Ks, [r["mean_error"] for r in k_rows], "o-", label="mean")
    ax2.plot(Ks, [r["max_error"] for r in k_rows], "s--", label="max")
    ax2.axhline(budget, color="red", ls=":", label=f"budget {budget:g}")
    ax2.axvline(planted, color="gray", ls=":", label=f"planted C = {planted}")
    ax2.set(xscale="log", yscale="log", xlabel="clusters K", ylabel="relative squared error",
            title="error vs K (auto search, k fixed)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-adapters", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=20, help="planted clusters C (main run uses K = C)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--cluster-rank", type=int, default=16, help="dimension s of each planted subspace")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=16, help="shared rank k of the main run")
    ap.add_argument("--kind", choices=["full", "diag"], default="full")
    ap.add_argument("--modules", default="q_proj,v_proj")
    ap.add_argument("--layers", default="all", help="'all' or comma list, main run")
    ap.add_argument("--sweep-layers", default="0,29")
    ap.add_argument("--budget", type=float, default=0.05, help="max per-adapter error for the auto-K search")
    ap.add_argument("--held-out", type=int, default=20, help="extra adapters onboarded by projection")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 because small LAPACK calls stall on 2 busy shared cores")
    ap.add_argument("--quick", action="store_true", help="200 adapters, 10 clusters, 4 layers")
    ap.add_argument("--out", type=Path, default=RESULTS / "compression_scale.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_adapters, args.clusters, args.layers, args.sweep_layers = 200, 10, "0,10,20,29", "0,29"
        if args.out == RESULTS / "compression_scale.json":
            args.out = RESULTS / "compression_scale_quick.json"
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    mc, mc_source = _model_config()
    layers = tuple(range(mc.num_layers)) if args.layers == "all" else tuple(int(x) for x in args.layers.split(","))
    sweep_layers = tuple(int(x) for x in args.sweep_layers.split(","))
    modules = tuple(args.modules.split(","))
    n, C = args.num_adapters, args.clusters
    out: dict[str, Any] = {"benchmark": "compression_scale", "device": "cpu", "threads": args.threads,
                           "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                           "dtype": str(dtype), "model_config": mc_source,
                           "model_shape": {"hidden": mc.hidden_size, "intermediate": mc.intermediate_size,
                                           "layers": mc.num_layers, "heads": mc.num_heads, "kv_heads": mc.num_kv_heads,
                                           "head_dim": mc.head_dim}}
    rss0 = _rss_mb()

    # 1. Adapters: n for compression plus held-out ones drawn from the same planted clusters.
    t0 = time.perf_counter()
    spec = SyntheticSpec(num_adapters=n + args.held_out, num_clusters=C, lora_rank=args.lora_rank,
                         cluster_rank=args.cluster_rank, noise=args.noise, layers=layers, modules=modules, seed=0)
    syn = make_synthetic_adapters(spec, mc, dtype=dtype)
    gen_s = time.perf_counter() - t0
    adapters = syn.adapters[:n]
    raw = [raw_lora_params(a) for a in adapters]
    out["adapters"] = {"num_adapters": n, "held_out": args.held_out, "lora_rank": args.lora_rank,
                       "planted_clusters": C, "cluster_rank": args.cluster_rank, "noise": args.noise,
                       "norm_spread": spec.norm_spread, "modules": list(modules), "layers": list(layers),
                       "num_modules": len(layers) * len(modules), "raw_params_per_adapter": raw[0],
                       "raw_fp32_mb_total": sum(raw) * 4 / 2**20, "generate_s": gen_s}
    out["layer_choice"] = (
        f"main run on {len(layers)} layers x {modules} = {len(layers) * len(modules)} modules "
        f"(all layers: measured fast enough, see main.cluster_s); sweeps (each a full refit or "
        f"re-clustering) on layers {list(sweep_layers)} to keep the whole run under ~10 minutes"
    )
    print(f"generated {n}+{args.held_out} adapters x {len(layers) * len(modules)} modules in {gen_s:.1f}s")

    # 2. Main run: K = C clusters, JD at rank k, all chosen layers.
    jd = JDConfig(rank=args.rank, kind=args.kind)
    cfg = ClusterConfig(jd=jd, num_clusters=C, error_budget=args.budget)
    peak_before = _peak_rss_mb()
    t0 = time.perf_counter()
    res = cluster_adapters(adapters, cfg, dtype=dtype, progress=True)
    cluster_s = time.perf_counter() - t0
    planted_err = _planted_basis_errors(syn, list(range(n)))
    ari = adjusted_rand_index(res.labels, syn.labels[:n])
    out["main"] = {
        "kind": jd.kind, "rank": jd.rank, "transform": jd.transform, "num_clusters": C,
        "cluster_s": cluster_s, "adapter_modules_per_s": n * len(layers) * len(modules) / cluster_s,
        "peak_rss_mb": _peak_rss_mb(), "peak_rss_increase_mb": max(0.0, _peak_rss_mb() - peak_before),
        "rss_before_generation_mb": rss0,
        "errors": _stats(res.errors), "planted_basis_errors": _stats(planted_err),
        "error_ratio_to_planted_basis": float(res.errors.mean() / planted_err.mean()),
        "max_error_ratio_to_planted_basis": float(res.errors.max() / planted_err.max()),
        "adjusted_rand_index": ari, "clusters_recovered": ari == 1.0,
        "rounds": res.rounds, "stable": res.stable, "history": res.history,
        "cluster_sizes": sorted(len(c.members) for c in res.clusters),
    }
    print(f"clustered in {cluster_s:.1f}s: ARI {ari:.4f}, mean error {float(res.errors.mean()):.4f} "
          f"({out['main']['error_ratio_to_planted_basis']:.3f}x planted-basis error), max {float(res.errors.max()):.4f}")

    # 3. Bank: bytes, save/load round trip.
    banks = banks_from_clustering(res, syn.names[:n], raw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save_cluster_banks(banks, Path(tmp) / "bank")
        save_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in path.iterdir())
        t0 = time.perf_counter()
        loaded = load_cluster_banks(path, model_config=mc)
        load_s = time.perf_counter() - t0
    exact = all(
        torch.equal(getattr(a, part)[k], getattr(b, part)[k])
        for a, b in zip(banks.clusters, loaded.clusters) for part in ("U", "V", "sigma") for k in a.U
    )
    size = bank_size_report(banks, raw_element_bytes=4)
    out["bank"] = {**size, "on_disk_bytes": disk, "save_s": save_s, "load_s": load_s, "round_trip_bit_exact": exact,
                   "raw_over_compressed": size["raw_bytes"] / size["compressed_bytes"]}
    print(f"bank: {size['compressed_bytes'] / 2**20:.1f} MiB vs raw {size['raw_bytes'] / 2**20:.1f} MiB "
          f"({out['bank']['raw_over_compressed']:.1f}x smaller), round trip exact: {exact}")

    # 4. Onboarding: project held-out adapters, check they land with their planted mates.
    correct, errs, flags = 0, [], 0
    for j in range(n, n + args.held_out):
        got = assign_new_adapter(res, syn.adapters[j])
        mates = set((syn.labels[:n] == syn.labels[j]).nonzero().flatten().tolist())
        correct += len(mates & set(res.clusters[got.cluster].members)) > len(mates) // 2
        errs.append(got.error)
        flags += got.needs_recompress
    out["onboarding"] = {"num_new": args.held_out, "joined_planted_mates": correct / max(args.held_out, 1),
                         "mean_error": sum(errs) / max(len(errs), 1), "needs_recompress": flags}
    print(f"onboarding: {correct}/{args.held_out} joined their planted cluster")
    del banks, loaded

    # 5. Sweeps on a subset of layers.
    sub = _subset(syn, sweep_layers, n)
    groups = [c.members for c in res.clusters]
    rank_rows = []
    for kind, ranks in (("full", (2, 4, 8, 16, 24, 32, 48)), ("diag", (16, 32, 64, 128))):
        for k in ranks:
            row = _refit(sub, groups, JDConfig(rank=k, kind=kind, max_iters=100 if kind == "full" else 30), dtype)
            rank_rows.append(row)
            print(f"  rank sweep {kind} k={k}: mean {row['mean_error']:.4f} max {row['max_error']:.4f} "
                  f"({row['compression_ratio']:.1f}x smaller, {row['fit_s']:.1f}s)")
    auto_cfg = ClusterConfig(jd=jd, num_clusters="auto", error_budget=args.budget, max_clusters=2 * C)
    t0 = time.perf_counter()
    auto = cluster_adapters(sub, auto_cfg, dtype=dtype, progress=True)
    auto_s = time.perf_counter() - t0
    planted_sub = _planted_basis_errors(
        SyntheticAdapters(syn.names, sub, syn.labels, spec, {k: v for k, v in syn.bases.items() if k[0] in sweep_layers}),
        list(range(n)),
    )
    out["sweep_layers"] = list(sweep_layers)
    out["sweep_rank"] = rank_rows
    out["sweep_k"] = {"budget": args.budget, "budget_stat": auto_cfg.budget_stat, "chosen_k": auto.num_clusters,
                      "budget_met": auto.budget_met, "ari_vs_planted": adjusted_rand_index(auto.labels, syn.labels[:n]),
                      "search_s": auto_s, "tried": auto.search, "planted_basis_mean_error": float(planted_sub.mean())}
    print(f"auto K: chose {auto.num_clusters} (planted {C}) in {auto_s:.1f}s; tried {[r['num_clusters'] for r in auto.search]}")

    out["summary_ratios"] = {
        "mean_error_over_planted_basis": out["main"]["error_ratio_to_planted_basis"],
        "raw_bytes_over_compressed": out["bank"]["raw_over_compressed"],
        "adjusted_rand_index": ari,
        "auto_k_over_planted": auto.num_clusters / C,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    _plot(args.out.with_suffix(".png"), rank_rows, auto.search, C, float(planted_sub.mean()), args.budget)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main()
