"""`inlaid-ray quantize`: the argparse sub-command over `inlaid_ray.quant.incremental.quantize_base`.

Wiring (in inlaid_ray/cli.py `build_parser`): `add_quantize_parser(sub)`; it sets
`func(args, settings) -> int` like the other sub-commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.config import Settings
from inlaid_ray.devices import DTYPES, parse_dtype, resolve_device
from inlaid_ray.errors import InvalidRequest
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD, METHODS
from inlaid_ray.quant.quantizer import SUPPORTED_BITS



def base_dir_from_args(args: argparse.Namespace, settings: Settings) -> Path:
    if args.base:
        return Path(args.base)
    from inlaid_ray.model.prepare import prepare_smollm2

    return prepare_smollm2(settings.cache_dir)


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`inlaid-ray quantize --base DIR --task NAME=ADAPTER_DIR:CALIB.jsonl ... --out DIR`."""
    p = subparsers.add_parser(
        "quantize", help="quantize the base for a set of LoRA tasks (MLGPTQ, GPTQ-mixed/per-task, RTN)",
        description="Writes a standard GPTQ v1 checkpoint. With --stats-dir, per-task statistics are stored and "
                    "later runs (--add-task) compute only the new tasks' statistics (exact incremental MLGPTQ).")
    p.add_argument("--base", help="fp16/fp32 HF model directory (default: the converted SmolLM2)")
    p.add_argument("--task", action="append", default=[], metavar="NAME=ADAPTER_DIR:CALIB.jsonl",
                   help="a task: its PEFT adapter directory (empty = none) and calibration JSONL; repeatable")
    p.add_argument("--add-task", action="append", default=[], metavar="NAME=ADAPTER_DIR:CALIB.jsonl",
                   help="a task to add to the existing --stats-dir store (incremental); repeatable")
    p.add_argument("--out", required=True, help="output checkpoint directory (gptq-per-task: one sub-directory per task)")
    p.add_argument("--method", default=DEFAULT_SHARED_METHOD, choices=list(METHODS),
                   help=f"shared-base aggregation (default {DEFAULT_SHARED_METHOD}, the best shareable method of "
                        "load_tests/results/quant_quality.md): gptq-mixed, mlgptq (the paper's element-wise max; "
                        "collapses there), mlgptq-channel (PSD channel max), gptq-per-task, rtn")
    p.add_argument("--bits", type=int, default=4, choices=list(SUPPORTED_BITS))
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale (-1 = whole row)")
    p.add_argument("--desc-act", action="store_true", help="act-order (columns by decreasing Hessian diagonal)")
    p.add_argument("--static-groups", action="store_true", help="group scales fixed before error feedback")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (v1 cannot store a zero point of 0)")
    p.add_argument("--damp", type=float, default=0.01, help="damping as a fraction of mean(diag(H))")
    p.add_argument("--psd-repair", default="clip", choices=["clip", "shift"],
                   help="an H still indefinite after damping: clip negative eigenvalues, or shift by the smallest")
    p.add_argument("--sink-weight", type=float, default=1.0,
                   help="weight of each calibration sequence's first (attention-sink) token in the Hessians")
    p.add_argument("--pack-tokens", type=int, help="concatenate calibration sequences into windows of this many tokens")
    p.add_argument("--activation-source", default="fp16", choices=["fp16", "quantized"],
                   help="fp16: Hessians from the unquantized base (exact incremental); quantized: GPTQ-sequential")
    p.add_argument("--no-true-sequential", action="store_true", help="with --activation-source quantized: one step per block")
    p.add_argument("--no-adapter-calibration", action="store_true",
                   help="calibrate without the task adapters (the MLGPTQ_no_target ablation)")
    p.add_argument("--stats-dir", help="statistics store (created if missing, reused and extended if present): each "
                                       "task's calibration sample and the running aggregates")
    p.add_argument("--keep-task-hessians", action="store_true",
                   help="a new --stats-dir store also keeps every task's Hessians (~0.4 GB a task on SmolLM2; "
                        "gptq-per-task and the research aggregates need them)")
    p.add_argument("--tokens-per-task", type=int, help="calibration tokens per task (default: the smallest task's total)")
    p.add_argument("--max-seq-len", type=int, default=512, help="calibration sequences are cut to this length")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per calibration forward")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="calibration forward / master weight dtype")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--report", help="write the run report (tasks, timings, peak memory, per-layer GPTQ loss) as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_quantize)
    return p


def run_quantize(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.quant.calibration import CalibrationConfig
    from inlaid_ray.quant.incremental import TaskSource, quantize_base
    from inlaid_ray.quant.mlgptq import MLGPTQConfig
    from inlaid_ray.quant.quantizer import QuantGrid
    from inlaid_ray.quant.stats_store import StatsStore

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.add_task and not (args.stats_dir and StatsStore.is_store(args.stats_dir)):
        raise InvalidRequest(f"--add-task needs an existing statistics store in --stats-dir (got {args.stats_dir!r})")
    grid = QuantGrid(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=args.desc_act,
                     static_groups=args.static_groups, damp_percent=args.damp,
                     true_sequential=not args.no_true_sequential, psd_repair=args.psd_repair)
    cfg = MLGPTQConfig(method=args.method, grid=grid, activation_source=args.activation_source,
                       calibrate_with_adapter=not args.no_adapter_calibration, batch_tokens=args.batch_tokens,
                       device=str(resolve_device(args.device)), dtype=parse_dtype(args.dtype),
                       sink_weight=args.sink_weight)
    calib = CalibrationConfig(tokens_per_task=args.tokens_per_task, max_seq_len=args.max_seq_len, seed=args.seed,
                              pack_tokens=args.pack_tokens)
    sources = [TaskSource.parse(s) for s in [*args.task, *args.add_task]]
    report = quantize_base(base_dir_from_args(args, settings), sources, args.out, cfg, calib, args.stats_dir,
                           args.overwrite, keep_task_hessians=args.keep_task_hessians)
    if args.stats_dir and StatsStore.is_store(args.stats_dir):
        StatsStore.open(args.stats_dir).forget_previous()  # nothing rolls back to it
    res = report["resources"]["total"]
    print(f"{args.method} {args.bits}-bit g{args.group_size}: tasks {report['tasks']} "
          f"(statistics computed for {report['computed_tasks']}) -> {', '.join(report['out_dirs'].values())}")
    print(f"time {res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MiB"
          + (f", CUDA peak {res['cuda_peak_mb']:.0f} MiB" if "cuda_peak_mb" in res else ""))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0
