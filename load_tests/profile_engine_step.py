"""Where an engine step's time goes (the ~0.17 s fixed step of the H100 engine runs, which a
7B 4-bit decode step should not need): the GPU bench's model and adapter bank
(`bench_engine_gpu.build_model_and_bank`), `batch` decoding requests over distinct adapters,
then `torch.profiler` over a few steps. Reported per step: wall time, CPU time of the Python
thread, GPU kernel time (CUDA), the ops with the most self CPU and self device time, and the
number of kernel launches and host syncs (cudaStreamSynchronize / cudaMemcpy D2H). Each batch
runs eagerly and with CUDA-graph replay of its decode steps (`--modes`), in the same run.

    python load_tests/profile_engine_step.py --out $OUT/engine_step_profile.json           # H100
    python load_tests/profile_engine_step.py --device cpu --shape tiny --out /tmp/p.json    # dry run

Writes the JSON and, beside it, the profiler's tables (`.txt`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, device_info, sync  # noqa: E402
from bench_engine_gpu import GpuBenchConfig, build_model_and_bank, make_engine  # noqa: E402

from inlaid_ray.engine import SamplingParams  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def decode_engine(cfg: GpuBenchConfig, batch: int, prompt_tokens: int) -> Any:
    """An engine with `batch` requests past their prefill, each on its own adapter."""
    model, bank, _ = build_model_and_bank(cfg)
    engine = make_engine(model, bank, cfg, "fifo")
    params = SamplingParams(max_tokens=engine.max_model_len - prompt_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(list(range(1, prompt_tokens + 1)), params, task=f"task-{i % max(cfg.adapter_counts):04d}")
    for _ in range(4):  # prefill, then warm decode steps (Triton compiles; a graph is captured on the 2nd)
        engine.step()
    return engine


def profile_steps(engine: Any, device: str, steps: int) -> tuple[dict[str, Any], str]:
    """Per-step figures and the profiler tables over `steps` decode steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities):  # the first profiler session pays its own start-up
        engine.step()
    sync(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    wall, cpu = (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / steps
    counts = {name: sum(e.count for e in events if e.key == name) / steps for name in SYNC_EVENTS + LAUNCH_EVENTS}
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    top_dev = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    summary = {
        "step_wall_ms": 1e3 * wall,
        "step_thread_cpu_ms": 1e3 * cpu,  # with the profiler's own overhead
        "step_device_kernel_ms": device_us / 1e3,
        "launches_per_step": sum(counts[n] for n in LAUNCH_EVENTS),
        "host_syncs_per_step": {n: counts[n] for n in SYNC_EVENTS if counts[n]},
        "top_self_cpu_ms_per_step": {e.key[:80]: e.self_cpu_time_total / 1e3 / steps for e in top_cpu},
        "top_self_device_ms_per_step": {e.key[:80]: e.self_device_time_total / 1e3 / steps for e in top_dev
                                        if e.self_device_time_total},
    }
    sort_dev = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
    tables = (events.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
              + events.table(sort_by=sort_dev, row_limit=40))
    return summary, tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--kernels", choices=("auto", "ops"), default="ops")
    p.add_argument("--batches", default="1,32", help="decode batch sizes to profile")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters in the bank (requests cycle over them)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="eager,graphs", help="eager and/or graphs (CUDA-graph replay of decode steps)")
    p.add_argument("--out", type=Path, default=Path("engine_step_profile.json"))
    a = p.parse_args()
    cfg = replace(GpuBenchConfig(), device=a.device, shape=a.shape, kernels=a.kernels, adapter_counts=(a.adapters,),
                  kv_gb=4.0 if a.device == "cuda" else 0.05)
    if cfg.threads is not None and torch.device(a.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = {"device": device_info(a.device), "shape": a.shape, "kernels": a.kernels,
                              "prompt_tokens": a.prompt_tokens, "steps": a.steps, "batches": {}}
    texts = []
    for batch in (int(b) for b in a.batches.split(",")):
        for mode in a.modes.split(","):
            engine = decode_engine(replace(cfg, cuda_graphs=mode == "graphs"), batch, a.prompt_tokens)
            summary, tables = profile_steps(engine, a.device, a.steps)
            graphs = engine.decode_graphs
            summary["graph_replays"] = graphs.num_replays if graphs is not None else 0
            key = str(batch) if mode == "eager" else f"{batch}-graphs"
            result["batches"][key] = summary
            texts.append(f"===== batch {batch} {mode}\n{tables}")
            print(f"batch {batch} {mode}: {summary['step_wall_ms']:.1f} ms/step wall, "
                  f"{summary['step_thread_cpu_ms']:.1f} ms CPU, {summary['step_device_kernel_ms']:.1f} ms of kernels, "
                  f"{summary['launches_per_step']:.0f} launches, syncs {summary['host_syncs_per_step']}")
            del engine
        if str(batch) in result["batches"] and f"{batch}-graphs" in result["batches"]:
            e, g = result["batches"][str(batch)], result["batches"][f"{batch}-graphs"]
            print(f"batch {batch}: graphs / eager step wall = {g['step_wall_ms'] / e['step_wall_ms']:.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".txt").write_text("\n\n".join(texts))
    print(f"wrote {a.out} and {a.out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
