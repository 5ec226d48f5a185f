"""`inlaid-ray compress`: cluster and jointly compress PEFT adapters into a cluster bank
(Compress then Serve, docs/algorithms.md 9; library code in `inlaid_ray.compress.adapter_set`), then
print the bytes raw vs compressed and each adapter's reconstruction error.

Wiring (in inlaid_ray/cli.py `build_parser`): `add_compress_parser(sub)`; it sets
`func(args, settings) -> int` like the other sub-commands. Serve the result with
`build_engine(..., compressed=OUT)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.config import Settings
from inlaid_ray.devices import DTYPES, parse_dtype, resolve_device
from inlaid_ray.errors import AdapterError



def _clusters_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"--clusters must be 'auto' or an integer >= 1, got {value!r}")
    return k


def add_compress_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`inlaid-ray compress --adapters [NAME=]DIR ... --rank R --clusters auto|K --out DIR`."""
    p = subparsers.add_parser(
        "compress", help="cluster and jointly compress LoRA adapters into a servable cluster bank",
        description="Joint-diagonalization compression (shared bases U, V per cluster and module, a small "
                    "core per adapter) with clustering; K given or 'auto' = the fewest clusters whose adapters "
                    "all meet --error-budget. Writes a cluster bank directory (safetensors + index.json).")
    p.add_argument("--adapters", nargs="+", required=True, metavar="[NAME=]DIR",
                   help="PEFT adapter directories (name: NAME, else the directory name)")
    p.add_argument("--rank", type=int, required=True, help="shared rank R of every cluster's bases")
    p.add_argument("--clusters", type=_clusters_arg, default="auto", help="number of clusters K, or 'auto'")
    p.add_argument("--out", required=True, help="cluster bank directory to write")
    p.add_argument("--base", help="base model directory the adapters belong to (default: the converted SmolLM2)")
    p.add_argument("--kind", default="full", choices=["full", "diag"], help="per-adapter core: R x R or diagonal")
    p.add_argument("--transform", default="normalize", choices=["normalize", "none"],
                   help="normalize: weigh adapters equally in the joint fit")
    p.add_argument("--error-budget", type=float, default=0.2,
                   help="with --clusters auto: per-adapter relative squared error to meet")
    p.add_argument("--budget-stat", default="max", choices=["max", "mean"], help="statistic held to the budget")
    p.add_argument("--max-clusters", type=int, default=64, help="upper end of the --clusters auto search")
    p.add_argument("--max-iters", type=int, default=100, help="JD iterations per fit")
    p.add_argument("--missing-modules", default="zero", choices=["zero", "error"],
                   help="adapters with different target modules: zero update where missing, or refuse")
    p.add_argument("--device", default="auto", help="compute device: auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="storage dtype of the bank")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on shared CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="also write the size and error report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_compress)
    return p


def _parse_adapters(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        path_ = Path(path if sep else spec)
        name = name if sep else path_.resolve().name
        if name in out:
            raise SystemExit(f"adapter name {name!r} given twice ({out[name]} and {path_}); use NAME=DIR")
        out[name] = path_
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _dir_bytes(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def run_compress(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.lora.cluster_bank import save_cluster_banks
    from inlaid_ray.compress.clustering import ClusterConfig
    from inlaid_ray.compress.jd import JDConfig
    from inlaid_ray.compress.adapter_set import compress_adapter_set
    from inlaid_ray.lora.peft_io import load_peft_adapter
    from inlaid_ray.model.config import ModelConfig
    from inlaid_ray.model.prepare import prepare_smollm2

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    paths = _parse_adapters(args.adapters)
    base = Path(args.base) if args.base else prepare_smollm2(settings.cache_dir)
    device = str(resolve_device(args.device))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = ModelConfig.from_dir(base)
        adapters = [load_peft_adapter(p, config, name=n) for n, p in Progress(paths.items(), desc="load adapters")]
        try:
            cfg = ClusterConfig(
                jd=JDConfig(rank=args.rank, kind=args.kind, transform=args.transform, max_iters=args.max_iters,
                            seed=args.seed),
                num_clusters=args.clusters, error_budget=args.error_budget, budget_stat=args.budget_stat,
                max_clusters=args.max_clusters, seed=args.seed,
            )
            cset = compress_adapter_set(adapters, cfg, missing_modules=args.missing_modules, device=device,
                                        storage_dtype=parse_dtype(args.dtype))
        except AdapterError:
            raise
        except ValueError as exc:  # bad rank / cluster count / module sets: a user error, one line
            raise AdapterError(f"cannot compress {list(paths)}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)
    save_cluster_banks(cset.banks, out, overwrite=args.overwrite)
    report = _report(cset, paths, out, args)
    _print_report(report)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _report(cset: Any, paths: dict[str, Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from inlaid_ray.lora.cluster_bank import bank_size_report

    banks = cset.banks
    size = bank_size_report(banks)  # raw counted at the bank's element size: equal-precision ratio
    clustering = cset.clustering
    return {
        "out": str(out),
        "rank": args.rank, "kind": args.kind, "transform": args.transform,
        "num_clusters": len(banks.clusters), "budget_met": clustering.budget_met,
        "error_budget": args.error_budget if args.clusters == "auto" else None,
        "seconds": cset.seconds,
        "size": size,
        "raw_file_bytes": sum(_dir_bytes(p, "*.safetensors") for p in paths.values()),
        "bank_file_bytes": _dir_bytes(out, "*"),
        "adapters": {
            name: {"cluster": e.cluster, "row": e.row, "error": e.error, "max_module_error": e.max_module_error,
                   "raw_params": e.raw_params, "modules": len(cset.own_modules[name])}
            for name, e in banks.adapters.items()
        },
        "search": clustering.search,
    }


def _print_report(r: dict[str, Any]) -> None:
    s = r["size"]
    print(f"compressed {s['num_adapters']} adapters into {r['num_clusters']} cluster(s), rank {r['rank']} "
          f"{r['kind']}, in {r['seconds']:.1f} s -> {r['out']}")
    print(f"raw:        {s['raw_params']:,} params = {s['raw_bytes']:,} bytes ({_mib(s['raw_bytes'])}) at the bank's "
          f"precision; adapter files {r['raw_file_bytes']:,} bytes")
    print(f"compressed: {s['compressed_params']:,} params = {s['compressed_bytes']:,} bytes "
          f"({_mib(s['compressed_bytes'])}; shared bases {_mib(s['shared_basis_bytes'])}, cores "
          f"{_mib(s['core_bytes'])}); bank files {r['bank_file_bytes']:,} bytes; ratio {s['compression_ratio']:.2f}x")
    if r["error_budget"] is not None and not r["budget_met"]:
        print(f"warning: error budget {r['error_budget']} not met with {r['num_clusters']} clusters")
    print("relative squared reconstruction error per adapter (mean / max over the modules it adapts):")
    width = max(len(n) for n in r["adapters"])
    for name, a in sorted(r["adapters"].items()):
        print(f"  {name:<{width}}  cluster {a['cluster']:>3} row {a['row']:>3}  error {a['error']:.3e}  "
              f"max {a['max_module_error']:.3e}  ({a['modules']} modules, {a['raw_params']:,} params)")
