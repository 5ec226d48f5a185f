"""Onboarding cost with incremental vs full re-quantization (the LoRA-Inlaid Table 4 analogue,
measured through the onboarding job itself) on the real SmolLM2 with the demo adapters.

Two passes onboard the demo tasks one after another with `onboard_task` (in-process, no Ray, no
service to probe; an embedded registry):
  incremental: the statistics store keeps every earlier task, so onboarding task k computes only
               task k's Hessians, then re-quantizes the base from the stored statistics;
  full:        the statistics store is emptied before each onboarding, so the job recomputes the
               Hessians of all k live tasks (from their recorded calibration data) before the
               same re-quantization - what onboarding costs without stored statistics.
For k = 2..N: CPU and wall time per job step, peak resident memory of the statistics and
quantization phases, the ratios incremental/full, and whether both passes produced the very same
base checkpoint (they must: the stored per-task statistics make incremental exact). CPU seconds (one torch
thread, process time) are the comparison that holds on a shared machine; wall seconds move with
whatever else runs there.
Writes load_tests/results/onboarding_incremental.json and .png.

    python load_tests/onboarding_incremental.py               # 4 demo tasks, ~20 min on 2 busy cores
    python load_tests/onboarding_incremental.py --tasks sentiment extract --tokens 128   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.config import Settings
from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir, demo_data_path
from inlaid_ray.jobs.onboard import onboard_task
from inlaid_ray.jobs.onboard_args import OnboardOptions
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.quant.incremental import checkpoints_identical
from inlaid_ray.registry import TaskRegistry, connect_redis

RESULTS = Path(__file__).resolve().parent / "results"


def _phases(report: dict[str, Any]) -> dict[str, Any]:
    """Seconds and peak RSS of the statistics and quantization phases of one job report."""
    stats = report["statistics"].get("resources", {}).get("total", {})
    quant = (report["quantization"].get("resources") or {}).get("total", {})
    return {
        "job_seconds": sum(report["steps"].values()),
        "job_cpu_seconds": sum(report["steps_cpu"].values()),
        "steps": report["steps"],
        "steps_cpu": report["steps_cpu"],
        "statistics_cpu_seconds": report["steps_cpu"].get("statistics", 0.0),
        "quantize_cpu_seconds": report["steps_cpu"].get("quantize", 0.0),
        "statistics_seconds": report["steps"].get("statistics", 0.0),
        "forward_hessian_seconds": report["statistics"].get("resources", {}).get("phases", {})
        .get("forward_hessian", {}).get("seconds", 0.0),
        "quantize_seconds": report["steps"].get("quantize", 0.0),
        "statistics_peak_rss_mb": stats.get("peak_rss_mb"),
        "statistics_rss_growth_mb": stats.get("rss_growth_mb"),
        "quantize_peak_rss_mb": quant.get("peak_rss_mb"),
        "quantize_rss_growth_mb": quant.get("rss_growth_mb"),
        "peak_rss_mb": max(v for v in (stats.get("peak_rss_mb"), quant.get("peak_rss_mb"), 0.0) if v is not None),
        "computed_tasks": report["statistics"].get("computed"),
        "requantized": report["decision"].get("requantize"),
        "changed_groups": report["decision"].get("num_changed"),
    }


def run_pass(mode: str, tasks: list[str], base: Path, work: Path, redis_dir: Path, tokens: int,
             ns: str, method: str) -> list[dict[str, Any]]:
    opts = OnboardOptions(base_dir=str(base), artifact_dir=str(work / mode), data_dir=str(redis_dir), namespace=ns,
                          endpoint=None, use_ray=False, tokens_per_task=tokens, progress=False, requantize="auto",
                          quant_method=method)
    settings = Settings(cache_dir=work / "cache")
    rows = []
    for k, task in enumerate(tasks, start=1):
        if mode == "full":
            shutil.rmtree(work / mode / "stats", ignore_errors=True)
        start = time.perf_counter()
        report = onboard_task(task, "demo", demo_adapter_dir(task), demo_data_path(task, "calib"), opts,
                              settings=settings).to_dict()
        row = {"num_tasks": k, "new_task": task, "wall_seconds": time.perf_counter() - start, **_phases(report),
               "base": report["artifacts"].get("base")}
        print(f"[{mode}] k={k} {task}: {row['job_cpu_seconds']:.1f} CPU s / {row['wall_seconds']:.1f} s wall "
              f"(statistics {row['statistics_cpu_seconds']:.1f} CPU s for {row['computed_tasks']}, quantize "
              f"{row['quantize_cpu_seconds']:.1f} CPU s), peak RSS {row['peak_rss_mb']:.0f} MiB", flush=True)
        rows.append(row)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["num_tasks"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for i, mode in enumerate(("incremental", "full")):
        xs = [k + (i - 0.5) * width for k in ks]
        stats = [r[mode]["statistics_cpu_seconds"] for r in rows]
        quant = [r[mode]["quantize_cpu_seconds"] for r in rows]
        other = [r[mode]["job_cpu_seconds"] - s - q for r, s, q in zip(rows, stats, quant)]
        ax_t.bar(xs, stats, width, label=f"{mode}: statistics", color="C0" if i == 0 else "C1")
        ax_t.bar(xs, quant, width, bottom=stats, label=f"{mode}: GPTQ", color="C0" if i == 0 else "C1", alpha=0.5)
        ax_t.bar(xs, other, width, bottom=[s + q for s, q in zip(stats, quant)], label=f"{mode}: other steps",
                 color="gray", alpha=0.4 if i == 0 else 0.25)
        ax_m.bar(xs, [r[mode]["peak_rss_mb"] for r in rows], width, label=mode, color="C0" if i == 0 else "C1")
    ax_t.set(xlabel="tasks after onboarding (k)", ylabel="CPU seconds (1 thread)", title="onboarding job, SmolLM2 on CPU")
    ax_m.set(xlabel="tasks after onboarding (k)", ylabel="MiB", title="peak resident memory (statistics / GPTQ)")
    for ax in (ax_t, ax_m):
        ax.set_xticks(ks)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), help="demo tasks in onboarding order")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens per task")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--quant-method", default="mlgptq-channel", choices=["mlgptq-channel", "mlgptq", "gptq-mixed"])
    ap.add_argument("--out", type=Path, default=RESULTS / "onboarding_incremental.json")
    args = ap.parse_args(argv)
    if len(args.tasks) < 2:
        ap.error("need at least 2 tasks")
    torch.set_num_threads(args.threads)
    base = prepare_smollm2(Settings.from_env().cache_dir)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="onboarding-incremental-")
    work = args.work or Path(tmp.name)
    redis_dir = work / "registry"
    client = connect_redis(None, redis_dir)
    try:
        namespaces = {mode: f"{mode}{uuid.uuid4().hex[:6]}" for mode in ("incremental", "full")}
        passes = {mode: run_pass(mode, args.tasks, base, work, redis_dir, args.tokens, ns, args.quant_method)
                  for mode, ns in namespaces.items()}
        for mode, ns in namespaces.items():  # the job must have made every task live
            live = TaskRegistry(client, ns).list_tasks(status="live")
            assert sorted(t.name for t in live) == sorted(args.tasks), (mode, live)
        rows = []
        for inc, full in zip(passes["incremental"][1:], passes["full"][1:]):
            same, diffs = (checkpoints_identical(inc["base"], full["base"]) if inc["base"] and full["base"]
                           else (inc["base"] == full["base"], ["a pass kept the previous base"]))
            rows.append({"num_tasks": inc["num_tasks"], "new_task": inc["new_task"], "bit_exact": same,
                         "differences": diffs[:5], "incremental": inc, "full": full,
                         "cpu_time_ratio": inc["job_cpu_seconds"] / full["job_cpu_seconds"],
                         "statistics_cpu_time_ratio": inc["statistics_cpu_seconds"] / full["statistics_cpu_seconds"],
                         "wall_time_ratio": inc["job_seconds"] / full["job_seconds"],
                         "peak_rss_ratio": inc["peak_rss_mb"] / full["peak_rss_mb"]})
        out = {
            "what": "onboarding job time and peak memory, incremental vs full re-quantization",
            "quant_method": args.quant_method,
            "model": base.name, "tasks": args.tasks, "calibration_tokens_per_task": args.tokens,
            "device": "cpu", "torch_threads": args.threads, "machine": platform.platform(),
            "first_onboarding": {"incremental": passes["incremental"][0], "full": passes["full"][0]},
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
        _plot(rows, args.out.with_suffix(".png"))
        for r in rows:
            print(f"k={r['num_tasks']}: incremental/full CPU time {r['cpu_time_ratio']:.2f} (statistics "
                  f"{r['statistics_cpu_time_ratio']:.2f}), peak RSS {r['peak_rss_ratio']:.2f}, bit-exact {r['bit_exact']}")
        return out
    finally:
        client.close()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
