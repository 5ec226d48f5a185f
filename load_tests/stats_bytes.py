"""Bytes the MLGPTQ statistics store keeps per task, measured on SmolLM2 and computed for the
Llama-2-7B shape, against the goal of at most 1% of the base model's fp16 bytes per task.

Measured: a compact store (quant/stats_store.py) over the four demo tasks at the onboarding
default of 512 calibration tokens per task (demo calib split) and at 8,192 (train split), with
a keep_task_hessians store beside the first for what the previous format kept per task. Computed
from the shapes: per task, 4 bytes a calibration token; fixed, per generation of aggregates,
(8 + 4) bytes per Hessian entry (fp64 sum, fp32 max) plus the diagonals; the old per-task cost,
4 bytes per entry of every task's Hessians. The formula is checked against the measured store.
Writes load_tests/results/stats_bytes.json and .png.

    python load_tests/stats_bytes.py        # ~5 min on 2 cores (forward passes of 4 x 8.7k tokens)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.config import Settings
from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir, demo_data_path
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.incremental import TaskSource, compute_missing_stats, hessian_settings, load_tasks
from inlaid_ray.quant.mlgptq import GROUPS, MLGPTQConfig
from inlaid_ray.quant.stats_store import StatsStore, base_fingerprint
from inlaid_ray.quantized_base.loading import load_base

RESULTS = Path(__file__).resolve().parent / "results"


def hessian_dims(config: ModelConfig) -> list[int]:
    """d_in of each Linear input group of one block (one Hessian per group)."""
    return [config.module_shape(GROUPS[g][0])[1] for g in GROUPS]


def fp16_bytes(config: ModelConfig) -> int:
    """fp16 bytes of the base's weights (embeddings, projections, norms, untied head)."""
    per_layer = sum(o * i for o, i in (config.module_shape(m) for ms in GROUPS.values() for m in ms))
    per_layer += 2 * config.hidden_size
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return 2 * (config.num_layers * per_layer + config.vocab_size * config.hidden_size + head + config.hidden_size)


def computed(config: ModelConfig, tokens: int) -> dict[str, float]:
    entries = config.num_layers * sum(d * d for d in hessian_dims(config))
    diag = config.num_layers * sum(hessian_dims(config))
    return {"per_task_bytes": 4 * tokens, "old_per_task_bytes": 4 * entries,
            "aggregates_bytes_per_generation": 12 * entries + 4 * diag, "base_fp16_bytes": fp16_bytes(config)}


def measure(base: Path, split: str, tokens: int, root: Path, keep: bool) -> dict[str, Any]:
    cfg = MLGPTQConfig(method="mlgptq-channel")
    calib = CalibrationConfig(tokens_per_task=tokens)
    model = load_base(base)
    sources = [TaskSource(t, demo_adapter_dir(t), demo_data_path(t, split)) for t in DEMO_TASKS]
    tasks = load_tasks(sources, load_tokenizer(base), model.config, calib, tokens)
    store = StatsStore.create(root, base_fingerprint(base), hessian_settings(cfg, calib, tokens),
                              model.config.num_layers, keep_task_hessians=keep)
    compute_missing_stats(model, store, tasks, cfg)
    return {"split": split, "tokens_per_task": tokens, "keep_task_hessians": keep,
            "tokens": {t.name: t.calibration.num_tokens for t in tasks}, **store.bytes_used()}


def _plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels, kept, old, goal = [], [], [], []
    for model, c in out["computed"].items():
        for tokens, row in c.items():
            labels.append(f"{model}\n{tokens} tokens")
            kept.append(row["per_task_bytes"])
            old.append(row["old_per_task_bytes"])
            goal.append(row["base_fp16_bytes"] / 100)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], old, 0.4, label="per task, every Hessian (previous store)", color="C1")
    ax.bar([x + 0.2 for x in xs], kept, 0.4, label="per task, calibration sample (this store)", color="C0")
    ax.scatter(list(xs), goal, marker="_", s=900, color="red", label="goal: 1% of the fp16 base", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(ylabel="bytes", title="MLGPTQ statistics kept per task (computed; SmolLM2 rows also measured)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "stats_bytes.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = prepare_smollm2(Settings.from_env().cache_dir)
    smol = ModelConfig.from_dir(base)
    out: dict[str, Any] = {"what": "MLGPTQ statistics bytes per task and fixed, compact store vs every Hessian kept",
                           "machine": platform.platform(), "measured": [], "computed": {}}
    with tempfile.TemporaryDirectory(prefix="stats-bytes-") as tmp:
        for split, tokens, keep in (("calib", 512, False), ("calib", 512, True), ("train", 8192, False)):
            row = measure(base, split, tokens, Path(tmp) / f"{split}{tokens}{keep}", keep)
            out["measured"].append(row)
            print(f"SmolLM2, {tokens} tokens/task, keep={keep}: {row['per_task_mean']:,.0f} B per task, "
                  f"aggregates {row['aggregates']:,} B", flush=True)
    for name, config in (("SmolLM2-135M", smol), ("Llama-2-7B shape", ModelConfig())):
        out["computed"][name] = {tokens: computed(config, tokens) for tokens in (512, 8192)}
    for row in out["measured"]:
        want = computed(smol, row["tokens_per_task"])
        row["formula_per_task_bytes"] = want["old_per_task_bytes" if row["keep_task_hessians"] else "per_task_bytes"] \
            + (4 * row["tokens_per_task"] if row["keep_task_hessians"] else 0)
        row["formula_aggregates_bytes"] = want["aggregates_bytes_per_generation"]
        row["meets_goal"] = row["per_task_max"] <= want["base_fp16_bytes"] / 100
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    _plot(out, args.out.with_suffix(".png"))
    for name, c in out["computed"].items():
        for tokens, row in c.items():
            print(f"{name}, {tokens} tokens: {row['per_task_bytes']:,} B per task (was {row['old_per_task_bytes']:,}); "
                  f"goal {row['base_fp16_bytes'] / 100:,.0f} B; aggregates {row['aggregates_bytes_per_generation']:,} B "
                  "per generation (fixed)")
    return out


if __name__ == "__main__":
    main()
