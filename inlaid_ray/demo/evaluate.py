"""Evaluate demo tasks with an injected generation function (so any engine can be plugged in),
and compare SmolLM2 with and without each task's adapter using transformers + peft greedy decoding.

`python -m inlaid_ray.demo.evaluate` writes results/adapter_eval.json (+ .md table, .png chart)
and results/predictions_<task>.jsonl, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.demo.data import load_examples
from inlaid_ray.demo.paths import ADAPTERS_DIR, RESULTS_DIR, demo_adapter_dir
from inlaid_ray.demo.task_base import DemoTask
from inlaid_ray.demo.tasks import DEMO_TASKS, get_task
from inlaid_ray.model.config import LINEAR_MODULES

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
# (chat prompts, max new tokens) -> one completion string per prompt, in order.
GenerateFn = Callable[[list[Messages], int], list[str]]


def evaluate_task(
    task: str | DemoTask,
    generate_fn: GenerateFn,
    split: str = "eval",
    limit: int | None = None,
    data_dir: Path | None = None,
    token_counter: Callable[[str], int] | None = None,
) -> dict[str, Any]:
    """Generate for the first `limit` records of `split` and score them against the references.

    Returns n, the mean of every metric, per-example scores and predictions, and (with a
    `token_counter`) the mean output length in tokens.
    """
    task = get_task(task) if isinstance(task, str) else task
    records = load_examples(task.name, split, data_dir)[:limit]
    if not records:
        raise ValueError(f"no {split!r} records for task {task.name!r} (limit={limit})")
    predictions = generate_fn([r["messages"][:1] for r in records], task.max_new_tokens)
    if len(predictions) != len(records):
        raise ValueError(f"generate_fn returned {len(predictions)} completions for {len(records)} prompts")
    scores = [task.score(p, r["completion"]) for p, r in zip(predictions, records)]
    result: dict[str, Any] = {
        "task": task.name,
        "split": split,
        "n": len(records),
        "primary_metric": task.primary_metric,
        "metrics": {k: statistics.fmean(s[k] for s in scores) for k in scores[0]},
        "per_example": scores,
        "predictions": predictions,
    }
    if token_counter is not None:
        result["mean_output_tokens"] = statistics.fmean(token_counter(p) for p in predictions)
    return result


def hf_generate_fn(
    base_dir: Path,
    adapter_dir: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> GenerateFn:
    """Greedy generation with transformers (+ the PEFT adapter in `adapter_dir`), left-padded batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
    model.eval()
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    @torch.inference_mode()
    def generate(prompts: list[Messages], max_tokens: int) -> list[str]:
        outputs: list[str] = []
        label = Path(adapter_dir).name if adapter_dir is not None else "base"
        for start in Progress(range(0, len(prompts), batch_size), desc=f"generate {label}", unit="batch", leave=False):
            texts = [
                tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                for m in prompts[start : start + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return outputs

    return generate


def _token_counter(base_dir: Path) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adapter_summary(adapter_dir: Path) -> dict[str, Any]:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "use_rslora": cfg.get("use_rslora", False),
        "target_modules": [m for m in LINEAR_MODULES if m in cfg["target_modules"]],
    }


def _side(result: dict[str, Any]) -> dict[str, Any]:
    """The part of an evaluate_task result stored per model in adapter_eval.json."""
    return {
        "metrics": result["metrics"],
        "mean_output_tokens": result.get("mean_output_tokens"),
        "per_example": [s[result["primary_metric"]] for s in result["per_example"]],
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per task: primary metric base vs adapter, other adapter metrics, lengths."""
    rows = [
        "| task | adapter (r, targets) | metric | base | adapter | other adapter metrics | n | "
        "ref tokens | base out tokens | adapter out tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["tasks"].items():
        metric, cfg = entry["primary_metric"], entry["adapter_config"]
        targets = "all 7 linears" if len(cfg["target_modules"]) == 7 else ",".join(cfg["target_modules"])
        others = ", ".join(
            f"{k} {entry['base']['metrics'][k]:.3f} -> {v:.3f}"
            for k, v in entry["adapter"]["metrics"].items()
            if k != metric
        )
        rows.append(
            f"| {name} | r={cfg['r']}{' rsLoRA' if cfg['use_rslora'] else ''}, {targets} | {metric} | "
            f"{entry['base']['metrics'][metric]:.3f} | {entry['adapter']['metrics'][metric]:.3f} | "
            f"{others or '-'} | {entry['n']} | {entry['reference_mean_tokens']:.1f} | "
            f"{entry['base']['mean_output_tokens']:.1f} | {entry['adapter']['mean_output_tokens']:.1f} |"
        )
    return "\n".join(rows)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars: primary metric of base vs adapter per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["tasks"])
    base = [summary["tasks"][n]["base"]["metrics"][summary["tasks"][n]["primary_metric"]] for n in names]
    adapted = [summary["tasks"][n]["adapter"]["metrics"][summary["tasks"][n]["primary_metric"]] for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, values, label in ((-0.2, base, "SmolLM2 base"), (0.2, adapted, "+ task LoRA")):
        bars = ax.bar([x + offset for x in xs], values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(xs), [f"{n}\n({summary['tasks'][n]['primary_metric']})" for n in names])
    ax.set(ylim=(0, 1.25), ylabel="score on eval split", title="Demo adapters vs base model")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_demo_adapters(
    base_dir: Path,
    tasks: Sequence[str] | None = None,
    adapters_dir: Path = ADAPTERS_DIR,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(summary for adapter_eval.json, per-task prediction rows) of base vs adapter on each eval split."""
    counter = _token_counter(base_dir)
    base_fn = hf_generate_fn(base_dir, None, device=device, batch_size=batch_size)
    summary: dict[str, Any] = {
        "base_model": "SmolLM2-135M-Instruct",
        "split": "eval",
        "decoding": "greedy, transformers + peft, float32",
        "tasks": {},
    }
    predictions: dict[str, list[dict[str, Any]]] = {}
    for name in tasks or list(DEMO_TASKS):
        adapter_dir = demo_adapter_dir(name, adapters_dir)
        base = evaluate_task(name, base_fn, limit=limit, token_counter=counter)
        adapted = evaluate_task(
            name, hf_generate_fn(base_dir, adapter_dir, device=device, batch_size=batch_size),
            limit=limit, token_counter=counter,
        )
        records = load_examples(name, "eval")[: base["n"]]
        summary["tasks"][name] = {
            "primary_metric": base["primary_metric"],
            "n": base["n"],
            "max_new_tokens": get_task(name).max_new_tokens,
            "reference_mean_tokens": statistics.fmean(r["completion_tokens"] for r in records),
            "adapter_config": _adapter_summary(adapter_dir),
            "base": _side(base),
            "adapter": _side(adapted),
        }
        predictions[name] = [
            {"prompt": r["prompt"], "reference": r["completion"], "base": b, "adapter": a}
            for r, b, a in zip(records, base["predictions"], adapted["predictions"])
        ]
        metric = base["primary_metric"]
        log.info("%s %s: base %.3f adapter %.3f", name, metric, base["metrics"][metric], adapted["metrics"][metric])
    return summary, predictions


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate every demo adapter against the base model and write results/adapter_eval.*."""
    from inlaid_ray.config import Settings
    from inlaid_ray.demo.data import write_jsonl
    from inlaid_ray.model.prepare import prepare_smollm2

    parser = argparse.ArgumentParser(prog="python -m inlaid_ray.demo.evaluate", description=main.__doc__)
    parser.add_argument("--tasks", nargs="*", default=list(DEMO_TASKS), choices=list(DEMO_TASKS))
    parser.add_argument("--base-dir", type=Path, default=None, help="HF model dir (default: converted SmolLM2)")
    parser.add_argument("--adapters-dir", type=Path, default=ADAPTERS_DIR)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    base_dir = args.base_dir or prepare_smollm2(Settings.from_env().cache_dir)
    summary, predictions = evaluate_demo_adapters(
        base_dir, args.tasks, args.adapters_dir, args.limit, args.batch_size, args.device
    )
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "adapter_eval.json"
    if path.is_file():  # keep tasks that were not re-evaluated this time
        previous = json.loads(path.read_text())
        summary["tasks"] = {**previous.get("tasks", {}), **summary["tasks"]}
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for name, rows in predictions.items():
        write_jsonl(out / f"predictions_{name}.jsonl", rows)
    table = markdown_table(summary)
    (out / "adapter_eval.md").write_text(table + "\n")
    plot_summary(summary, out / "adapter_eval.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
