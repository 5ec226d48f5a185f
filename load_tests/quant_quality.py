"""MLGPTQ quality table and incremental-vs-full table on the real SmolLM2 with the demo adapters.

    python load_tests/quant_quality.py quality      # per task: own metric + eval loss for fp16, RTN,
                                                    # GPTQ-mixed, GPTQ-per-task, MLGPTQ at 4 and 3 bits
    python load_tests/quant_quality.py incremental  # Table 4 analogue: time / peak memory, 2..N tasks

`quality` is resumable: each quantized checkpoint and each evaluation is recorded in
`<work>/quality_state.json` as it finishes, so a run cut short continues where it stopped
(`--phase quantize|eval|analyze|report` runs one part). Every method calibrates on the same
per-task statistics (activation_source="fp16": the Hessians do not depend on the grid), stored
once in `<work>/stats`. Besides the metrics, `analyze` records what MLGPTQ changes: every task's
own GPTQ objective `sum tr((W - Q) H_t (W - Q)^T) / sum tr(W H_t W^T)` under each shared base, and
how the max-aggregated Hessian differs from the mixed one (diagonal ratios, which task owns the
max, damping escalations / eigenvalue clipping).

Writes load_tests/results/quant_quality.{json,md,png} and quant_incremental.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.config import Settings
from inlaid_ray.demo.paths import demo_adapter_dir, demo_data_path
from inlaid_ray.demo.tasks import DEMO_TASKS
from inlaid_ray.kernels.reference import gptq_dequantize_ref
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.model.tokenizer import load_tokenizer
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.demo.quality import evaluate_dir
from inlaid_ray.quantized_base.checkpoint import load_gptq_checkpoint, split_layers
from inlaid_ray.quant.incremental import TaskSource, measure_incremental_vs_full, quantize_base
from inlaid_ray.quant.mlgptq import GROUP_OF, MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("rtn", "gptq-mixed", "gptq-per-task", "mlgptq", "mlgptq-channel")
log = logging.getLogger("quant_quality")


def _sources(tasks: list[str]) -> list[TaskSource]:
    return [TaskSource(t, demo_adapter_dir(t), demo_data_path(t, "calib")) for t in tasks]


def _configs(args: argparse.Namespace) -> list[tuple[str, str | None, int | None, bool]]:
    """(name, method, bits, calibrate_with_adapter); the fp16 reference first."""
    out: list[tuple[str, str | None, int | None, bool]] = [("fp16", None, None, True)]
    for bits in args.bits:
        out += [(f"{m}-{bits}bit", m, bits, True) for m in METHODS]
        if args.no_target:
            out.append((f"mlgptq_no_target-{bits}bit", "mlgptq", bits, False))
    return out


def _mlgptq_config(args: argparse.Namespace, method: str, bits: int, with_adapter: bool) -> MLGPTQConfig:
    return MLGPTQConfig(method=method, grid=QuantGrid(bits=bits, group_size=args.group_size),  # type: ignore[arg-type]
                        calibrate_with_adapter=with_adapter, batch_tokens=args.batch_tokens, device=args.device)


class State:
    """quality_state.json: finished checkpoints and evaluations, written after each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def phase_quantize(args, base: Path, work: Path, state: State) -> None:
    done = state.section("quantized")
    calib = CalibrationConfig(tokens_per_task=args.calib_tokens, max_seq_len=args.max_seq_len, seed=args.seed)
    for name, method, bits, with_adapter in Progress(_configs(args)[1:], desc="quantize configs", unit="cfg"):
        if name in done:
            continue
        cfg = _mlgptq_config(args, method, bits, with_adapter)
        stats = None if method == "rtn" else work / ("stats" if with_adapter else "stats_no_target")
        t0 = time.perf_counter()
        rep = quantize_base(base, _sources(args.tasks), work / "ckpt" / name, cfg, calib, stats, overwrite=True,
                            keep_task_hessians=True)
        layers = rep["layers"] if method == "rtn" else {k: v for d in rep["layers"].values() for k, v in d.items()}
        done[name] = {"seconds": time.perf_counter() - t0, "computed_tasks": rep["computed_tasks"],
                      "budget_tokens_per_task": rep.get("budget"), "out_dirs": rep["out_dirs"],
                      "resources": rep["resources"]["total"],
                      "damping_escalated": sum(1 for i in layers.values() if i["damp_used"] > cfg.grid.damp_percent),
                      "eig_clipped": sum(1 for i in layers.values() if i["eig_clipped"]),
                      "modules": len(layers)}
        state.save()


