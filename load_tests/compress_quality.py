"""Evidence 6a (Compress then Serve on real adapters): the 4 demo LoRA adapters compressed jointly
into one cluster at a few shared ranks R, and each compressed on its own at full rank (lossless
reference for the serving path), then served by the engine straight from the cluster bank
(`build_engine(compressed=...)`) and scored with each task's own metric on its eval split,
against the raw adapters and the base model run through the same engine.

All requests of a configuration go through the engine in ONE mixed batch (every task plus, for
the raw run, base-only requests), greedy, fp32, CPU. Reported per configuration and task: the
primary metric, normalized performance (score - base) / (raw - base) (docs/algorithms.md 9.11),
agreement (% of predictions identical to the raw adapter's), the adapter's relative squared
reconstruction error (mean over the modules it adapts) and the bank's size.

    python load_tests/compress_quality.py --limit 10   # 13.5 min measured on 2 busy shared CPU cores
writes load_tests/results/compress_quality.{json,png,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.config import Settings
from inlaid_ray.demo.data import load_examples
from inlaid_ray.demo.paths import demo_adapter_dir
from inlaid_ray.demo.tasks import DEMO_TASKS, get_task
from inlaid_ray.engine import EngineConfig, SamplingParams, blocks_for
from inlaid_ray.engine.builder import build_engine
from inlaid_ray.lora.cluster_bank import bank_size_report, save_cluster_banks
from inlaid_ray.compress.clustering import ClusterConfig
from inlaid_ray.compress.jd import JDConfig
from inlaid_ray.compress.adapter_set import compress_adapter_set
from inlaid_ray.lora.peft_io import load_peft_adapter
from inlaid_ray.model import ModelConfig, encode_chat, load_tokenizer
from inlaid_ray.model.prepare import prepare_smollm2

RESULTS = Path(__file__).resolve().parent / "results"


def _requests(tokenizer: Any, tasks: list[str], limit: int, with_base: bool) -> list[dict[str, Any]]:
    """One entry per (task or base, example): prompt ids, its task name for the engine, reference."""
    out = []
    for name in tasks:
        task = get_task(name)
        for i, rec in enumerate(load_examples(name, "eval")[:limit]):
            ids = encode_chat(tokenizer, rec["messages"][:1])
            for served in ([name, None] if with_base else [name]):
                out.append({"task": name, "served": served, "example": i, "ids": ids,
                            "max_tokens": task.max_new_tokens, "reference": rec["completion"]})
    return out


def _run(engine: Any, tokenizer: Any, reqs: list[dict[str, Any]]) -> tuple[list[str], float]:
    """Greedy completions of every request in one engine.generate call (one mixed batch)."""
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0) for r in reqs]
    start = time.perf_counter()
    outs = engine.generate([r["ids"] for r in reqs], params, tasks=[r["served"] for r in reqs])
    seconds = time.perf_counter() - start
    return [tokenizer.decode(list(o.token_ids), skip_special_tokens=True).strip() for o in outs], seconds


def _engine_config(reqs: list[dict[str, Any]], max_seqs: int) -> EngineConfig:
    max_len = max(len(r["ids"]) + r["max_tokens"] for r in reqs) + 1
    seqs = min(max_seqs, len(reqs))
    return EngineConfig(block_size=16, num_kv_blocks=seqs * blocks_for(max_len, 16) + 8, max_num_seqs=seqs,
                        max_model_len=max_len, max_num_batched_tokens=max(4096, max_len))


def _score(reqs: list[dict[str, Any]], preds: list[str], served_base: bool) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["task"] for r in reqs):
        task = get_task(name)
        rows = [(r, p) for r, p in zip(reqs, preds) if r["task"] == name and (r["served"] is None) == served_base]
        scores = [task.score(p, r["reference"]) for r, p in rows]
        out[name] = {"metric": task.primary_metric, "n": len(rows),
                     "score": statistics.fmean(s[task.primary_metric] for s in scores),
                     "predictions": [p for _, p in rows]}
    return out


def _configs(ranks: list[int], kind: str, max_rank: int) -> list[tuple[str, ClusterConfig]]:
    """(label, clustering) per compressed configuration: each adapter alone at full rank, then joint."""
    configs = [("individual", ClusterConfig(jd=JDConfig(rank=max_rank, kind=kind), num_clusters=4))]
    for r in sorted(ranks, reverse=True):
        configs.append((f"joint R={r}", ClusterConfig(jd=JDConfig(rank=r, kind=kind), num_clusters=1)))
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=10, help="eval examples per task")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32], help="shared ranks of the joint cluster")
    p.add_argument("--kind", default="full", choices=["full", "diag"])
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared CPUs)")
    p.add_argument("--max-seqs", type=int, default=48, help="engine max_num_seqs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS / "compress_quality"), help="output path without extension")
    p.add_argument("--replot", action="store_true", help="only redraw the .md/.png from the existing .json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        _write_views(json.loads(out.with_suffix(".json").read_text()), out)
        return 0
    torch.set_num_threads(args.threads)
    base = prepare_smollm2(Settings.from_env().cache_dir)
    config = ModelConfig.from_dir(base)
    tokenizer = load_tokenizer(base)
    dirs = {t: demo_adapter_dir(t) for t in args.tasks}
    adapters = [load_peft_adapter(d, config, name=t) for t, d in dirs.items()]
    max_rank = max(a.max_rank for a in adapters)

    summary: dict[str, Any] = {
        "base_model": "SmolLM2-135M-Instruct", "split": "eval", "limit": args.limit, "kind": args.kind,
        "decoding": "greedy, fp32, inlaid-ray engine (one mixed batch per configuration)",
        "device": args.device, "threads": args.threads, "configs": {},
    }
    reqs = _requests(tokenizer, args.tasks, args.limit, with_base=True)
    engine = build_engine(base, dirs, dtype="float32", device=args.device, engine_config=_engine_config(reqs, args.max_seqs))
    preds, seconds = _run(engine, tokenizer, reqs)
    raw = _score(reqs, preds, served_base=False)
    summary["base"] = _score(reqs, preds, served_base=True)
    raw_params = {a.name: sum(f.a.numel() + f.b.numel() for f in a.weights.values()) for a in adapters}
    summary["configs"]["raw"] = {"tasks": raw, "generate_seconds": seconds, "num_clusters": 0, "rank": None,
                                 "errors": {t: 0.0 for t in args.tasks},
                                 "bytes": 4 * sum(raw_params.values()), "raw_params": raw_params}
    del engine

    reqs = _requests(tokenizer, args.tasks, args.limit, with_base=False)
    configs = _configs(args.ranks, args.kind, max_rank)
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in Progress(configs, desc="configurations"):
            cset = compress_adapter_set(adapters, cfg, progress=False)
            bank_dir = save_cluster_banks(cset.banks, Path(tmp) / label.replace(" ", "_").replace("=", ""))
            engine = build_engine(base, None, compressed=bank_dir, dtype="float32", device=args.device,
                                  engine_config=_engine_config(reqs, args.max_seqs))
            preds, seconds = _run(engine, tokenizer, reqs)
            del engine
            size = bank_size_report(cset.banks)
            summary["configs"][label] = {
                "tasks": _score(reqs, preds, served_base=False), "generate_seconds": seconds,
                "compress_seconds": cset.seconds, "num_clusters": len(cset.banks.clusters), "rank": cfg.jd.rank,
                "errors": {n: e.error for n, e in cset.banks.adapters.items()},
                "max_module_errors": {n: e.max_module_error for n, e in cset.banks.adapters.items()},
                "bytes": size["compressed_bytes"], "core_bytes": size["core_bytes"],
            }
    _derive(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    _write_views(summary, out)
    return 0


def _write_views(summary: dict[str, Any], out: Path) -> None:
    table = markdown_table(summary)
    out.with_suffix(".md").write_text(table + "\n")
    plot(summary, out.with_suffix(".png"))
    print(table)


def _derive(summary: dict[str, Any]) -> None:
    """Normalized performance and agreement with the raw adapter's predictions, per config and task."""
    raw, base = summary["configs"]["raw"]["tasks"], summary["base"]
    for entry in summary["configs"].values():
        for name, t in entry["tasks"].items():
            gap = raw[name]["score"] - base[name]["score"]
            t["normalized"] = (t["score"] - base[name]["score"]) / gap if abs(gap) > 1e-12 else None
            same = [a == b for a, b in zip(t["predictions"], raw[name]["predictions"])]
            t["agreement"] = sum(same) / len(same)


