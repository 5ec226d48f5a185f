"""`inlaid-ray eval`: the demo tasks' own metrics and eval loss of the base and of quantized bases
with the task adapters (`inlaid_ray.demo.quality.evaluate_dir`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.config import Settings
from inlaid_ray.demo.paths import demo_adapter_dir
from inlaid_ray.demo.tasks import DEMO_TASKS
from inlaid_ray.devices import resolve_device
from inlaid_ray.quant.cli import base_dir_from_args


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`inlaid-ray eval --base DIR [--quantized DIR] --task NAME[=ADAPTER_DIR] ...`."""
    p = subparsers.add_parser(
        "eval", help="demo-task metric and eval loss of the base and/or quantized bases with the task adapters",
        description="Greedy generations through the engine (all adapters in one bank on one base) scored with each "
                    "demo task's own metric, plus the teacher-forced eval loss, on the task's eval split.")
    p.add_argument("--base", help="unquantized model directory (default: the converted SmolLM2)")
    p.add_argument("--quantized", action="append", default=[], metavar="DIR",
                   help="GPTQ checkpoint (or gptq-per-task output directory); repeatable")
    p.add_argument("--no-base", action="store_true", help="evaluate only the --quantized models")
    p.add_argument("--task", action="append", default=[], metavar="NAME[=ADAPTER_DIR]",
                   help="demo task (adapter default: the committed demo adapter; NAME= for none); default: all")
    p.add_argument("--limit", type=int, help="generation examples per task (default: the whole eval split)")
    p.add_argument("--loss-limit", type=int, help="eval-loss examples per task (default: the whole eval split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the results (with predictions) to this file")
    p.set_defaults(func=run_eval)
    return p


def _parse_eval_tasks(specs: list[str]) -> dict[str, Path | None]:
    out: dict[str, Path | None] = {}
    for spec in specs or list(DEMO_TASKS):
        name, sep, adapter = spec.partition("=")
        out[name] = (Path(adapter) if adapter else None) if sep else demo_adapter_dir(name)
    return out


def run_eval(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.model.tokenizer import load_tokenizer
    from inlaid_ray.demo.quality import evaluate_dir, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_dir_from_args(args, settings)
    tasks = _parse_eval_tasks(args.task)
    tokenizer = load_tokenizer(base)
    models = ([] if args.no_base else [("base", base)]) + [(str(q), Path(q)) for q in args.quantized]
    if not models:
        raise SystemExit("nothing to evaluate: --no-base without --quantized")
    device = str(resolve_device(args.device))
    results = {name: evaluate_dir(path, tokenizer, tasks, args.limit, args.loss_limit, device) for name, path in models}
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0