def phase_eval(args, base: Path, work: Path, state: State) -> None:
    done = state.section("eval")
    tokenizer = load_tokenizer(base)
    adapters = {t: demo_adapter_dir(t) for t in args.tasks}
    for name, *_ in Progress(_configs(args), desc="evaluate configs", unit="cfg"):
        if name in done:
            continue
        path = base if name == "fp16" else work / "ckpt" / name
        t0 = time.perf_counter()
        res = evaluate_dir(path, tokenizer, adapters, args.gen_limit, args.loss_limit, args.device)
        for r in res.values():
            r["predictions"] = r["predictions"][:3]  # a few examples for the record
        done[name] = {"seconds": time.perf_counter() - t0, "tasks": res}
        state.save()


@torch.inference_mode()
def phase_analyze(args, base: Path, work: Path, state: State) -> None:
    """Per-task GPTQ objective under each base, and max-vs-mix Hessian statistics."""
    from safetensors.torch import load_file

    store = StatsStore.open(work / "stats")
    dense = load_file(str(base / "model.safetensors"), device=args.device)
    tasks = args.tasks
    objective = state.section("objective")
    for name, method, bits, with_adapter in Progress(_configs(args)[1:], desc="objective", unit="cfg"):
        if name in objective or not with_adapter:
            continue
        ckpts = {t: work / "ckpt" / name / t for t in tasks} if method == "gptq-per-task" else \
            {t: work / "ckpt" / name for t in tasks}
        err = {t: 0.0 for t in tasks}
        ref = {t: 0.0 for t in tasks}
        cache: dict[Path, dict[str, dict[str, torch.Tensor]]] = {}
        for path in set(ckpts.values()):
            _, _, tensors = load_gptq_checkpoint(path, args.device)
            cache[path] = split_layers(tensors)
        for layer in range(store.num_layers):
            hs = {t: {g: h.to(args.device).double() for g, h in store.task_layer(t, layer).items()} for t in tasks}
            for t in tasks:
                for prefix, lt in cache[ckpts[t]].items():
                    if int(prefix.split(".")[2]) != layer:
                        continue
                    W = dense[f"{prefix}.weight"].double()
                    Q = gptq_dequantize_ref(lt["qweight"], lt["qzeros"], lt["scales"].float(), lt["g_idx"], bits).double()
                    H = hs[t][GROUP_OF[prefix.rsplit(".", 1)[1]]]
                    err[t] += float(torch.einsum("oi,ij,oj->", W - Q, H, W - Q))
                    ref[t] += float(torch.einsum("oi,ij,oj->", W, H, W))
        objective[name] = {t: err[t] / ref[t] for t in tasks}
        state.save()
    if "hessian" not in state.data:
        state.data["hessian"] = _hessian_stats(store, tasks, args.device)
        state.save()
    if "module_diagnostics" not in state.data:
        state.data["module_diagnostics"] = _module_diagnostics(store, base, tasks, args)
        state.save()


DIAGNOSTIC_MODULES = ((0, "q_proj"), (10, "k_proj"), (10, "down_proj"), (20, "gate_proj"), (29, "down_proj"))


def _module_diagnostics(store: StatsStore, base: Path, tasks: list[str], args) -> dict[str, Any]:
    """For a few modules, every task's own relative objective when ONE module is quantized with
    H = mix, the element-wise max (as MLGPTQ), the channel max (mlgptq-channel: PSD, the max's
    diagonal with the mix's correlations), the task's own H, and RTN."""
    from safetensors.torch import load_file

    from inlaid_ray.quant.gptq import gptq_quantize, rtn_quantize
    from inlaid_ray.quant.mlgptq import aggregate_hessians, hf_prefix

    dense = load_file(str(base / "model.safetensors"))
    counts = [store.tasks[t].num_tokens for t in tasks]
    grid = QuantGrid(bits=args.bits[0], group_size=args.group_size)
    out: dict[str, Any] = {}
    for layer, module in DIAGNOSTIC_MODULES:
        if layer >= store.num_layers:
            continue
        parts = [store.task_layer(t, layer)[GROUP_OF[module]] for t in tasks]
        mx, mix = aggregate_hessians("mlgptq", parts, counts), aggregate_hessians("gptq-mixed", parts, counts)
        channel = aggregate_hessians("mlgptq-channel", parts, counts)
        W = dense[f"{hf_prefix(layer, module)}.weight"].float()
        qs = {"rtn": rtn_quantize(W, grid).Q, "mix": gptq_quantize(W, mix, grid).Q,
              "max": gptq_quantize(W, mx, grid).Q, "channel": gptq_quantize(W, channel, grid).Q}
        ev = torch.linalg.eigvalsh(mx.double())
        entry: dict[str, Any] = {"max_min_eig_over_mean_diag": float(ev.min() / mx.diagonal().mean()),
                                 "max_negative_eigenvalues": int((ev < 0).sum()), "d_in": int(ev.numel()),
                                 "objective": {}}
        for t, H in zip(tasks, parts):
            Hd = H.double()
            ref = float(torch.einsum("oi,ij,oj->", W.double(), Hd, W.double()))
            cands = {**qs, "own": gptq_quantize(W, H, grid).Q}
            entry["objective"][t] = {k: float(torch.einsum("oi,ij,oj->", (W - Q).double(), Hd, (W - Q).double())) / ref
                                     for k, Q in cands.items()}
        out[f"{layer}.{module}"] = entry
    return out


