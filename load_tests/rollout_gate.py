"""The onboarding rollout gate and identical-task handling on the real SmolLM2 with the demo adapters.

One registry, one artifact store, `onboard_task` in-process (no Ray, no service to probe). Every
task is onboarded with its demo eval split as held-out examples (`eval_data`), in this order:
  1-4. the four demo tasks, `requantize=auto` (the default 4-bit shared method; the committed
       results were made when it was `mlgptq-channel`): each new
       base is scored on every live task's held-out examples before it goes live;
  5.   `<first>-copy`: an exact copy of the first task (same adapter, same calibration file);
  6.   `<second>-3bit`: a copy of the second task with `--requantize always --bits 3`, a candidate
       base that is coarser on purpose.
The scenarios were fixed before the run. Per onboarding: whether a new base was made and kept,
the gate's per-task losses on the current (computed, or read from what the previous gate wrote
beside it) and the candidate base, statistics computed or copied, the statistics store's bytes,
and each step's seconds. Writes load_tests/results/rollout_gate.json and .png.

    python load_tests/rollout_gate.py              # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
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
from inlaid_ray.registry import TaskRegistry, connect_redis

RESULTS = Path(__file__).resolve().parent / "results"


def _row(name: str, source: str, report: dict[str, Any], wall: float, registry: TaskRegistry) -> dict[str, Any]:
    base = registry.snapshot().base_version
    return {"task": name, "adapter_of": source, "wall_seconds": round(wall, 2), "steps": report["steps"],
            "requantize": report["decision"]["requantize"], "decision": report["decision"]["reason"],
            "statistics_computed": report["statistics"]["computed"], "statistics_copied": report["statistics"]["copied"],
            "gate": report["gate"], "base_version_after": base.version if base else 0,
            "statistics_store_bytes": report["statistics"].get("store_bytes"), "status": report["status"]}


def _plot(rows: list[dict[str, Any]], margin: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gated = [r for r in rows if r["gate"].get("tasks")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(DEMO_TASKS), 1)
    for j, task in enumerate(DEMO_TASKS):
        xs, ys = [], []
        for i, r in enumerate(gated):
            t = r["gate"]["tasks"].get(task)
            if t is not None and t["gated"]:
                xs.append(i + (j - len(DEMO_TASKS) / 2 + 0.5) * width)
                ys.append(t["increase"])
        ax.bar(xs, ys, width, label=task)
    ax.axhline(margin, color="red", ls="--", lw=1, label=f"margin {margin} nats/token")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xticks(range(len(gated)),
                  [f"{r['task']}\n{'kept' if r['gate']['passed'] else 'REFUSED'}" for r in gated], fontsize=8)
    ax.set(ylabel="held-out loss, candidate - current", title="rollout gate on SmolLM2: live tasks' loss change")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens per task")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--margin", type=float, default=OnboardOptions().gate_max_loss_increase)
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout_gate.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = prepare_smollm2(Settings.from_env().cache_dir)
    names = list(DEMO_TASKS)
    first, second = names[0], names[1]
    plan = [(t, t, {}) for t in names] + [(f"{first}-copy", first, {}),
                                               (f"{second}-3bit", second, {"requantize": "always", "bits": 3})]
    with tempfile.TemporaryDirectory(prefix="rollout-gate-") as tmp:
        work = Path(tmp)
        client = connect_redis(None, work / "registry")
        try:
            ns = f"gate{uuid.uuid4().hex[:6]}"
            registry = TaskRegistry(client, ns)
            registry.add_tenant("demo")
            opts = OnboardOptions(base_dir=str(base), artifact_dir=str(work / "artifacts"),
                                  data_dir=str(work / "registry"), namespace=ns, endpoint=None, use_ray=False,
                                  tokens_per_task=args.tokens, progress=False, gate_max_loss_increase=args.margin)
            settings = Settings(cache_dir=work / "cache")
            rows = []
            for i, (name, source, extra) in enumerate(plan, start=1):
                start = time.perf_counter()
                report = onboard_task(name, "demo", demo_adapter_dir(source), demo_data_path(source, "calib"),
                                      opts.model_copy(update={"eval_data": str(demo_data_path(source, "eval")),
                                                              **extra}),
                                      settings=settings).to_dict()
                row = _row(name, source, report, time.perf_counter() - start, registry)
                rows.append(row)
                worst = max((t["increase"] for t in row["gate"].get("tasks", {}).values() if t["gated"]), default=None)
                print(f"[{i}/{len(plan)}] {name}: new base {row['requantize']}, "
                      f"gate {'-' if not row['gate'] else ('passed' if row['gate']['passed'] else 'REFUSED')}"
                      f"{'' if worst is None else f' (worst live-task increase {worst:+.4f})'}, "
                      f"base v{row['base_version_after']}, copied {row['statistics_copied']}, "
                      f"{row['wall_seconds']:.0f} s", flush=True)
        finally:
            client.close()
    out = {"what": "rollout gate and identical-task onboarding, SmolLM2 + demo adapters, held-out = demo eval split",
           "model": base.name, "tasks": list(DEMO_TASKS), "calibration_tokens_per_task": args.tokens,
           "margin_nats_per_token": args.margin, "gate_max_examples": opts.gate_max_examples, "device": "cpu",
           "torch_threads": args.threads, "machine": platform.platform(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    _plot(rows, args.margin, args.out.with_suffix(".png"))
    return out


if __name__ == "__main__":
    main()
