"""Onboarding many tasks: one job (`onboard_tasks`, `inlaid-ray onboard --batch`) against one job
per task, on the real SmolLM2 with synthetic tasks.

Each synthetic task is a PEFT LoRA (rank 4 on q_proj and v_proj, random factors from its own
seed, written by `peft`) with its own calibration file (a rotation of the demo calibration
records). Both modes run in-process (no Ray, no service to probe, no held-out data) against one
embedded registry, each in its own namespace and artifact store, with `requantize=auto`:
  one job:     all N tasks in one `onboard_tasks` call: N statistics passes, ONE re-quantization;
  single jobs: N `onboard_task` calls in order: each computes its task's statistics and
               re-quantizes the base (every new task changes the aggregates).
Reported: seconds per mode (and per single job), base versions made, the statistics store's
bytes after each mode, and whether the two final bases are identical. The file is rewritten after
every single job, so a run cut short still reports the jobs that finished.
Writes load_tests/results/onboard_fleet.json and .png.

    python load_tests/onboard_fleet.py                  # 100 tasks, ~1 h on 2 cores
    python load_tests/onboard_fleet.py --tasks 10       # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.config import Settings
from inlaid_ray.demo import DEMO_TASKS, demo_data_path
from inlaid_ray.jobs.onboard import TaskSpec, onboard_task, onboard_tasks
from inlaid_ray.jobs.onboard_args import OnboardOptions
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.progress import Progress
from inlaid_ray.quant.incremental import checkpoints_identical
from inlaid_ray.quant.stats_store import StatsStore
from inlaid_ray.registry import TaskRegistry, connect_redis

RESULTS = Path(__file__).resolve().parent / "results"


def make_tasks(base: Path, n: int, work: Path) -> list[TaskSpec]:
    """N synthetic tasks: PEFT adapters written by `peft`, calibration rotated from the demo data."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    records = [line for t in DEMO_TASKS for line in demo_data_path(t, "calib").read_text().splitlines() if line.strip()]
    specs = []
    for i in Progress(range(n), desc="synthetic tasks", unit="task"):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.02)
        adapter = work / "adapters" / f"t{i:03d}"
        model.save_pretrained(str(adapter))
        calib = work / "calib" / f"t{i:03d}.jsonl"
        calib.parent.mkdir(parents=True, exist_ok=True)
        start = (i * 7) % len(records)
        calib.write_text("\n".join((records[start:] + records[:start])[:40]) + "\n")
        specs.append(TaskSpec(f"t{i:03d}", "fleet", adapter, calib))
    return specs


def _plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    single = out["single_jobs"]["seconds_per_job"]
    cumulative = [sum(single[: i + 1]) / 60 for i in range(len(single))]
    ax.plot(range(1, len(single) + 1), cumulative, label="one job per task (each re-quantizes)")
    ax.scatter([out["tasks"]], [out["one_job"]["seconds"] / 60], color="C1", zorder=3,
               label=f"all {out['tasks']} in one job")
    ax.set(xlabel="tasks onboarded", ylabel="minutes (CPU, in-process)",
           title=f"onboarding {out['tasks']} synthetic tasks on SmolLM2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=128, help="calibration tokens per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "onboard_fleet.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("inlaid_ray.jobs").setLevel(logging.ERROR)  # one warning per task without a probe
    base = prepare_smollm2(Settings.from_env().cache_dir)
    out: dict[str, Any] = {"what": "onboarding N synthetic tasks: one job vs one job per task", "model": base.name,
                           "tasks": args.tasks, "calibration_tokens_per_task": args.tokens, "device": "cpu",
                           "torch_threads": args.threads, "machine": platform.platform()}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="onboard-fleet-") as tmp:
        work = Path(tmp)
        specs = make_tasks(base, args.tasks, work)
        client = connect_redis(None, work / "registry")
        try:
            runs = {}
            for mode in ("one_job", "single_jobs"):
                ns = f"{mode.replace('_', '')}{uuid.uuid4().hex[:6]}"
                TaskRegistry(client, ns).add_tenant("fleet")
                opts = OnboardOptions(base_dir=str(base), artifact_dir=str(work / mode), data_dir=str(work / "registry"),
                                      namespace=ns, endpoint=None, use_ray=False, tokens_per_task=args.tokens,
                                      progress=False)
                settings = Settings(cache_dir=work / "cache")
                start = time.perf_counter()
                if mode == "one_job":
                    reports = onboard_tasks(specs, opts, settings=settings)
                    runs[mode] = reports[0].artifacts.get("base")
                    out[mode] = {"seconds": time.perf_counter() - start, "steps": reports[0].steps}
                else:
                    out[mode] = {"seconds_per_job": [], "jobs_done": 0}
                    for spec in Progress(specs, desc="single jobs", unit="job"):
                        t0 = time.perf_counter()
                        report = onboard_task(spec.task, spec.tenant, spec.adapter, spec.calib, opts, settings=settings)
                        out[mode]["seconds_per_job"].append(time.perf_counter() - t0)
                        out[mode]["jobs_done"] += 1
                        out[mode]["seconds"] = time.perf_counter() - start
                        runs[mode] = report.artifacts.get("base", runs.get(mode))
                        save()
                registry = TaskRegistry(client, ns)
                out[mode]["base_versions"] = len([b for b in registry.list_base_versions() if b.version > 0])
                out[mode]["live_tasks"] = len(registry.list_tasks(status="live"))
                out[mode]["statistics_bytes"] = StatsStore.open(work / mode / "stats").bytes_used()
                print(f"{mode}: {out[mode]['seconds'] / 60:.1f} min, {out[mode]['base_versions']} base versions, "
                      f"statistics {out[mode]['statistics_bytes']['per_task_mean']:,.0f} B per task", flush=True)
                save()
            same, diffs = checkpoints_identical(runs["one_job"], runs["single_jobs"])
            out["final_bases_identical"], out["differences"] = same, diffs[:5]
            out["single_over_one_job"] = out["single_jobs"]["seconds"] / out["one_job"]["seconds"]
        finally:
            client.close()
    save()
    _plot(out, args.out.with_suffix(".png"))
    print(f"one job {out['one_job']['seconds'] / 60:.1f} min vs single jobs {out['single_jobs']['seconds'] / 60:.1f} min "
          f"({out['single_over_one_job']:.1f}x); final bases identical: {out['final_bases_identical']}")
    return out


if __name__ == "__main__":
    main()
