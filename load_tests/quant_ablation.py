"""Why MLGPTQ's element-wise max fails on SmolLM2 + the demo adapters, judged on the WHOLE model
(issue #16 item 1): one 4-bit (group 64) base per row, each a calibration variant x an aggregate
of the same per-task Hessians x a repair of an indefinite aggregate, all evaluated like
load_tests/quant_quality.py (task metric on 20 greedy generations, eval loss on all 50).

Calibration variants (per-task statistics, `<work>/stats/<name>`):
- chat:           the quality table's calibration (the calib split, one chat sequence per record);
- chat-sink-0.03: the same, each sequence's first token (the attention sink) weighted 0.03, about
                  its share in a 2048-token window;
- chat-no-sink / chat-no-prefix: the sink / the whole system prompt every task shares left out
                  (weight 0); used to split the Hessians into shared and task-specific tokens;
- packed-2048:    the same tokens concatenated into 2048-token windows (one sink per window);
- train-8k:       8192 tokens per task from the train split (4x the data).
Aggregates: mix (GPTQ-mixed), max (MLGPTQ, as the paper), eigenbasis (max energy per eigendirection
of the mix), normalized (max of Hessians scaled to equal energy), channel (mlgptq-channel), and
shared-mean-max (the max over the task-specific tokens only, the shared prefix pooled). Repairs
of an aggregate still indefinite after damping: clip (eigenvalues floored) or shift (+|min| I).
Sequential rows quantize with GPTQ's quantized-input scheme (activation_source="quantized").

Besides each task's metric and loss, every row reports each task's relative GPTQ objective
sum tr(dW H dW^T) / sum tr(W H W^T) on the sink token's, the shared prefix's and the task-specific
tokens' Hessians (sampled layers), and per calibration the sink's share of the input energy and
how indefinite the max is, per layer group.

    python load_tests/quant_ablation.py            # ~1 h on 2 cores; resumable (<work>/state.json)
    python load_tests/quant_ablation.py --rows chat/max/clip chat/mix/clip   # a subset
Writes load_tests/results/quant_ablation.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.config import Settings
from inlaid_ray.demo.paths import demo_adapter_dir, demo_data_path
from inlaid_ray.demo.quality import evaluate_dir
from inlaid_ray.demo.tasks import DEMO_TASKS
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.model.tokenizer import load_tokenizer
from inlaid_ray.progress import Progress
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.diagnostics import (
    dequantized,
    min_eig_over_mean_diag,
    shared_mean_max_aggregate,
    shared_token_hessian,
)
from inlaid_ray.quant.incremental import (
    TaskSource,
    checkpoint_meta,
    compute_missing_stats,
    hessian_settings,
    load_tasks,
    quantize_base,
    resolve_task_budget,
    save_checkpoint,
)
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.quant.mlgptq import GROUP_OF, GROUPS, MLGPTQConfig, aggregate_hessians, quantize_from_hessians
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore, base_fingerprint

RESULTS = Path(__file__).resolve().parent / "results"
BITS, GROUP_SIZE = 4, 64
SAMPLED_LAYERS = (0, 5, 10, 15, 20, 25, 28, 29)  # objective split by token class (28: where max broke)
log = logging.getLogger("quant_ablation")


@dataclass(frozen=True)
class Calibration:
    """One way to collect the per-task statistics."""

    split: str = "calib"
    calib: dict[str, Any] = field(default_factory=dict)  # CalibrationConfig fields
    mlgptq: dict[str, Any] = field(default_factory=dict)  # MLGPTQConfig fields (sink weighting)


def calibrations(prefix_len: int) -> dict[str, Calibration]:
    return {
        "chat": Calibration(),
        "chat-no-sink": Calibration(mlgptq={"sink_weight": 0.0, "sink_tokens": 1}),
        "chat-no-prefix": Calibration(mlgptq={"sink_weight": 0.0, "sink_tokens": prefix_len}),
        "chat-sink-0.03": Calibration(mlgptq={"sink_weight": 0.03, "sink_tokens": 1}),
        "packed-2048": Calibration(calib={"pack_tokens": 2048}),
        "train-8k": Calibration(split="train", calib={"tokens_per_task": 8192}),
    }


# calibration/aggregate/repair; "sequential" rows re-run GPTQ's quantized-input scheme instead.
ROWS: tuple[str, ...] = (  # in order of what they tell, so a run cut short has the most telling rows
    "chat/mix/clip", "chat/max/clip", "chat/eigenbasis/clip", "chat/shared-mean-max/clip", "chat/sink-mean-max/clip",
    "chat/channel/clip", "packed-2048/max/clip", "packed-2048/mix/clip", "chat-sink-0.03/max/clip",
    "train-8k/max/clip", "chat/max/shift", "chat/normalized/clip", "train-8k/mix/clip", "sequential/max/clip",
    "packed-2048/channel/clip", "chat-sink-0.03/mix/clip", "train-8k/eigenbasis/clip", "sequential/mix/clip",
    "chat/shared-mean-max/shift", "packed-2048/max/shift", "chat-sink-0.03/channel/clip", "train-8k/channel/clip",
)
METHOD_OF = {"mix": "gptq-mixed", "max": "mlgptq", "eigenbasis": "mlgptq-eigenbasis", "normalized": "mlgptq-normalized",
             "channel": "mlgptq-channel"}


class State:
    """state.json: what each phase finished, written after every step (the run is resumable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(args.base) if args.base else prepare_smollm2(Settings.from_env().cache_dir)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state = State(self.work / "state.json")
        self.tokenizer = load_tokenizer(self.base)
        self.tasks = list(args.tasks)
        self.prefix_len = self._shared_prefix_len()
        self.calibrations = calibrations(self.prefix_len)
        self.grid = QuantGrid(bits=BITS, group_size=GROUP_SIZE)

    def _sources(self, split: str) -> list[TaskSource]:
        return [TaskSource(t, demo_adapter_dir(t), demo_data_path(t, split)) for t in self.tasks]

    def _shared_prefix_len(self) -> int:
        """Tokens every calibration sequence of every task starts with (sink + system prompt)."""
        from inlaid_ray.quant.calibration import load_calibration_file

        seqs = [s for src in self._sources("calib") for s in load_calibration_file(src.calibration, self.tokenizer)]
        n = 0
        while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
            n += 1
        return n

    # ------------------------------------------------------------------ statistics

    def store(self, name: str) -> StatsStore:
        """The per-task statistics of one calibration variant (collected on first use)."""
        root = self.work / "stats" / name
        if StatsStore.is_store(root):
            return StatsStore.open(root)
        c = self.calibrations[name]
        cfg = MLGPTQConfig(grid=self.grid, **c.mlgptq)
        calib = CalibrationConfig(**c.calib)
        sources = self._sources(c.split)
        model = load_base(self.base)
        budget = resolve_task_budget(sources, self.tokenizer, calib)
        tasks = load_tasks(sources, self.tokenizer, model.config, calib, budget)
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # a run cut short left it
        store = StatsStore.create(tmp, base_fingerprint(self.base), hessian_settings(cfg, calib, budget),
                                  model.config.num_layers, keep_task_hessians=True)
        t0 = time.perf_counter()
        compute_missing_stats(model, store, tasks, cfg)
        k = cfg.sink_tokens if cfg.sink_weight != 1.0 else 0
        self.state.section("stats")[name] = {
            "seconds": time.perf_counter() - t0, "budget": budget,
            "tokens": {t.name: t.calibration.num_tokens for t in tasks},
            "sequences": {t.name: t.calibration.num_sequences for t in tasks},
            "weighted_tokens": {t.name: sum(max(0, len(s) - k) for s in t.calibration.sequences)
                                + cfg.sink_weight * sum(min(k, len(s)) for s in t.calibration.sequences)
                                for t in tasks},
        }
        tmp.rename(root)
        self.state.save()
        return StatsStore.open(root)

    def weighted_tokens(self, name: str) -> dict[str, float]:
        self.store(name)
        return self.state.section("stats")[name]["weighted_tokens"]

    def token_class_hessians(self, layer: int) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{class: {task: {group: H}}} for the sink token, the rest of the shared prefix and the
        task-specific tokens, split exactly from the chat, chat-no-sink and chat-no-prefix statistics."""
        full, no_sink, no_prefix = self.store("chat"), self.store("chat-no-sink"), self.store("chat-no-prefix")
        n_no_sink, n_no_prefix = self.weighted_tokens("chat-no-sink"), self.weighted_tokens("chat-no-prefix")
        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {"sink": {}, "prefix": {}, "content": {}}
        for t in self.tasks:
            n = full.tasks[t].num_tokens
            hf, hs, hp = full.task_layer(t, layer), no_sink.task_layer(t, layer), no_prefix.task_layer(t, layer)
            out["sink"][t] = {g: shared_token_hessian(hf[g], n, hs[g], n_no_sink[t]) for g in hf}
            # prefix without its first token: split the no-sink statistics by the no-prefix ones
            out["prefix"][t] = {g: shared_token_hessian(hs[g], n_no_sink[t], hp[g], n_no_prefix[t]) for g in hf}
            out["content"][t] = hp
        return out

    # ------------------------------------------------------------------ aggregates

    def hessians_for(self, calibration: str, aggregate: str) -> Callable[[int], dict[str, torch.Tensor]]:
        if aggregate in ("shared-mean-max", "sink-mean-max"):
            rest_name = "chat-no-prefix" if aggregate == "shared-mean-max" else "chat-no-sink"
            full, rest = self.store(calibration), self.store(rest_name)
            n_rest = self.weighted_tokens(rest_name)

            def split(layer: int) -> dict[str, torch.Tensor]:
                out = {}
                hf = {t: full.task_layer(t, layer) for t in self.tasks}
                hr = {t: rest.task_layer(t, layer) for t in self.tasks}
                for g in GROUPS:
                    n_all = [full.tasks[t].num_tokens for t in self.tasks]
                    shared = [shared_token_hessian(hf[t][g], n, hr[t][g], n_rest[t]) for t, n in zip(self.tasks, n_all)]
                    out[g] = shared_mean_max_aggregate(shared, [hr[t][g] for t in self.tasks],
                                                       [n - n_rest[t] for t, n in zip(self.tasks, n_all)],
                                                       [n_rest[t] for t in self.tasks])
                return out

            return split
        store = self.store(calibration)
        counts = [store.tasks[t].num_tokens for t in self.tasks]
        method = METHOD_OF[aggregate]

        def per_layer(layer: int) -> dict[str, torch.Tensor]:
            parts = [store.task_layer(t, layer) for t in self.tasks]
            return {g: aggregate_hessians(method, [p[g] for p in parts], counts) for g in GROUPS}

        return per_layer

    # ------------------------------------------------------------------ phases

    def quantize(self, row: str) -> Path:
        done = self.state.section("quantized")
        out = self.work / "ckpt" / row.replace("/", "_")
        if row in done and (out / "config.json").is_file():
            return out
        calibration, aggregate, repair = row.split("/")
        grid = QuantGrid(bits=BITS, group_size=GROUP_SIZE, psd_repair=repair)
        t0 = time.perf_counter()
        if calibration == "sequential":
            cfg = MLGPTQConfig(method=METHOD_OF[aggregate], grid=grid, activation_source="quantized")  # type: ignore[arg-type]
            rep = quantize_base(self.base, self._sources("calib"), out, cfg, CalibrationConfig(), overwrite=True)
            info = rep["layers"]["shared"]
        else:
            method = METHOD_OF.get(aggregate, "mlgptq")
            cfg = MLGPTQConfig(method=method, grid=grid)  # type: ignore[arg-type]
            model = load_base(self.base)
            packed, info = quantize_from_hessians(model, self.hessians_for(calibration, aggregate), grid,
                                                  desc=f"quantize {row}", threads=1)
            meta = {**checkpoint_meta(cfg, None, [], info), "ablation": row}
            save_checkpoint(out, self.base, model, packed, cfg, meta, overwrite=True)
        done[row] = {"seconds": time.perf_counter() - t0, "modules": len(info),
                     "psd_repaired": sum(1 for i in info.values() if i["eig_clipped"]),
                     "damping_escalated": sum(1 for i in info.values() if i["damp_used"] > grid.damp_percent)}
        self.state.save()
        return out

    def evaluate(self, row: str, ckpt: Path) -> None:
        done = self.state.section("eval")
        if row in done:
            return
        adapters = {t: demo_adapter_dir(t) for t in self.tasks}
        t0 = time.perf_counter()
        res = evaluate_dir(ckpt, self.tokenizer, adapters, self.args.gen_limit, None, "cpu", progress=False)
        done[row] = {"seconds": time.perf_counter() - t0,
                     "tasks": {t: {k: r[k] for k in ("primary_metric", "value", "eval_loss")} for t, r in res.items()}}
        self.state.save()

    @torch.inference_mode()
    def objective(self, row: str, ckpt: Path) -> None:
        """Each task's relative objective per token class, on the sampled layers."""
        done = self.state.section("objective")
        if row in done:
            return
        from safetensors.torch import load_file

        dense = load_file(str(self.base / "model.safetensors"))
        q = dequantized(ckpt, BITS)
        err: dict[str, dict[str, float]] = {}
        ref: dict[str, dict[str, float]] = {}
        for layer in SAMPLED_LAYERS:
            hs = self.token_class_hessians(layer)
            for prefix, Q in q.items():
                if int(prefix.split(".")[2]) != layer:
                    continue
                W = dense[f"{prefix}.weight"].float()
                dW = W - Q
                g = GROUP_OF[prefix.rsplit(".", 1)[1]]
                for cls, per_task in hs.items():
                    for t, h in per_task.items():
                        e = err.setdefault(cls, {}).setdefault(t, 0.0)
                        r = ref.setdefault(cls, {}).setdefault(t, 0.0)
                        err[cls][t] = e + float(((dW @ h[g]) * dW).sum())
                        ref[cls][t] = r + float(((W @ h[g]) * W).sum())
        done[row] = {cls: {t: err[cls][t] / ref[cls][t] for t in err[cls]} for cls in err}
        self.state.save()

    @torch.inference_mode()
    def hessian_diagnostics(self) -> None:
        """Per calibration and layer group: how indefinite the max is; and the sink's energy share."""
        done = self.state.section("hessian")
        names = ["chat", "packed-2048", "chat-sink-0.03", "train-8k", "chat-no-sink", "chat-no-prefix"]
        for name in Progress(names, desc="hessian diagnostics", unit="calibration"):
            if name in done:
                continue
            store = self.store(name)
            counts = [store.tasks[t].num_tokens for t in self.tasks]
            entry: dict[str, Any] = {}
            for g in GROUPS:
                worst, negative = [], []
                for layer in SAMPLED_LAYERS:
                    parts = [store.task_layer(t, layer)[g] for t in self.tasks]
                    ratio, neg = min_eig_over_mean_diag(aggregate_hessians("mlgptq", parts, counts))
                    worst.append(ratio)
                    negative.append(neg / parts[0].shape[0])
                entry[g] = {"max_min_eig_over_mean_diag": {"min": min(worst), "median": statistics.median(worst)},
                            "max_negative_eigenvalue_share": statistics.fmean(negative)}
            done[name] = entry
            self.state.save()
        if "energy_share" not in self.state.data:
            share: dict[str, dict[str, float]] = {}
            for layer in SAMPLED_LAYERS:
                hs = self.token_class_hessians(layer)
                n_all = {t: self.store("chat").tasks[t].num_tokens for t in self.tasks}
                n_cls = {"sink": {t: self.state.section("stats")["chat"]["sequences"][t] for t in self.tasks}}
                n_cls["content"] = self.weighted_tokens("chat-no-prefix")
                n_cls["prefix"] = {t: n_all[t] - n_cls["sink"][t] - n_cls["content"][t] for t in self.tasks}
                full = self.store("chat")
                for g in GROUPS:
                    total = {t: float(full.task_layer(t, layer)[g].diagonal().sum()) * n_all[t] for t in self.tasks}
                    for cls in ("sink", "prefix"):
                        vals = [float(hs[cls][t][g].diagonal().sum()) * n_cls[cls][t] / total[t] for t in self.tasks]
                        share.setdefault(f"{cls}/{g}", {})[str(layer)] = statistics.fmean(vals)
            self.state.data["energy_share"] = share
            self.state.save()


def report(study: Study, rows: list[str]) -> None:
    state, tasks = study.state, study.tasks
    evals, obj, quant = state.section("eval"), state.section("objective"), state.section("quantized")
    mix = evals.get("chat/mix/clip")
    head = ("| calibration | aggregate | repair | mean eval loss | "
            + " | ".join(f"{t} {DEMO_TASKS[t].primary_metric} / loss" for t in tasks)
            + " | worst metric drop vs chat/mix | PSD repairs | objective sink / prefix / content (mean over tasks) "
              "| quantize s |")
    lines = [head, "|" + "---|" * (len(tasks) + 8)]
    summary: dict[str, Any] = {}
    for row in rows:
        if row not in evals:
            continue
        res = evals[row]["tasks"]
        mean_loss = statistics.fmean(res[t]["eval_loss"] for t in tasks)
        drop = max(mix["tasks"][t]["value"] - res[t]["value"] for t in tasks) if mix else None
        o = obj.get(row, {})
        objs = {cls: statistics.fmean(o[cls].values()) for cls in ("sink", "prefix", "content") if cls in o}
        summary[row] = {"mean_eval_loss": mean_loss, "tasks": res, "worst_metric_drop_vs_mix": drop,
                        "objective": o, "objective_mean": objs, **quant.get(row, {})}
        cal, agg, rep = row.split("/")
        cells = " | ".join(f"{res[t]['value']:.3f} / {res[t]['eval_loss']:.3f}" for t in tasks)
        obj_cell = " / ".join(f"{objs[c]:.4f}" for c in ("sink", "prefix", "content") if c in objs) or "-"
        lines.append(f"| {cal} | {agg} | {rep} | {mean_loss:.4f} | {cells} | "
                     + (f"{drop:+.3f}" if drop is not None else "-")
                     + f" | {quant.get(row, {}).get('psd_repaired', '-')}/{quant.get(row, {}).get('modules', '-')} | "
                     f"{obj_cell} | {quant.get(row, {}).get('seconds', 0):.0f} |")
    hess = state.section("hessian")
    hlines = ["| calibration | " + " | ".join(f"{g}: min eig / mean diag (worst, median); negative share"
                                               for g in GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    for name, entry in hess.items():
        cells = [f"{e['max_min_eig_over_mean_diag']['min']:.1f}, {e['max_min_eig_over_mean_diag']['median']:.1f}; "
                 f"{e['max_negative_eigenvalue_share']:.0%}" for e in entry.values()]
        hlines.append(f"| {name} | " + " | ".join(cells) + " |")
    share = state.data.get("energy_share", {})
    slines = ["| token class / group | " + " | ".join(f"layer {l}" for l in SAMPLED_LAYERS) + " |",
              "|---|" + "---|" * len(SAMPLED_LAYERS)]
    for key, per_layer in share.items():
        slines.append(f"| {key} | " + " | ".join(f"{per_layer[str(l)]:.0%}" for l in SAMPLED_LAYERS) + " |")
    stats = state.section("stats")
    doc = {"model": "SmolLM2-135M-Instruct", "tasks": tasks, "bits": BITS, "group_size": GROUP_SIZE,
           "gen_examples_per_task": study.args.gen_limit, "loss_examples_per_task": 50,
           "shared_prefix_tokens": study.prefix_len, "sampled_layers": list(SAMPLED_LAYERS),
           "calibrations": {k: {"split": v.split, **v.calib, **v.mlgptq} for k, v in study.calibrations.items()},
           "stats": stats, "rows": summary, "hessian": hess, "energy_share": share}
    out = Path(study.args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_ablation.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    intro = (f"SmolLM2-135M-Instruct + the 4 demo LoRA adapters, {BITS}-bit, group {GROUP_SIZE}, sym, one quantized "
             f"base per row; task metric on {study.args.gen_limit} greedy generations per task through the engine, "
             f"eval loss on all 50 eval examples. Every calibration sequence starts with the same "
             f"{study.prefix_len} tokens (the sink `<|im_start|>` and the shared system prompt). Objective: "
             f"sum tr(dW H dW^T) / sum tr(W H W^T) over layers {', '.join(map(str, SAMPLED_LAYERS))}, with H from "
             f"the sink token, the rest of the shared prefix, or the task-specific tokens only (chat calibration). "
             f"Produced by `python load_tests/quant_ablation.py`.\n\n")
    (out / "quant_ablation.md").write_text(
        intro + "\n".join(lines) + "\n\nHow indefinite the element-wise max is (sampled layers), per calibration:\n\n"
        + "\n".join(hlines) + "\n\nShare of each layer group's input energy (trace of H) carried by the sink token "
        "and by the rest of the shared prefix (chat calibration, mean over tasks):\n\n" + "\n".join(slines) + "\n")
    _plot(summary, tasks, out / "quant_ablation.png")
    print("\n".join(lines))


def _plot(summary: dict[str, Any], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary)
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1.5))
    for i, t in enumerate(tasks):
        ax.scatter([summary[r]["tasks"][t]["eval_loss"] for r in rows], range(len(rows)), s=18, label=t,
                   marker="osd^v<>"[i % 7])
    ax.scatter([summary[r]["mean_eval_loss"] for r in rows], range(len(rows)), s=60, marker="|", c="k", label="mean")
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("eval loss (log scale, lower is better)")
    ax.set_title(f"MLGPTQ ablations, SmolLM2-135M + demo LoRAs, {BITS}-bit g{GROUP_SIZE}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run (default: all {len(ROWS)})")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    p.add_argument("--gen-limit", type=int, default=20, help="generation examples per task")
    p.add_argument("--base", help="SmolLM2 directory (default: the converted one in the cache)")
    p.add_argument("--work", default="out/quant_ablation", help="statistics, checkpoints and resumable state")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the state")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("inlaid_ray.quant.gptq").setLevel(logging.ERROR)  # counted in the report instead
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    study = Study(args)
    if not args.report_only:
        log.info("shared prefix: %d tokens", study.prefix_len)
        for row in Progress(args.rows, desc="ablation rows", unit="row"):
            ckpt = study.quantize(row)
            study.evaluate(row, ckpt)
            study.objective(row, ckpt)
            report(study, args.rows)
        study.hessian_diagnostics()
    report(study, [r for r in ROWS if r in study.state.section("eval")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
