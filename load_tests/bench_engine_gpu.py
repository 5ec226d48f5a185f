"""Engine-level load test on a GPU (issue 9, item 3): a Llama-2-7B-shaped model with random 4-bit
GPTQ codes (group 128, fp16 activations), 1..1000 synthetic rank-16 adapters resident in one
bank, a Poisson (or gamma) workload with the paper's length profiles
(`inlaid_ray.bench.workload`), and the scheduling policies fifo / mlfq / srtf-task-cap / srtf-cost. No Ray, no HTTP:
the engine is driven directly, in real time, by `engine_load.drive`.

Same load everywhere: the workload (arrival times, prompt and output lengths, prompts, predicted
lengths) is drawn once for the largest adapter count; with N adapters request r uses adapter
(task index of r) mod N. A request ends at its drawn output length (see engine_load.py).

The rate is `load` x the replica's capacity estimated from a calibration (prefill cost per token,
decode step time at full batch) so the run is overloaded by the same factor on any GPU; the SLO
of a request is a multiple (2x, 5x, 10x) of its isolated latency from the same calibration (the
definition of `inlaid_ray/bench/sim_metrics.py`). Reported per run: generated tokens/s (every token
sampled / run wall time: the service rate of the overloaded replica), output tokens/s of finished
requests, mean/p99 latency (= JCT), TTFT, SLO attainment, distinct tasks per step; and the
1000-vs-1 adapter ratio of generated tokens/s (target >= 0.9, docs/performance.md). A run is cut
(remaining requests cancelled, failing their SLO) after `run_timeout_s`.

Memory: the bank holds [layers, slots, rank, d_in] + [layers, slots, d_out, rank] per adapted
projection kind. At rank 16 on all 32 layers in fp16 one adapter costs 8.4 MB per 4096x4096
projection and 80 MB on all seven linears, so 1000 adapters on all seven would need 80 GB; the
default targets q,v (PEFT's default LoRA targets for Llama): 16.8 GB for 1000 adapters.

    python load_tests/bench_engine_gpu.py --kernels ops --out $OUT/engine_gpu_load_h100.json
    python load_tests/bench_engine_gpu.py --device cpu --shape tiny --adapter-counts 1,10 --num-requests 24  # dry run
    python load_tests/bench_engine_gpu.py --plot load_tests/results/engine_gpu_load_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    BENCH_LORA_INIT, RESULTS, SHAPES, device_info, fill_random_gptq, gptq_factory, kernel_paths, model_bytes,
    use_kernel_ops, write_json,
)
from engine_load import calibrate, capacity_req_per_s, drive, make_workload  # noqa: E402
from inlaid_ray.bench.load_stats import summarize  # noqa: E402

from inlaid_ray.engine import EngineConfig, LLMEngine  # noqa: E402
from inlaid_ray.lora import AdapterBank  # noqa: E402
from inlaid_ray.lora.synthetic import random_lora_adapter  # noqa: E402
from inlaid_ray.model import PagedKVCache, random_model  # noqa: E402
from inlaid_ray.model.transformer import fuse_projections  # noqa: E402
from inlaid_ray.sched import make_policy  # noqa: E402
from inlaid_ray.bench.workload import WorkloadConfig  # noqa: E402

SLO_MULTIPLES = (2.0, 5.0, 10.0)  # of the isolated latency


@dataclass(frozen=True)
class GpuBenchConfig:
    """Knobs of the run; defaults are the H100 run."""

    device: str = "cuda"
    shape: str = "llama-2-7b"
    kernels: str = "ops"  # ops: inlaid_ray.kernels.ops (Triton on CUDA); auto: what the modules select
    adapter_counts: tuple[int, ...] = (1, 10, 100, 1000)
    sweep_policy: str = "fifo"  # policy of the adapter-count sweep
    policies: tuple[str, ...] = ("fifo", "mlfq", "srtf-cost")  # compared at the largest adapter count
    rank: int = 16
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_requests: int = 160
    load: float = 1.5  # offered rate / estimated capacity (> 1 = overload)
    rate: float | None = None  # fixed requests/s instead of load x capacity
    arrival: str = "poisson"
    cv: float = 1.0
    max_prompt_tokens: int = 1024
    max_output_tokens: int = 256
    prediction_sigma: float = 0.5  # log-error of the predicted output length handed to the policy
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    kv_gb: float = 16.0  # KV cache budget
    cuda_graphs: bool = False  # replay decode steps as CUDA graphs (EngineConfig.cuda_graphs)
    run_timeout_s: float | None = None  # cut a run (cancel the rest) after this; None: 2 x (arrivals + drain estimate)
    time_budget_s: float = 300.0  # whole script; later runs are skipped past it
    threads: int | None = 1  # CPU dry runs: 1 thread (OpenMP stalls on the shared 2-core dev machine)
    seed: int = 0


# ------------------------------------------------------------------------------ set-up


def build_model_and_bank(cfg: GpuBenchConfig) -> tuple[Any, AdapterBank, dict[str, Any]]:
    """4-bit random model + a bank holding max(adapter_counts) random adapters named task-NNNN."""
    config = SHAPES[cfg.shape]
    dtype = torch.float16 if torch.device(cfg.device).type == "cuda" else torch.float32
    t0 = time.monotonic()
    model = random_model(config, dtype=dtype, device=cfg.device, seed=cfg.seed, make_linear=gptq_factory(cfg.device, cfg.kernels))
    fill_random_gptq(model, cfg.seed)
    n = max(cfg.adapter_counts)
    bank = AdapterBank(config, max_slots=n, max_rank=cfg.rank, dtype=dtype, device=cfg.device)
    for i in Progress(range(n), desc="adapters", unit="adapter"):
        bank.add(random_lora_adapter(config, f"task-{i:04d}", cfg.rank, cfg.modules, cfg.seed + i, dtype=dtype,
                                     device=cfg.device, base_model=config.name_or_path or None, **BENCH_LORA_INIT))
    use_kernel_ops(bank, cfg.kernels)
    info = {"model": f"{config.name_or_path}, GPTQ 4-bit group 128 random codes, {dtype} activations",
            "model_bytes": model_bytes(model), "bank": bank.stats(), "setup_s": time.monotonic() - t0,
            "kernel_paths": kernel_paths(bank, model, cfg.device)}
    info["fused_projection_groups"] = fuse_projections(model)  # as the serving builder does
    return model, bank, info


def make_engine(model: Any, bank: AdapterBank, cfg: GpuBenchConfig, policy: str) -> LLMEngine:
    per_block = PagedKVCache.bytes_per_block(model.config, 16, model.dtype)
    ecfg = EngineConfig(
        block_size=16, num_kv_blocks=int(cfg.kv_gb * 1e9) // per_block, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_prompt_tokens + cfg.max_output_tokens,
        cuda_graphs=cfg.cuda_graphs,
    )
    return LLMEngine(model, None, ecfg, adapter_bank=bank, policy=make_policy(policy))


def _release() -> None:
    """Return freed GPU memory (the caller dropped its engine first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ the run


def headline(summary: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    """The figures a person compares across runs."""
    keys = ("num_requests", "num_ok", "throughput_tokens_per_s", "throughput_req_per_s", "e2e_latency_mean_s",
            "e2e_latency_p99_s", "jct_mean_s", "ttft_mean_s", "ttft_p99_s", "itl_mean_s")
    out = {k: summary.get(k) for k in keys}
    out.update({f"slo_attainment_{k}": v for k, v in summary["slo_attainment_at"].items()})
    out.update(steps)
    return out


def run(cfg: GpuBenchConfig, out: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    if cfg.threads and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    over = lambda: time.monotonic() - t_start > cfg.time_budget_s  # noqa: E731
    model, bank, info = build_model_and_bank(cfg)
    result: dict[str, Any] = {
        "benchmark": "engine under a Poisson multi-task load, 1..1000 adapters, fifo/mlfq/inlaid (no Ray)",
        "device": device_info(cfg.device), "config": asdict(cfg), **info,
        "adapters": f"random rank-{cfg.rank} adapters on {list(cfg.modules)} of all {model.config.num_layers} layers "
                    "(q,v = PEFT's default LoRA targets for Llama; all seven linears x 1000 would need ~80 GB)",
        "definitions": "inlaid_ray/bench/load_stats.py (latency from arrival; SLO = k x isolated latency of the request)",
        "runs": [], "skipped": [],
    }
    engine = make_engine(model, bank, cfg, cfg.sweep_policy)
    cal = calibrate(engine, cfg.max_prompt_tokens, model.config.vocab_size, cfg.seed)
    wl = WorkloadConfig(  # at rate 1: `drive` divides arrival times by the chosen rate
        num_tasks=max(cfg.adapter_counts), num_requests=cfg.num_requests, rate=1.0, arrival=cfg.arrival, cv=cfg.cv,
        max_prompt_tokens=cfg.max_prompt_tokens, max_output_tokens=cfg.max_output_tokens,
        prediction="noisy", prediction_sigma=cfg.prediction_sigma, seed=cfg.seed,
    )
    reqs, wstats = make_workload(wl, model.config.vocab_size)
    cap = capacity_req_per_s(cal, wstats["mean_prompt_tokens"], wstats["mean_output_tokens"])
    rate = cfg.rate or cfg.load * cap
    result.update(calibration=cal, workload=wstats, capacity_estimate_req_per_s=cap, rate_req_per_s=rate)
    engine = None
    _release()
    write_json(out, result)
    plan = [(cfg.sweep_policy, n) for n in sorted(cfg.adapter_counts)]
    plan += [(p, max(cfg.adapter_counts)) for p in cfg.policies if p != cfg.sweep_policy]
    timeout = cfg.run_timeout_s or 2.0 * (reqs[-1].arrival_s / rate + len(reqs) / cap)
    result["run_timeout_s"] = timeout
    for policy, n in Progress(plan, desc="runs", unit="run"):
        if over():
            result["skipped"].append(f"{policy} x {n} adapters: time budget {cfg.time_budget_s}s spent")
            continue
        engine = make_engine(model, bank, cfg, policy)  # fresh queues, policy state and KV cache per run
        records, steps = drive(engine, reqs, rate, n, cal, timeout)
        summary = summarize(records, SLO_MULTIPLES)
        result["runs"].append({"policy": policy, "num_adapters": n, **headline(summary, steps), "summary": summary})
        write_json(out, result)
        engine = None
        _release()
    sweep = {r["num_adapters"]: r for r in result["runs"] if r["policy"] == cfg.sweep_policy}
    lo, hi = min(cfg.adapter_counts), max(cfg.adapter_counts)
    if lo in sweep and hi in sweep and sweep[lo]["generated_tokens_per_s"]:
        # Under overload the engine is never idle: tokens generated per second is its service rate.
        result[f"throughput_ratio_{hi}_vs_{lo}_adapters"] = (
            sweep[hi]["generated_tokens_per_s"] / sweep[lo]["generated_tokens_per_s"])
    at = {r["policy"]: r for r in result["runs"] if r["num_adapters"] == hi}
    if "fifo" in at:
        for p, r in at.items():
            if p != "fifo":
                f = at["fifo"]
                result[f"{p}_vs_fifo"] = {
                    "slo_attainment_5x_ratio": _ratio(r.get("slo_attainment_5x"), f.get("slo_attainment_5x")),
                    "jct_mean_ratio_fifo_over_policy": _ratio(f.get("jct_mean_s"), r.get("jct_mean_s")),
                }
    result["elapsed_s"] = time.monotonic() - t_start
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput and SLO attainment vs adapter count (sweep) and per policy (largest count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    sweep = sorted((r for r in result["runs"] if r["policy"] == cfg["sweep_policy"]), key=lambda r: r["num_adapters"])
    hi = max(cfg["adapter_counts"])
    pol = [r for r in result["runs"] if r["num_adapters"] == hi]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    key = "generated_tokens_per_s" if all("generated_tokens_per_s" in r for r in sweep) else "throughput_tokens_per_s"
    ax.plot([r["num_adapters"] for r in sweep], [r.get(key) or 0 for r in sweep], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("distinct adapters in the load")
    ax.set_ylabel("generated tokens/s" if key == "generated_tokens_per_s" else "output tokens/s (finished requests)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{cfg['sweep_policy']}: throughput vs adapters")
    names = [r["policy"] for r in pol]
    axes[1].bar(names, [r.get("slo_attainment_5x") or 0 for r in pol])
    axes[1].set_title(f"SLO attainment (5x isolated), {hi} adapters")
    axes[2].bar(names, [r.get("jct_mean_s") or 0 for r in pol])
    axes[2].set_title("mean JCT (s)")
    fig.suptitle(f"{result['device'].get('device_name')}: {result['model']}, load {cfg['load']}x capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[GpuBenchConfig, Path, Path | None]:
    d = GpuBenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=d.device)
    p.add_argument("--shape", choices=sorted(SHAPES), default=d.shape)
    p.add_argument("--kernels", choices=("auto", "ops"), default=d.kernels)
    p.add_argument("--adapter-counts", default=",".join(map(str, d.adapter_counts)))
    p.add_argument("--policies", default=",".join(d.policies))
    p.add_argument("--modules", default=",".join(d.modules))
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--load", type=float, default=d.load)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--arrival", choices=("poisson", "gamma"), default=d.arrival)
    p.add_argument("--cv", type=float, default=d.cv)
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-output-tokens", type=int, default=d.max_output_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--kv-gb", type=float, default=d.kv_gb)
    p.add_argument("--run-timeout-s", type=float, default=None)
    p.add_argument("--time-budget-s", type=float, default=d.time_budget_s)
    p.add_argument("--out", type=Path, default=RESULTS / "engine_gpu_load.json")
    p.add_argument("--plot", type=Path, default=None, help="only draw the PNG of an existing JSON")
    a = p.parse_args(argv)
    cfg = replace(
        d, device=a.device, shape=a.shape, kernels=a.kernels,
        adapter_counts=tuple(int(x) for x in a.adapter_counts.split(",")), policies=tuple(a.policies.split(",")),
        modules=tuple(a.modules.split(",")), rank=a.rank, num_requests=a.num_requests, load=a.load, rate=a.rate,
        arrival=a.arrival, cv=a.cv, max_prompt_tokens=a.max_prompt_tokens, max_output_tokens=a.max_output_tokens,
        max_num_seqs=a.max_num_seqs, kv_gb=a.kv_gb, run_timeout_s=a.run_timeout_s, time_budget_s=a.time_budget_s,
    )
    return cfg, a.out, a.plot


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out, plot_only = parse_args(argv)
    if plot_only is not None:
        plot(json.loads(plot_only.read_text()), plot_only.with_suffix(".png"))
        return
    result = run(cfg, out)
    write_json(out, result)
    for r in result["runs"]:
        print(f"{r['policy']:>6} x {r['num_adapters']:>4} adapters: {r['generated_tokens_per_s'] or 0:8.1f} tok/s, "
              f"JCT {r['jct_mean_s'] or float('nan'):6.2f}s, p99 {r['e2e_latency_p99_s'] or float('nan'):6.2f}s, "
              f"SLO(5x) {r.get('slo_attainment_5x') or 0:.2f}, tasks/step {r['tasks_per_step_mean'] or 0:.1f}")
    for k, v in result.items():
        if k.startswith("throughput_ratio") or k.endswith("_vs_fifo"):
            print(k, v)
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no PNG (draw it later with --plot)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