def markdown_table(summary: dict[str, Any]) -> str:
    tasks = list(summary["base"])
    head = " | ".join(f"{t} ({summary['base'][t]['metric']})" for t in tasks)
    rows = [
        f"Demo adapters compressed (JD-{summary['kind']}) and served by the engine; eval split, first "
        f"{summary['limit']} examples per task; cells: score (normalized, agreement with raw); "
        f"err = relative squared reconstruction error, mean over adapters.",
        "",
        f"| config | clusters | {head} | mean err | bank MiB |",
        "|---|---|" + "---|" * len(tasks) + "---|---|",
        "| base | - | " + " | ".join(f"{summary['base'][t]['score']:.3f}" for t in tasks) + " | - | - |",
    ]
    for label, e in summary["configs"].items():
        cells = []
        for t in tasks:
            x = e["tasks"][t]
            norm = "-" if x["normalized"] is None else f"{x['normalized']:.3f}"
            cells.append(f"{x['score']:.3f} ({norm}, {100 * x['agreement']:.0f}%)")
        err = statistics.fmean(e["errors"].values())
        rows.append(f"| {label} | {e['num_clusters'] or '-'} | " + " | ".join(cells)
                    + f" | {err:.2e} | {e['bytes'] / 2**20:.1f} |")
    return "\n".join(rows)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Left: primary metric per task and configuration (base as a line). Right: error vs R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["base"])
    labels = list(summary["configs"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        vals = [summary["configs"][label]["tasks"][t]["score"] for t in tasks]
        ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(tasks))], vals, width, label=label)
    for i, t in enumerate(tasks):
        ax.hlines(summary["base"][t]["score"], i - 0.4, i + 0.4, colors="k", linestyles="dashed",
                  label="base" if i == 0 else None)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({summary['base'][t]['metric']})" for t in tasks])
    ax.set(ylim=(0, 1.3), ylabel=f"score, first {summary['limit']} eval examples",
           title="Task metric: raw vs compressed adapters (engine, greedy)")
    ax.legend(fontsize=7, ncol=len(labels) + 1, loc="upper center")
    joint = [(e["rank"], e) for k, e in summary["configs"].items() if k.startswith("joint")]
    joint.sort(key=lambda x: x[0])
    for t in tasks:
        ax2.plot([r for r, _ in joint], [max(e["errors"][t], 1e-12) for _, e in joint], "o-", label=t)
    ax2.set(xscale="log", yscale="log", xlabel="shared rank R (one cluster of all adapters)",
            ylabel="relative squared error", title="Reconstruction error")
    ax2.set_xticks([r for r, _ in joint], [str(r) for r, _ in joint])
    ax2.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