def _hessian_stats(store: StatsStore, tasks: list[str], device: str) -> dict[str, Any]:
    """How max differs from the token-weighted mean, per input group, pooled over layers."""
    from inlaid_ray.quant.mlgptq import aggregate_hessians

    counts = [store.tasks[t].num_tokens for t in tasks]
    out: dict[str, Any] = {}
    for group in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        ratio, owner, neg = [], torch.zeros(len(tasks)), []
        for layer in range(store.num_layers):
            parts = [store.task_layer(t, layer)[group].to(device) for t in tasks]
            mx = aggregate_hessians("mlgptq", parts, counts)
            mix = aggregate_hessians("gptq-mixed", parts, counts)
            d_mx, d_mix = mx.diagonal(), mix.diagonal().clamp_min(1e-12)
            ratio.append((d_mx / d_mix).cpu())
            owner += torch.bincount(torch.stack([p.diagonal() for p in parts]).argmax(0).cpu(), minlength=len(tasks))
            ev = torch.linalg.eigvalsh(mx.double())
            neg.append(float(ev.min() / d_mx.mean()))
        r = torch.cat(ratio)
        out[group] = {
            "diag_max_over_mix": {"mean": float(r.mean()), "p50": float(r.median()), "p90": float(r.quantile(0.9)),
                                  "max": float(r.max())},
            "share_of_channels_where_task_owns_the_max": dict(zip(tasks, (owner / owner.sum()).tolist())),
            "min_eigenvalue_over_mean_diag_of_max": {"min": min(neg), "median": statistics.median(neg)},
        }
    return out


def _table(state: State, args) -> tuple[str, dict[str, Any]]:
    evals, obj = state.section("eval"), state.section("objective")
    tasks = args.tasks
    rows = ["| base | " + " | ".join(f"{t} {DEMO_TASKS[t].primary_metric} / loss" for t in tasks)
            + " | mean loss | worst-task objective |",
            "|---|" + "---|" * (len(tasks) + 2)]
    summary: dict[str, Any] = {}
    for name, method, bits, _ in _configs(args):
        if name not in evals:
            continue
        res = evals[name]["tasks"]
        mean_loss = statistics.fmean(res[t]["eval_loss"] for t in tasks)
        worst = max(obj[name].values()) if name in obj else None
        summary[name] = {"method": method or "fp16", "bits": bits, "mean_eval_loss": mean_loss,
                         "worst_task_relative_objective": worst,
                         "tasks": {t: {k: res[t][k] for k in ("primary_metric", "value", "eval_loss", "n_gen",
                                                              "n_loss_tokens")} for t in tasks}}
        label = name + (" (not shareable)" if method == "gptq-per-task" else "")
        cells = [f"{res[t]['value']:.3f} / {res[t]['eval_loss']:.3f}" for t in tasks]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {mean_loss:.4f} | "
                    + (f"{worst:.4f}" if worst is not None else "-") + " |")
    return "\n".join(rows), summary


