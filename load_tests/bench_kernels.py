"""GPU benchmark of the Triton kernels (docs/performance.md targets), run on an H100:

1. W4A16 GEMM (GPTQ v1, group 128) for Llama-7B/13B layer shapes and M in 1..256: tunes the
   launch config per (shape, M) over a candidate grid, checks the winner against a dense fp32
   matmul, and times it against fp16 cuBLAS (`F.linear`) and dequantize-then-cuBLAS; achieved
   bandwidth as a fraction of a device-to-device copy measured in the same run.
2. Multi-LoRA overhead over the 4096 x 4096 base layer, batch 32, rank 16, 1..32 distinct
   adapters (and 64 in a batch of 64); compressed (shared basis, full/diag core) vs raw.

Every time is a median over CUDA-graph replays of calls rotating over enough weight copies to
overflow L2 (so weights stream from HBM, as in decode). Writes the results JSON (with the GPU
name) and the tuned `kernels/configs/<gpu>.json` to --out. Run from the repo root:
    PYTHONPATH=. python load_tests/bench_kernels.py --out $OUT
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from inlaid_ray.progress import Progress

from inlaid_ray.kernels.compressed_lora import CompressedLoRABatch, compressed_lora
from inlaid_ray.kernels.gptq_gemm import GPTQGemmConfig, gptq_matmul
from inlaid_ray.kernels.lora_sgmv import ExpandConfig, ShrinkConfig, lora_shrink_expand
from inlaid_ray.kernels.tuning import gpu_config_name
from inlaid_ray.model.forward_batch import LoRABatch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824)]  # (K = d_in, N = d_out)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
GROUP = 128
L2_FLUSH_BYTES = 200e6  # rotate over weight copies totalling this much (H100 L2: 50 MB)


def candidates(m: int) -> list[GPTQGemmConfig]:
    """Launch configs tried for a batch of m rows."""
    c = GPTQGemmConfig
    out: list[GPTQGemmConfig] = []
    if m == 1:
        out += [c(1, bn, bk, sk, 4, 3) for bn in (32, 64, 128) for bk in (64, 128) for sk in (1, 4, 8, 16)]
        out += [c(1, bn, bk, sk, 4, 3, split_k_reduce="last") for bn in (32, 64, 128) for bk in (64, 128)
                for sk in (4, 8, 16)]  # one kernel: no zero fill, no cast (gptq_gemm docstring)
    if m <= 16:
        out += [c(16, bn, 128, sk, 4, 3, swap_ab=sw) for bn in (32, 64, 128) for sk in (1, 2, 4, 8) for sw in (False, True)]
        out += [c(16, bn, 128, sk, 4, 3, swap_ab=True, split_k_reduce="last") for bn in (32, 64, 128) for sk in (2, 4, 8)]
        out += [c(16, 256, bk, sk, w, 3, swap_ab=True) for bk in (64, 128) for sk in (1, 2, 4) for w in (4, 8)]
        out += [c(16, bn, 128, sk, 4, 3, swap_ab=sw, interleave=True) for bn in (64, 128) for sk in (2, 4, 8)
                for sw in (False, True)]
    elif m <= 64:
        out += [c(bm, bn, 128, sk, 4, 3, swap_ab=sw) for bm in (32, 64) for bn in (64, 128) for sk in (1, 2, 4)
                for sw in ((False, True) if bm == 32 else (False,))]
        out += [c(32, bn, 128, sk, 4, 3, swap_ab=True, interleave=True) for bn in (64, 128) for sk in (2, 4)]
    else:
        out += [c(bm, bn, bk, sk, w, 3) for bm in (64, 128) for bn in (64, 128) for bk in (64, 128) for sk in (1, 2)
                for w in (4, 8)]
    return out


def all_candidates() -> list[GPTQGemmConfig]:
    return sorted({cfg for m in MS for cfg in candidates(m)}, key=str)


def _compile_worker(cfgs: list[dict]) -> int:
    """Compile configs in a child process (fills Triton's on-disk cache; same specialization as
    the real shapes: every dim and stride is a multiple of 16 and M is not specialized)."""
    ok = 0
    x = torch.randn(16, 1024, device="cuda", dtype=torch.float16)
    qw = torch.randint(-(2**31), 2**31 - 1, (128, 256), device="cuda", dtype=torch.int32)
    qz = torch.randint(-(2**31), 2**31 - 1, (8, 32), device="cuda", dtype=torch.int32)
    sc = torch.rand(8, 256, device="cuda").half()
    gi = (torch.arange(1024, device="cuda") // GROUP).int()
    for d in cfgs:
        try:
            gptq_matmul(x, qw, qz, sc, gi, 4, group_size=GROUP, config=GPTQGemmConfig(**d))
            ok += 1
        except Exception as e:  # a config the compiler rejects is dropped from the grid later
            print(f"compile failed for {d}: {type(e).__name__}: {e}")
    torch.cuda.synchronize()
    return ok


def precompile(cfgs: list[GPTQGemmConfig], workers: int) -> None:
    chunks = [[asdict(c) for c in cfgs[i::workers]] for i in range(workers)]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        done = sum(pool.map(_compile_worker, chunks))
    print(f"precompiled {done}/{len(cfgs)} GPTQ configs in {workers} processes")


def time_calls(fns: list, reps: int = 15) -> float:
    """Median seconds per call over CUDA-graph replays of `fns` (one call each, in order)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times)


