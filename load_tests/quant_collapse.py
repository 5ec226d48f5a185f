"""Why the element-wise-max MLGPTQ base collapses on SmolLM2 + the demo adapters, and what a PSD
max does instead (reads the statistics and checkpoints that `quant_quality.py quality` wrote).

    python load_tests/quant_collapse.py [--work out/quant_quality] [--more-calib 256]

1. Localize: starting from the fp16 base (+ adapter), put the MLGPTQ checkpoint's weights into ONE
   module kind at a time, then into that kind of ONE block at a time; the eval loss of the worst task
   says which Linear does the damage (dequantized with the PyTorch reference, not the engine).
2. At that module, quantize with every aggregate of the same per-task Hessians (mix, element-wise
   max as MLGPTQ with the eigenvalue clipping it needs, the max shifted to PSD by its most negative
   eigenvalue, the channel max) and report each task's loss and its own GPTQ objective
   tr(dW H_t dW^T).
3. With `--more-calib N`: recompute the per-task Hessians on N training examples per task (about
   8x the calibration tokens for N=256) and report the max's smallest eigenvalue at that module,
   to tell a sample-size artefact from a structural one.

Writes load_tests/results/quant_collapse.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.config import Settings
from inlaid_ray.demo.data import load_examples
from inlaid_ray.demo.paths import demo_adapter_dir, demo_data_path
from inlaid_ray.demo.tasks import DEMO_TASKS
from inlaid_ray.lora.peft_io import load_peft_adapter
from inlaid_ray.model.config import LINEAR_MODULES
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.model.tokenizer import load_tokenizer
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.demo.quality import attach_adapters, completion_loss, load_eval_model
from inlaid_ray.quant.gptq import gptq_quantize, rtn_quantize
from inlaid_ray.quant.incremental import TaskSource, quantize_base
from inlaid_ray.quant.mlgptq import GROUP_OF, MLGPTQConfig, hf_prefix
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.diagnostics import aggregate_variants, dequantized, min_eig_over_mean_diag
from inlaid_ray.quant.stats_store import StatsStore

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("quant_collapse")


class SwapModel:
    """The fp16 eval model with every adapter in one bank; `losses(weights)` puts `weights`
    ({HF prefix: W}) into the model, measures each task's eval loss, and restores the fp16 weights."""

    def __init__(self, base: Path, tasks: list[str], examples: int) -> None:
        self.model = load_eval_model(base)
        self.tokenizer = load_tokenizer(base)
        self.bank = attach_adapters(self.model, {t: load_peft_adapter(demo_adapter_dir(t), self.model.config, name=t)
                                                 for t in tasks})
        self.records = {t: load_examples(t, "eval")[:examples] for t in tasks}

    def weight(self, prefix: str) -> torch.nn.Parameter:
        return self.model.get_parameter(f"{prefix}.base.weight")

    @torch.no_grad()
    def losses(self, weights: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, float]:
        saved = {p: self.weight(p).detach().clone() for p in weights}
        for p, w in weights.items():
            self.weight(p).copy_(w)
        try:
            return {t: completion_loss(self.model, self.tokenizer, self.records[t], self.bank.slot_of(t))[0]
                    for t in tasks}
        finally:
            for p, w in saved.items():
                self.weight(p).copy_(w)


def localize(swap: SwapModel, q: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, Any]:
    """Worst task over the whole checkpoint; its loss with one module kind, then one block of the
    worst kind, quantized."""
    whole = swap.losses(q, tasks)
    worst = max(whole, key=whole.get)
    kinds = {m: swap.losses({p: w for p, w in q.items() if p.endswith(f".{m}")}, [worst])[worst]
             for m in Progress(LINEAR_MODULES, desc="swap module kinds", unit="kind")}
    kind = max(kinds, key=kinds.get)
    layers = sorted({int(p.split(".")[2]) for p in q})
    blocks = {layer: swap.losses({hf_prefix(layer, kind): q[hf_prefix(layer, kind)]}, [worst])[worst]
              for layer in Progress(layers, desc=f"swap {kind} per block", unit="block")}
    return {"whole_checkpoint": whole, "worst_task": worst, "fp16": swap.losses({}, [worst])[worst],
            "by_module_kind": kinds, "worst_kind": kind, "by_block": blocks, "worst_block": max(blocks, key=blocks.get)}


def compare_at(swap: SwapModel, store: StatsStore, tasks: list[str], layer: int, module: str,
               grid: QuantGrid) -> dict[str, Any]:
    """Each task's eval loss and own objective with only (layer, module) quantized, per aggregate."""
    prefix = hf_prefix(layer, module)
    W = swap.weight(prefix).detach().float().clone()
    own = [store.task_layer(t, layer)[GROUP_OF[module]].double() for t in tasks]
    cands = {"rtn": rtn_quantize(W, grid).Q}
    cands.update({k: gptq_quantize(W, h, grid).Q for k, h in aggregate_variants(store, tasks, layer, module).items()})
    out = {}
    for name, Q in Progress(cands.items(), desc=f"aggregates at {prefix}", unit="H"):
        dW = (W - Q).double()
        out[name] = {"loss": swap.losses({prefix: Q}, tasks),
                     "objective": {t: float(torch.einsum("oi,ij,oj->", dW, H, dW)) for t, H in zip(tasks, own)}}
    return out