def _plot(summary: dict[str, Any], tasks: list[str], bits_list: list[int], group_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(bits_list), figsize=(6 * len(bits_list), 7), squeeze=False)
    for col, bits in enumerate(bits_list):
        names = ["fp16"] + [n for n, s in summary.items() if s["bits"] == bits]
        width = 0.8 / len(names)
        for row, key in enumerate(("value", "eval_loss")):
            ax = axes[row][col]
            for i, n in enumerate(names):
                if n not in summary:
                    continue
                ys = [summary[n]["tasks"][t][key] for t in tasks]
                ax.bar([x + (i - len(names) / 2) * width + width / 2 for x in range(len(tasks))], ys, width, label=n)
            ax.set_xticks(range(len(tasks)), [f"{t}\n({DEMO_TASKS[t].primary_metric})" if row == 0 else t
                                              for t in tasks])
            ax.set_ylabel("task metric (higher is better)" if row == 0 else "eval loss (lower is better)")
            ax.set_title(f"{bits}-bit, group size {group_size}")
            if row == 1:
                lo = min(summary[n]["tasks"][t]["eval_loss"] for n in names if n in summary for t in tasks)
                ax.set_ylim(bottom=max(0.0, lo * 0.8))
        axes[0][col].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M + demo LoRAs: one quantized base per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _findings(state: State, summary: dict[str, Any], args) -> str:
    """MLGPTQ vs GPTQ-mixed, stated from the numbers, and the Hessian diagnostics behind it."""
    lines = ["### MLGPTQ vs GPTQ-mixed", ""]
    quantized = state.section("quantized")
    for bits in args.bits:
        ml, mix = summary.get(f"mlgptq-{bits}bit"), summary.get(f"gptq-mixed-{bits}bit")
        if not ml or not mix:
            continue
        better = [t for t in args.tasks if ml["tasks"][t]["eval_loss"] < mix["tasks"][t]["eval_loss"]]
        verdict = "beats" if ml["mean_eval_loss"] < mix["mean_eval_loss"] else "does NOT beat"
        q = quantized.get(f"mlgptq-{bits}bit", {})
        lines.append(f"- {bits}-bit: MLGPTQ {verdict} GPTQ-mixed: mean eval loss {ml['mean_eval_loss']:.4f} vs "
                     f"{mix['mean_eval_loss']:.4f} (lower on {len(better)}/{len(args.tasks)} tasks: "
                     f"{', '.join(better) or 'none'}); its max-aggregated Hessian needed eigenvalue clipping in "
                     f"{q.get('eig_clipped', '?')}/{q.get('modules', '?')} modules (GPTQ-mixed: "
                     f"{quantized.get(f'gptq-mixed-{bits}bit', {}).get('eig_clipped', '?')}).")
        ch = summary.get(f"mlgptq-channel-{bits}bit")
        if ch:
            better = [t for t in args.tasks if ch["tasks"][t]["eval_loss"] < mix["tasks"][t]["eval_loss"]]
            metric = [t for t in args.tasks if ch["tasks"][t]["value"] > mix["tasks"][t]["value"]]
            worse = [t for t in args.tasks if ch["tasks"][t]["value"] < mix["tasks"][t]["value"]]
            lines.append(f"- {bits}-bit: MLGPTQ-channel (max diagonal, pooled correlations; PSD, no clipping) vs "
                         f"GPTQ-mixed: mean eval loss {ch['mean_eval_loss']:.4f} vs {mix['mean_eval_loss']:.4f} "
                         f"(lower on {len(better)}/{len(args.tasks)}: {', '.join(better) or 'none'}); task metric "
                         f"higher on {', '.join(metric) or 'none'}, lower on {', '.join(worse) or 'none'}.")
    hess = state.data.get("hessian") or {}
    if hess:
        lines += ["", "Max-aggregated vs mixed Hessian, pooled over the 30 layers (per input group):", "",
                  "| group | diag(H_max)/diag(H_mix) mean / p90 / max | min eigenvalue of H_max / mean diag: worst, median |"
                  " channels whose max diagonal comes from each task |", "|---|---|---|---|"]
        for g, h in hess.items():
            r, e = h["diag_max_over_mix"], h["min_eigenvalue_over_mean_diag_of_max"]
            own = ", ".join(f"{t} {v:.0%}" for t, v in h["share_of_channels_where_task_owns_the_max"].items())
            lines.append(f"| {g} | {r['mean']:.2f} / {r['p90']:.2f} / {r['max']:.2f} | {e['min']:.1f}, {e['median']:.1f} | {own} |")
    diag = state.data.get("module_diagnostics") or {}
    if diag:
        lines += ["", f"One module quantized at {args.bits[0]} bits with different H, each task's own relative objective "
                  "tr(dW H_t dW^T)/tr(W H_t W^T), mean over tasks, relative to H = mix (1.00); `channel` is "
                  "mlgptq-channel's aggregate:", "",
                  "| module | negative eigenvalues of H_max | min eig / mean diag | max | channel | own H_t | RTN |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in diag.items():
            rel = {k: statistics.fmean(o[k] / o["mix"] for o in d["objective"].values())
                   for k in ("max", "channel", "own", "rtn")}
            lines.append(f"| {name} | {d['max_negative_eigenvalues']}/{d['d_in']} | {d['max_min_eig_over_mean_diag']:.1f} | "
                         f"{rel['max']:.2f} | {rel['channel']:.2f} | {rel['own']:.2f} | {rel['rtn']:.2f} |")
    return "\n".join(lines)


def phase_report(args, state: State) -> None:
    table, summary = _table(state, args)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF weights)", "tasks": args.tasks,
           "settings": {"bits": args.bits, "group_size": args.group_size, "calib_tokens_per_task": args.calib_tokens,
                        "max_seq_len": args.max_seq_len, "gen_examples_per_task": args.gen_limit,
                        "loss_examples_per_task": args.loss_limit, "device": args.device, "seed": args.seed,
                        "activation_source": "fp16", "sym": True, "desc_act": False, "damp_percent": 0.01},
           "summary": summary, "objective": state.section("objective"), "hessian": state.data.get("hessian"),
           "quantized": state.section("quantized"),
           "eval_seconds": {k: v["seconds"] for k, v in state.section("eval").items()}}
    (out / "quant_quality.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    head = (f"SmolLM2-135M-Instruct + demo LoRA adapters, one quantized base per row (per-task: one base per task), "
            f"group size {args.group_size}, sym, {args.calib_tokens or 'equal'} calibration tokens per task, "
            f"greedy decoding through the engine on {args.gen_limit or 'all'} eval examples per task, eval loss on "
            f"{args.loss_limit or 'all'}. Cells: task metric / eval loss (mean cross-entropy of the reference "
            f"completion). Worst-task objective: max over tasks of the task's own relative GPTQ layer objective.\n\n")
    (out / "quant_quality.md").write_text(head + table + "\n\n" + _findings(state, summary, args) + "\n")
    _plot(summary, args.tasks, args.bits, args.group_size, out / "quant_quality.png")
    print(table)