def gptq_weights(k: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random GPTQ v1 tensors (4-bit codes, group 128) on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ng = k // GROUP
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=gen),
        "qzeros": torch.randint(-(2**31), 2**31 - 1, (ng, n // 8), device="cuda", dtype=torch.int32, generator=gen),
        "scales": (torch.rand(ng, n, device="cuda", generator=gen) * 0.01 + 0.002).half(),
        "g_idx": (torch.arange(k, device="cuda") // GROUP).int(),
    }


def dequant_torch(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense fp16 W [N, K] from GPTQ tensors with plain torch ops (the 'dequantize first' path)."""
    shifts = torch.arange(0, 32, 4, device="cuda", dtype=torch.int32)
    q = ((w["qweight"][:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, w["qweight"].shape[1])  # [K, N]
    z = ((w["qzeros"][:, :, None] >> shifts[None, None, :]) & 15).reshape(w["qzeros"].shape[0], -1) + 1  # [G, N]
    g = w["g_idx"].long()
    return ((q - z[g]).half() * w["scales"][g]).t().contiguous()


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def gptq_call(x, w, cfg):
    return lambda: gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], 4, group_size=GROUP, config=cfg)


def bench_gptq(copy_bw: float, reps: int, partial: Path) -> tuple[list[dict], dict]:
    rows, tuned = [], {}
    for k, n in SHAPES:
        w4_bytes = nbytes(*gptq_weights(k, n, 0).values())
        ws = [gptq_weights(k, n, i) for i in range(max(2, math.ceil(L2_FLUSH_BYTES / w4_bytes)))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
                 for _ in range(max(2, math.ceil(L2_FLUSH_BYTES / (2 * n * k))))]
        tuned[f"{k}x{n}"] = []
        for m in Progress(MS, desc=f"W4A16 {k}x{n}"):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            trials = {}
            for cfg in candidates(m):
                try:
                    trials[cfg] = time_calls([gptq_call(x, w, cfg) for w in ws], reps=5)
                except Exception as e:  # record and skip configs the compiler or launcher rejects
                    print(f"{k}x{n} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}")
            best = min(trials, key=trials.get)
            t_w4 = time_calls([gptq_call(x, w, best) for w in ws], reps=reps)
            t_fp16 = time_calls([lambda d=d: F.linear(x, d) for d in dense], reps=reps)
            t_deq = time_calls([lambda w=w: F.linear(x, dequant_torch(w)) for w in ws[:4]], reps=max(3, reps // 3))
            out = gptq_call(x, ws[0], best)().float()
            ref = x.float() @ dequant_torch(ws[0]).float().t()
            rel_err = float((out - ref).norm() / ref.norm())
            moved = w4_bytes + nbytes(x) + m * n * 2
            rows.append({
                "k": k, "n": n, "m": m, "config": asdict(best), "w4a16_us": t_w4 * 1e6, "fp16_cublas_us": t_fp16 * 1e6,
                "dequant_then_cublas_us": t_deq * 1e6, "speedup_vs_fp16": t_fp16 / t_w4,
                "speedup_vs_dequant": t_deq / t_w4, "achieved_bw_tbps": moved / t_w4 / 1e12,
                "bw_fraction_of_copy": moved / t_w4 / copy_bw, "fp16_bw_fraction_of_copy": nbytes(dense[0]) / t_fp16 / copy_bw,
                "rel_err_vs_dense_fp32": rel_err, "best5_trials_us": [v * 1e6 for v in sorted(trials.values())[:5]],
            })
            tuned[f"{k}x{n}"].append({"max_m": m, **asdict(best)})
            # per-config times, for the shape-independent default below
            rows[-1]["all_trials"] = {json.dumps(asdict(c)): v for c, v in trials.items()}
        del ws, dense
        torch.cuda.empty_cache()
        partial.write_text(json.dumps({"gptq": rows, "tuned": tuned}, indent=1))  # survives a timeout
    return rows, tuned


def default_table(rows: list[dict]) -> list[dict]:
    """Per M, the config with the smallest geometric-mean slowdown versus each shape's best."""
    table = []
    for m in MS:
        per_shape = [r for r in rows if r["m"] == m]
        common = set.intersection(*(set(r["all_trials"]) for r in per_shape))
        def score(c: str) -> float:
            return sum(math.log(r["all_trials"][c] / min(r["all_trials"].values())) for r in per_shape)
        table.append({"max_m": m, **json.loads(min(common, key=score))})
    table[-1]["max_m"] = 1 << 30
    return table


def lora_bank(num_slots: int, rank: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(num_slots, rank, d, device="cuda", generator=gen, dtype=torch.float16) * 0.02
    b = torch.randn(num_slots, d, rank, device="cuda", generator=gen, dtype=torch.float16) * 0.02
    return a, b


def tune_lora(reps: int) -> tuple[ShrinkConfig, ExpandConfig, dict]:
    """Pick the decode-bucket shrink/expand configs on 32 distinct adapters, batch 32, 4096 x 4096."""
    banks = [lora_bank(64, 16, 4096, i) for i in range(8)]
    x = torch.randn(32, 4096, device="cuda", dtype=torch.float16)
    y = torch.zeros(32, 4096, device="cuda", dtype=torch.float16)
    batch = LoRABatch.from_token_slots(torch.arange(32, device="cuda"))
    trials = {}
    for bk in (64, 128, 256):
        for sk in (2, 4, 8, 16, 32):
            for bn in (64, 128, 256):
                s, e = ShrinkConfig(16, bk, sk, 4, 2), ExpandConfig(16, bn, 4, 2)
                fns = [lambda a=a, b=b, s=s, e=e: lora_shrink_expand(y, x, a, b, batch, shrink_config=s, expand_config=e)
                       for a, b in banks]
                trials[(s, e)] = time_calls(fns, reps=5)
    s, e = min(trials, key=trials.get)
    return s, e, {"best_us": trials[(s, e)] * 1e6, "worst_us": max(trials.values()) * 1e6}


def bench_lora(reps: int, shrink: ShrinkConfig, expand: ExpandConfig, w4_cfg: GPTQGemmConfig | None) -> list[dict]:
    """Base 4096 x 4096 layer plus multi-LoRA (raw rank 16, or compressed), batch 32."""
    d, rows = 4096, []
    copies = 6  # 6 x (32 MB dense + 16 MB bank) > 2x L2
    dense = [torch.randn(d, d, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    w4 = [gptq_weights(d, d, i) for i in range(copies)]
    banks = [lora_bank(64, 16, d, i) for i in range(copies)]

    def run(tokens: int, lora_fn, label: str, **extra) -> None:
        x = torch.randn(tokens, d, device="cuda", dtype=torch.float16)
        y = torch.empty(tokens, d, device="cuda", dtype=torch.float16)
        for base in ("fp16", "w4a16"):
            if base == "fp16":  # each base call returns the output the LoRA term is added to
                base_fns = [lambda i=i: torch.matmul(x, dense[i].t(), out=y) for i in range(copies)]
            else:
                base_fns = [gptq_call(x, w4[i], w4_cfg) for i in range(copies)]
            t_base = time_calls(base_fns, reps=reps)
            both = [lambda i=i, f=f: lora_fn(f(), x, i) for i, f in enumerate(base_fns)]
            t_both = time_calls(both, reps=reps)
            rows.append({"what": label, "tokens": tokens, "base": base, "base_us": t_base * 1e6,
                         "base_plus_lora_us": t_both * 1e6, "overhead": t_both / t_base - 1, **extra})

    for n_distinct, tokens in [(1, 32), (2, 32), (4, 32), (8, 32), (16, 32), (32, 32), (64, 64)]:
        batch = LoRABatch.from_token_slots(torch.arange(tokens, device="cuda") % n_distinct)
        fn = (lambda y, x, i, batch=batch:
              lora_shrink_expand(y, x, banks[i][0], banks[i][1], batch, shrink_config=shrink, expand_config=expand))
        run(tokens, fn, "raw", distinct_adapters=n_distinct, rank=16)
    for k, clusters, full in [(64, 1, False), (64, 1, True), (128, 1, False), (128, 1, True), (64, 4, False)]:
        gen = torch.Generator(device="cuda").manual_seed(k)
        cb = [(torch.randn(clusters, d, k, device="cuda", generator=gen, dtype=torch.float16) * 0.02,
               torch.randn(clusters, d, k, device="cuda", generator=gen, dtype=torch.float16) * 0.02,
               torch.randn(clusters, 32, *((k, k) if full else (k,)), device="cuda", generator=gen, dtype=torch.float16))
              for _ in range(copies)]
        ids = torch.arange(32, device="cuda")
        cbatch = CompressedLoRABatch.from_ids(ids % clusters, ids // clusters)
        fn = (lambda y, x, i, cb=cb, cbatch=cbatch:
              compressed_lora(y, x, *cb[i], cbatch, shrink_config=shrink, expand_config=expand))
        run(32, fn, "compressed", distinct_adapters=32, shared_rank=k, clusters=clusters, core="full" if full else "diag")
    return rows


def kernel_breakdown(fn, iters: int = 20) -> dict[str, float]:
    """GPU microseconds per call of each kernel `fn` launches (torch.profiler, eager)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t:
            out[evt.key[:80]] = t / iters
    return out


def breakdowns(tuned: dict, shrink: ShrinkConfig, expand: ExpandConfig) -> dict[str, dict[str, float]]:
    """Where the time of a few calls goes, kernel by kernel (memset / GEMM / cast, shrink / expand)."""
    res = {}
    w = gptq_weights(4096, 4096, 0)
    for m in (1, 16, 128):
        e = next(e for e in tuned["4096x4096"] if e["max_m"] >= m)
        cfg = GPTQGemmConfig(**{k: v for k, v in e.items() if k != "max_m"})
        x = torch.randn(m, 4096, device="cuda").half()
        res[f"w4a16 4096x4096 M={m}"] = kernel_breakdown(gptq_call(x, w, cfg))
        if m == 1:  # the same launch with the one-kernel split-K reduction, for comparison
            last = replace(cfg, split_k=max(cfg.split_k, 4), split_k_reduce="last")
            res["w4a16 4096x4096 M=1 last-split"] = kernel_breakdown(gptq_call(x, w, last))
    a, b = lora_bank(64, 16, 4096, 0)
    x, y = torch.randn(32, 4096, device="cuda").half(), torch.zeros(32, 4096, device="cuda").half()
    batch = LoRABatch.from_token_slots(torch.arange(32, device="cuda"))
    res["lora 32 distinct, batch 32"] = kernel_breakdown(
        lambda: lora_shrink_expand(y, x, a, b, batch, shrink_config=shrink, expand_config=expand))
    return res


def summarize(result: dict) -> None:
    print(f"\nGPU: {result['gpu']}   copy bandwidth {result['copy_bw_tbps']:.2f} TB/s (read + write)")
    print(f"{'K x N':>12} {'M':>4} {'W4A16 us':>9} {'fp16 us':>8} {'x fp16':>7} {'x deq':>6} {'BW frac':>7} {'rel err':>8}  config")
    for r in result["gptq"]:
        c = r["config"]
        cfg = (f"bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} sk{c['split_k']} w{c['num_warps']}"
               f"{' swap' if c['swap_ab'] else ''}{' ilv' if c['interleave'] else ''}"
               f"{' last' if c.get('split_k_reduce') == 'last' else ''}")
        print(f"{r['k']:>5}x{r['n']:<6} {r['m']:>4} {r['w4a16_us']:9.2f} {r['fp16_cublas_us']:8.2f} "
              f"{r['speedup_vs_fp16']:7.2f} {r['speedup_vs_dequant']:6.2f} {r['bw_fraction_of_copy']:7.2f} {r['rel_err_vs_dense_fp32']:8.1e}  {cfg}")
    print(f"\n{'LoRA':>10} {'adapters':>8} {'tokens':>6} {'base':>6} {'base us':>8} {'+lora us':>8} {'overhead':>8}")
    for r in result["lora"]:
        label = r["what"] if r["what"] == "raw" else f"k{r['shared_rank']}c{r['clusters']}{r['core']}"
        print(f"{label:>10} {r['distinct_adapters']:>8} {r['tokens']:>6} {r['base']:>6} {r['base_us']:8.2f} "
              f"{r['base_plus_lora_us']:8.2f} {r['overhead']:8.1%}")
    for name, ks in result["kernel_breakdown_us"].items():
        print(f"{name}: " + ", ".join(f"{k[:40]} {v:.2f}us" for k, v in ks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("load_tests/results"), help="folder for the JSON files")
    parser.add_argument("--reps", type=int, default=15, help="graph replays per final timing")
    parser.add_argument("--compile-workers", type=int, default=12, help="processes that precompile the GPTQ grid")
    parser.add_argument("--quick", action="store_true", help="smoke run: one shape, M in {1, 16, 256}")
    args = parser.parse_args()
    if args.quick:
        SHAPES[:] = SHAPES[:1]
        MS[:] = [1, 16, 32, 256]
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    precompile(all_candidates(), args.compile_workers)
    copy_bw = copy_bandwidth()
    rows, tuned = bench_gptq(copy_bw, args.reps, args.out / "partial_gptq.json")
    tuned["default"] = default_table(rows)
    shrink, expand, lora_tuning = tune_lora(args.reps)
    w4_cfg = GPTQGemmConfig(**{k: v for k, v in tuned["4096x4096"][MS.index(32)].items() if k != "max_m"})
    lora_rows = bench_lora(args.reps, shrink, expand, w4_cfg)
    kernels = breakdowns(tuned, shrink, expand)
    for r in rows:
        r.pop("all_trials")
    result = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "copy_bw_tbps": copy_bw / 1e12,
        "timing": "median over CUDA-graph replays, weights rotated over > 200 MB (HBM, not L2)",
        "gptq": rows, "lora": lora_rows, "lora_tuning": lora_tuning, "kernel_breakdown_us": kernels, "seconds": time.time() - t0,
    }
    configs = {
        "gpu": gpu, "gptq_gemm": tuned,
        "sgmv_shrink": {"default": [{"max_m": 16, **asdict(shrink)}, {"max_m": 128, **asdict(replace(shrink, block_m=32, split_k=4))},
                                    {"max_m": 1 << 30, **asdict(ShrinkConfig(64, 64, 2, 4, 3))}]},
        "sgmv_expand": {"default": [{"max_m": 16, **asdict(expand)}, {"max_m": 1 << 30, **asdict(ExpandConfig(64, 128, 4, 3))}]},
    }
    (args.out / "kernels_h100.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{gpu_config_name(gpu)}.json").write_text(json.dumps(configs, indent=1))
    summarize(result)
    print(f"\nwrote {args.out / 'kernels_h100.json'} and {args.out / (gpu_config_name(gpu) + '.json')} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
