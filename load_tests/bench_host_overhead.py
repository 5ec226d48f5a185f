"""Host overhead of one decode step (issue #15 item 5), measured on the CPU with a model whose
compute is negligible: 32 layers of width 64, so a step's time is the host's (Python, aten
dispatch, syncs), which is what an eager GPU step pays on top of its kernels.

For the engine (batch 1/8/64 with 0/1/8 distinct adapters) and, as the baseline in the same
run, transformers' eager Llama of the same shape decoding with its KV cache (batch 1/8/64):
- aten ops per decode step and per layer (TorchDispatchMode over the step),
- host syncs per step (`aten._local_scalar_dense`, i.e. `.item()`/`int()`/`bool()` of a tensor,
  plus `Tensor.tolist()`: each is a device-to-host wait on a GPU),
- distinct attention shapes over the measured decode steps (a new shape is a new cuDNN plan
  or graph on a GPU),
- host ms per step (median of the timed steps, run without the dispatch mode).
And the engine's CUDA code path on CPU (`engine-cuda-path`: fixed-shape decode steps, the Triton
attention and SGMV kernels with their launches stubbed under TRITON_INTERPRET=1, so the
wrappers, metadata and aten ops run but no kernel does): the same figures plus Triton launches
per step and per layer, and how many distinct step signatures (ops, shapes, launches;
bench/step_trace.py) its steps had: 1 means every step could replay one CUDA graph.

    python load_tests/bench_host_overhead.py                       # ~3 min on 2 cores
    python load_tests/bench_host_overhead.py --steps 5 --batches 1  # quick look
Writes load_tests/results/host_overhead_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CUDA code path's kernels on CPU tensors (stubbed)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from inlaid_ray.bench.step_trace import StepTrace, stubbed_launches  # noqa: E402
from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from inlaid_ray.engine.builder import BankCapacity, make_bank  # noqa: E402
from inlaid_ray.lora.bank import AdapterBank  # noqa: E402
from inlaid_ray.lora.synthetic import random_lora_adapter  # noqa: E402
from inlaid_ray.model import LINEAR_MODULES, ModelConfig, random_model  # noqa: E402
from inlaid_ray.model.attention import select_decode_attention  # noqa: E402
from inlaid_ray.model.transformer import fuse_projections  # noqa: E402
from inlaid_ray.progress import Progress  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 16
SHAPE = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=32, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=2048, name_or_path="tiny-32-layer")


class StepCounter(TorchDispatchMode):
    """Counts aten ops, host syncs and attention input shapes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self.attention_shapes: set[tuple] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.ops += 1
        self.by_op[name] += 1
        if name.startswith("_local_scalar_dense"):
            self.syncs += 1
        if "scaled_dot_product" in name:
            self.attention_shapes.add(tuple(tuple(a.shape) for a in args[:3] if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


class CountToList:
    """`Tensor.tolist()` reads no aten op but waits for the device: count it as a sync."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig = torch.Tensor.tolist

    def __enter__(self) -> "CountToList":
        orig = self._orig

        def tolist(t: torch.Tensor):
            self.calls += 1
            return orig(t)

        torch.Tensor.tolist = tolist
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._orig


@dataclass(frozen=True)
class StepFigures:
    system: str
    batch: int
    adapters: int
    aten_ops_per_step: float
    aten_ops_per_layer: float
    host_syncs_per_step: float
    attention_shapes: int
    host_ms_per_step: float
    host_ms_per_step_max: float
    top_ops: dict[str, float]
    triton_launches_per_step: float = 0.0
    triton_launches_per_layer: float = 0.0
    step_signatures: int | None = None  # distinct (ops, shapes, launches) over the counted steps


def measure(system: str, batch: int, adapters: int, step, steps: int, layers: int) -> StepFigures:
    """`step()` runs one decode step; counted over `steps` steps, then timed over `steps` more."""
    counter = StepCounter()
    with counter, CountToList() as tolist:
        for _ in range(steps):
            step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    top = {k: round(v / steps, 1) for k, v in counter.by_op.most_common(8)}
    return StepFigures(system, batch, adapters, counter.ops / steps, counter.ops / steps / layers,
                       (counter.syncs + tolist.calls) / steps, len(counter.attention_shapes),
                       statistics.median(times), max(times), top)


def measure_cuda_path(batch: int, adapters: int, step, model, steps: int, layers: int) -> StepFigures:
    """The engine's CUDA code path with Triton launches stubbed: counted over `steps` decode steps
    (one StepTrace per forward), then timed over `steps` more without the trace."""
    traces: list[StepTrace] = []
    forward = model.forward

    def traced(*args, **kwargs):
        with StepTrace(run_kernels=False) as trace:
            out = forward(*args, **kwargs)
        traces.append(trace)
        return out

    model.forward = traced
    with stubbed_launches(), CountToList() as tolist:
        for _ in range(steps):
            step()
    del model.forward
    times = []
    with stubbed_launches():
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    ops = sum(len(t.ops) for t in traces) / steps
    launches = sum(len(t.launches) for t in traces) / steps
    syncs = (sum(len(t.syncs) for t in traces) + tolist.calls) / steps
    by_op: Counter[str] = Counter(op[0] for t in traces for op in t.ops)
    top = {k: round(v / steps, 1) for k, v in by_op.most_common(8)}
    return StepFigures("engine-cuda-path", batch, adapters, ops, ops / layers, syncs, 0, statistics.median(times),
                       max(times), top, launches, launches / layers, len({t.signature for t in traces}))


def wrapper_costs(calls: int = 2000) -> dict[str, float]:
    """Host us per call of the GPTQ GEMM and the SGMV shrink+expand wrappers with their launches
    stubbed, Llama-2-7B projection shape (4096 x 4096, 4-bit group 128), one token, fp16."""
    from inlaid_ray.kernels.gptq_gemm import gptq_matmul
    from inlaid_ray.kernels.lora_sgmv import lora_shrink_expand
    from inlaid_ray.model.forward_batch import LoRABatch

    k = n = 4096
    qweight, qzeros = torch.zeros(k // 8, n, dtype=torch.int32), torch.zeros(k // 128, n // 8, dtype=torch.int32)
    scales, g_idx = torch.ones(k // 128, n, dtype=torch.float16), (torch.arange(k) // 128).int()
    x, y = torch.randn(1, k).half(), torch.zeros(1, n, dtype=torch.float16)
    lora_a, lora_b = torch.zeros(8, 16, k, dtype=torch.float16), torch.zeros(8, n, 16, dtype=torch.float16)
    batch = LoRABatch.from_host_slots([3], "cpu")
    ops = {"gptq_matmul_us_per_call": lambda: gptq_matmul(x, qweight, qzeros, scales, g_idx, 4, group_size=128),
           "sgmv_us_per_projection": lambda: lora_shrink_expand(y, x, lora_a, lora_b, batch)}
    out = {}
    with stubbed_launches():
        for name, call in ops.items():
            call()
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            out[name] = round((time.perf_counter() - t0) / calls * 1e6, 1)
    return out


def engine_stepper(batch: int, adapters: int, steps: int, cuda_path: bool = False):
    """An engine past its prefill with `batch` requests over `adapters` distinct adapters;
    `cuda_path`: fixed-shape decode steps through the Triton kernels (launch them stubbed)."""
    bank = None
    if adapters:
        loaded = [random_lora_adapter(SHAPE, f"task-{i}", 8, LINEAR_MODULES, seed=i, b_std=0.01) for i in range(adapters)]
        if cuda_path:  # the bank's SGMV kernels, as on CUDA
            bank = AdapterBank(SHAPE, max_slots=adapters, max_rank=8, kernels="triton")
            for adapter in loaded:
                bank.add(adapter)
        else:
            bank = make_bank(SHAPE, torch.float32, torch.device("cpu"), BankCapacity(adapters, 8), loaded)
    model = random_model(SHAPE, dtype=torch.float32, seed=0)
    fuse_projections(model)  # q/k/v and gate/up as one GEMM each, as the serving builder does
    if cuda_path:
        model.decode_attention = select_decode_attention("cpu", "triton")
    max_len = PROMPT_TOKENS + 3 * steps + 8
    cfg = EngineConfig(block_size=16, num_kv_blocks=batch * (max_len // 16 + 2) + 1, max_model_len=max_len,
                       max_num_seqs=batch, max_num_batched_tokens=max(batch * PROMPT_TOKENS, max_len),
                       static_decode=cuda_path)
    engine = LLMEngine(model, None, cfg, adapter_bank=bank)
    params = SamplingParams(max_tokens=max_len - PROMPT_TOKENS, ignore_eos=True)
    for i in range(batch):
        engine.add_request(list(range(1, PROMPT_TOKENS + 1)), params, task=f"task-{i % adapters}" if adapters else None)
    engine.step()  # prefill
    engine.step()  # first decode step (warm)
    return engine.step


def transformers_stepper(batch: int):
    """transformers' eager Llama of the same shape, decoding greedily from its KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=SHAPE.vocab_size, hidden_size=SHAPE.hidden_size,
                         intermediate_size=SHAPE.intermediate_size, num_hidden_layers=SHAPE.num_layers,
                         num_attention_heads=SHAPE.num_heads, num_key_value_heads=SHAPE.num_kv_heads,
                         head_dim=SHAPE.head_dim, max_position_embeddings=SHAPE.max_position_embeddings)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).eval()
    ids = torch.arange(1, PROMPT_TOKENS + 1).repeat(batch, 1)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    state = {"cache": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step() -> None:
        with torch.inference_mode():
            out = model(input_ids=state["next"], past_key_values=state["cache"], use_cache=True)
        state["cache"], state["next"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        state["next"].tolist()  # the host reads the sampled ids, as any serving loop does

    step()
    return step


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['system']}\nB={r['batch']}" + (f" A={r['adapters']}" if r["system"] != "transformers" else "")
              for r in rows]
    colors = [{"engine": "tab:blue", "engine-cuda-path": "tab:orange"}.get(r["system"], "tab:gray") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, key, title in zip(axes, ("aten_ops_per_step", "host_syncs_per_step", "host_ms_per_step"),
                              ("aten ops per decode step", "host syncs per decode step", "host ms per decode step")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
        ax.set_title(title)
    fig.suptitle(f"Decode-step host overhead, {SHAPE.num_layers}-layer width-{SHAPE.hidden_size} model, CPU "
                 "(engine CPU path blue, engine CUDA path with launches stubbed orange, transformers eager grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8])
    parser.add_argument("--steps", type=int, default=20, help="decode steps counted, then as many timed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: host cost, not BLAS)")
    parser.add_argument("--out", type=Path, default=RESULTS / "host_overhead_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = ([("engine", b, a) for b in args.batches for a in args.adapters]
            + [("engine-cuda-path", b, a) for b in args.batches for a in args.adapters]
            + [("transformers", b, 0) for b in args.batches])
    rows = []
    for system, batch, adapters in Progress(plan, desc="configs", unit="config"):
        if system == "engine-cuda-path":
            with stubbed_launches():  # the prefill and warm-up steps too: no kernel runs on this path
                step = engine_stepper(batch, adapters, args.steps, cuda_path=True)
            model = step.__self__.model
            rows.append(asdict(measure_cuda_path(batch, adapters, step, model, args.steps, SHAPE.num_layers)))
            continue
        step = engine_stepper(batch, adapters, args.steps) if system == "engine" else transformers_stepper(batch)
        rows.append(asdict(measure(system, batch, adapters, step, args.steps, SHAPE.num_layers)))
    baseline = {r["batch"]: r for r in rows if r["system"] == "transformers"}
    for r in rows:
        base = baseline.get(r["batch"])
        if base and r["system"].startswith("engine"):
            r["host_ms_vs_transformers"] = round(r["host_ms_per_step"] / base["host_ms_per_step"], 3)
            r["aten_ops_vs_transformers"] = round(r["aten_ops_per_step"] / base["aten_ops_per_step"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": asdict(SHAPE), "prompt_tokens": PROMPT_TOKENS, "steps": args.steps, "threads": args.threads,
            "torch": torch.__version__, "targets": {"aten_ops_per_step": 700, "aten_ops_per_layer": 20,
                                                     "host_syncs_per_step": 1, "attention_shapes": 0,
                                                     "triton_launches_per_layer": 6, "step_signatures": 1,
                                                     "gptq_matmul_us_per_call": 10, "sgmv_us_per_projection": 15}}
    wrappers = wrapper_costs()
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "wrappers": wrappers}, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    for r in rows:
        print(f"{r['system']:12s} B={r['batch']:<3d} A={r['adapters']:<2d} ops/step {r['aten_ops_per_step']:7.0f} "
              f"({r['aten_ops_per_layer']:5.1f}/layer) syncs {r['host_syncs_per_step']:5.1f} "
              f"attn shapes {r['attention_shapes']:3d} host {r['host_ms_per_step']:7.2f} ms"
              + (f" launches/layer {r['triton_launches_per_layer']:.1f} signatures {r['step_signatures']}"
                 if r["system"] == "engine-cuda-path" else "")
              + (f" ({r['host_ms_vs_transformers']:.2f}x transformers)" if "host_ms_vs_transformers" in r else ""))
    print(f"launch wrappers, launches stubbed: {wrappers}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