def more_calibration_store(base: Path, tasks: list[str], examples: int, work: Path, bits: int,
                           group_size: int) -> StatsStore:
    """Per-task Hessians on `examples` training records per task (resumable: an existing store is reused)."""
    root = work / f"stats_train{examples}"
    if StatsStore.is_store(root) and sorted(StatsStore.open(root).tasks) == sorted(tasks):
        return StatsStore.open(root)
    sources = []
    for t in tasks:
        path = work / "calib_train" / f"{t}_{examples}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(demo_data_path(t, "train").read_text().splitlines(keepends=True)[:examples]))
        sources.append(TaskSource(t, demo_adapter_dir(t), path))
    cfg = MLGPTQConfig(method="mlgptq", grid=QuantGrid(bits=bits, group_size=group_size))
    quantize_base(base, sources, work / "ckpt_train_calib", cfg, CalibrationConfig(), root, overwrite=True,
                  keep_task_hessians=True)
    return StatsStore.open(root)


def report(doc: dict[str, Any]) -> str:
    loc = doc["localize"]
    lines = [f"Worst task under the MLGPTQ {doc['bits']}-bit checkpoint: **{loc['worst_task']}** (eval loss "
             f"{loc['whole_checkpoint'][loc['worst_task']]:.3f}, fp16 {loc['fp16']:.4f}). Its loss with only one "
             "module kind taken from the checkpoint:", "",
             "| module kind | " + " | ".join(loc["by_module_kind"]) + " |", "|---|" + "---|" * len(loc["by_module_kind"]),
             "| loss | " + " | ".join(f"{v:.4f}" for v in loc["by_module_kind"].values()) + " |", "",
             f"Only `{loc['worst_kind']}` of one block: worst is block {loc['worst_block']} "
             f"(loss {loc['by_block'][loc['worst_block']]:.3f}); "
             f"every other block below {sorted(loc['by_block'].values())[-2]:.3f}.", ""]
    at = doc["compare_at"]
    tasks = list(next(iter(at["variants"].values()))["loss"])
    lines += [f"Only `{at['module']}` quantized, from the same per-task Hessians (min eigenvalue of the element-wise "
              f"max / mean diagonal {at['min_eig_over_mean_diag']:.2f}, {at['negative_eigenvalues']} negative):", "",
              "| aggregate | " + " | ".join(f"{t} loss" for t in tasks) + " | " +
              " | ".join(f"{t} tr(dW H_t dW^T)" for t in tasks) + " |", "|---|" + "---|" * (2 * len(tasks))]
    for name, v in at["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['loss'][t]:.4f}" for t in tasks) + " | "
                     + " | ".join(f"{v['objective'][t]:.3g}" for t in tasks) + " |")
    if "more_calibration" in doc:
        m = doc["more_calibration"]
        lines += ["", f"Calibration size: with {m['tokens_per_task']} tokens per task instead of "
                  f"{m['base_tokens_per_task']}, the element-wise max at `{at['module']}` still has min eigenvalue / "
                  f"mean diagonal {m['min_eig_over_mean_diag']:.2f} ({m['negative_eigenvalues']} negative): "
                  "the indefiniteness is structural, not a sampling artefact."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/quant_quality", help="quant_quality.py's work directory")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    p.add_argument("--examples", type=int, default=20, help="eval examples per task for the losses")
    p.add_argument("--more-calib", type=int, help="also recompute Hessians on this many training examples per task")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("inlaid_ray.quant.gptq").setLevel(logging.ERROR)
    work = Path(args.work)
    ckpt = work / "ckpt" / f"mlgptq-{args.bits}bit"
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"no MLGPTQ checkpoint at {ckpt}: run load_tests/quant_quality.py quality first")
    base = prepare_smollm2(Settings.from_env().cache_dir)
    store = StatsStore.open(work / "stats")
    swap = SwapModel(base, args.tasks, args.examples)
    loc = localize(swap, dequantized(ckpt, args.bits), args.tasks)
    layer, module = loc["worst_block"], loc["worst_kind"]
    grid = QuantGrid(bits=args.bits, group_size=args.group_size)
    elementwise = aggregate_variants(store, args.tasks, layer, module)["elementwise max (eig-clipped)"]
    min_eig, negative = min_eig_over_mean_diag(elementwise)
    doc: dict[str, Any] = {
        "bits": args.bits, "group_size": args.group_size, "eval_examples_per_task": args.examples, "localize": loc,
        "compare_at": {"module": hf_prefix(layer, module), "min_eig_over_mean_diag": min_eig,
                       "negative_eigenvalues": negative,
                       "variants": compare_at(swap, store, args.tasks, layer, module, grid)}}
    if args.more_calib:
        big = more_calibration_store(base, args.tasks, args.more_calib, work, args.bits, args.group_size)
        h = aggregate_variants(big, args.tasks, layer, module)["elementwise max (eig-clipped)"]
        e, n = min_eig_over_mean_diag(h)
        doc["more_calibration"] = {"examples_per_task": args.more_calib,
                                   "tokens_per_task": big.tasks[args.tasks[0]].num_tokens,
                                   "base_tokens_per_task": store.tasks[args.tasks[0]].num_tokens,
                                   "min_eig_over_mean_diag": e, "negative_eigenvalues": n}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_collapse.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "quant_collapse.md").write_text(report(doc))
    print((out / "quant_collapse.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