def run_incremental(args, base: Path, work: Path) -> None:
    cfg = MLGPTQConfig(grid=QuantGrid(bits=args.bits[0], group_size=args.group_size), batch_tokens=args.batch_tokens,
                       device=args.device)
    calib = CalibrationConfig(tokens_per_task=args.calib_tokens, max_seq_len=args.max_seq_len, seed=args.seed)
    res = measure_incremental_vs_full(base, _sources(args.tasks), work / "incremental", cfg, calib)
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    res.update(model="SmolLM2-135M-Instruct", tasks=args.tasks, device_name=dev, threads=torch.get_num_threads())
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_incremental.json").write_text(json.dumps(res, indent=2) + "\n")
    for r in res["rows"]:
        f, i = r["full"], r["incremental"]
        print(f"{r['num_tasks']} tasks (+{r['new_task']}): full {f['total']['seconds']:.1f}s "
              f"(fwd+H {f['phases']['forward_hessian']['seconds']:.1f}s, agg+quant "
              f"{f['phases']['aggregate_quantize']['seconds']:.1f}s) vs incremental {i['total']['seconds']:.1f}s "
              f"(fwd+H {i['phases']['forward_hessian']['seconds']:.1f}s, agg+quant "
              f"{i['phases']['aggregate_quantize']['seconds']:.1f}s); bit-exact {r['bit_exact']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "incremental"])
    p.add_argument("--phase", default="all", choices=["all", "quantize", "eval", "analyze", "report"])
    p.add_argument("--base", help="SmolLM2 directory (default: the converted one in the cache)")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, help="tokens per task (default: the smallest task's total)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--gen-limit", type=int, help="generation examples per task (default: all 50)")
    p.add_argument("--loss-limit", type=int, help="eval-loss examples per task (default: all 50)")
    p.add_argument("--no-target", action="store_true", help="also the MLGPTQ_no_target ablation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--work", default="out/quant_quality", help="checkpoints, statistics and resumable state")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--clean", action="store_true", help="delete the work directory's checkpoints at the end")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("inlaid_ray.quant.gptq").setLevel(logging.ERROR)  # counted in the report instead
    if args.threads:
        torch.set_num_threads(args.threads)
    base = Path(args.base) if args.base else prepare_smollm2(Settings.from_env().cache_dir)
    missing = [t for t in args.tasks if not (demo_adapter_dir(t) / "adapter_model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"demo adapters missing for {missing}; train them first (python -m inlaid_ray.demo.train)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.what == "incremental":
        run_incremental(args, base, work)
        return 0
    state = State(work / "quality_state.json")
    if args.phase in ("all", "quantize"):
        phase_quantize(args, base, work, state)
    if args.phase in ("all", "eval"):
        phase_eval(args, base, work, state)
    if args.phase in ("all", "analyze"):
        phase_analyze(args, base, work, state)
    if args.phase in ("all", "report"):
        phase_report(args, state)
    if args.clean:
        shutil.rmtree(work / "ckpt", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
