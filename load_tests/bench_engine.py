"""Generated tokens/s of the engine with N mixed adapters vs transformers + PEFT's mixed-batch
`generate(..., adapter_names=[...])` on the same prompts, in the same run (issue 2 benchmark).

Equal work on both sides: the same prompts, greedy, exactly `max_tokens` new tokens per prompt
(engine: `ignore_eos`; HF: `min_new_tokens = max_new_tokens`), prompt i on adapter i % N, all
prompts submitted at once (HF: one left-padded batch). Times include prefill. Only ratios
measured in the same run count; nothing here asserts a time.

- CPU (default): the real SmolLM2-135M-Instruct in fp32, the committed demo adapters (or, until
  they are trained, random PEFT adapters of the demo recipes' ranks and target modules, written to
  a temp dir: the JSON says which), prompts from the demo eval splits, N in (1, 4, all).
- GPU (`--device cuda`): Llama-2-7B shape with random fp16 weights, copied into the HF model so
  both run the same function; 32 random PEFT adapters (rank 16, all 7 linears) copied into the
  engine's bank; random-token prompts. Then the engine again with 4-bit GPTQ-shaped random codes
  (`gptq_linear_factory` layout), against the same HF figures.

    python load_tests/bench_engine.py                          # -> results/engine_cpu.json (+ .png)
    python load_tests/bench_engine.py --device cuda --kernels ops --out $OUT/engine_gpu_h100.json
    python load_tests/bench_engine.py --plot results/engine_gpu_h100.json   # PNG from a JSON
    python load_tests/bench_engine.py --random --shape tiny --num-prompts 4  # dry run of the GPU path
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, SHAPES, device_info, kernel_paths, model_bytes, timed, use_kernel_ops, write_json  # noqa: E402
from bench_engine_setup import Setup, engine_config_for, quant_engine, setup_random, setup_real  # noqa: E402

from inlaid_ray.engine import LLMEngine, SamplingParams  # noqa: E402
from inlaid_ray.model import LINEAR_MODULES  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; defaults are the CPU run."""

    device: str = "cpu"
    random: bool = False  # True: random-weight model of `shape` (the GPU set-up)
    shape: str = "llama-2-7b"
    num_prompts: int = 8
    prompt_len: int = 128  # random prompts only (demo prompts have their own lengths)
    max_tokens: int = 32
    adapter_counts: tuple[int, ...] = (1, 4, -1)  # -1 = all adapters
    num_random_adapters: int = 32
    rank: int = 16
    modules: tuple[str, ...] = LINEAR_MODULES
    quant: bool = False  # also the engine on 4-bit GPTQ-shaped codes (random mode)
    kernels: str = "auto"  # auto: what the modules select; ops: inlaid_ray.kernels.ops
    repeats: int = 2
    threads: int | None = 1  # CPU: 1 thread measured fastest on the shared 2-core dev machine
    time_budget_s: float = 600.0
    seed: int = 0


@dataclass
class Measurement:
    tokens: int
    seconds: list[float]
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / min(self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


# ------------------------------------------------------------------------------ the two systems


def engine_run(engine: LLMEngine, prompts: list[list[int]], tasks: list[str | None], max_tokens: int) -> Measurement:
    """One timed `engine.generate` of every prompt at once."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    with timed(engine.device) as t:
        outs = engine.generate(prompts, params, tasks)
    return Measurement(sum(len(o.token_ids) for o in outs), [t["s"]], [list(o.token_ids) for o in outs])


def hf_run(model: Any, prompts: list[list[int]], adapter_names: list[str] | None, max_tokens: int, pad_id: int) -> Measurement:
    """One timed HF `generate` of every prompt as a left-padded batch (PEFT: per-row adapters)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    with torch.inference_mode(), timed(device) as t:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    gen = out[:, width:]
    return Measurement(int(gen.numel()), [t["s"]], gen.tolist())


def agreement(ours: list[list[int]], hf: list[list[int]], eos_ids: Sequence[int]) -> float:
    """Fraction of prompts whose greedy tokens agree up to our first EOS (HF suppresses EOS)."""
    same = 0
    for a, b in zip(ours, hf):
        cut = next((i for i, t in enumerate(a) if t in eos_ids), len(a))
        same += a[:cut] == b[:cut]
    return same / max(1, len(ours))


# ------------------------------------------------------------------------------ the run


class _Bench:
    """One benchmark run: measures, keeps the JSON up to date after every row, honours the budget."""

    def __init__(self, cfg: BenchConfig, out: Path, s: Setup) -> None:
        self.cfg, self.out, self.s = cfg, out, s
        self.t_start = time.monotonic()
        self.result: dict[str, Any] = {
            "benchmark": "engine tokens/s with N mixed adapters vs transformers + PEFT mixed-batch generate",
            "device": device_info(cfg.device), "config": asdict(cfg), **s.meta,
            "num_prompts": len(s.prompts), "max_tokens": cfg.max_tokens, "rows": [], "skipped": [],
        }
        # Warm-up: on CUDA the full batch (Triton compiles per shape class), on CPU two prompts.
        self.warm_k = len(s.prompts) if torch.device(cfg.device).type == "cuda" else 2
        self.bar: Any = None

    def measure(self, label: str, fn: Callable[[int, int], Measurement]) -> Measurement | None:
        """fn(max_tokens, num_prompts): a short warm-up, then timed repeats of every prompt."""
        cfg = self.cfg
        if time.monotonic() - self.t_start > cfg.time_budget_s:
            self.result["skipped"].append(f"{label}: time budget {cfg.time_budget_s}s spent")
            return None
        fn(2, self.warm_k)
        acc = None
        for _ in range(cfg.repeats):  # tokens/s uses the fastest repeat
            one = fn(cfg.max_tokens, len(self.s.prompts))
            acc = one if acc is None else Measurement(one.tokens, acc.seconds + one.seconds, acc.outputs)
            self.bar.update(1)
        return acc

    def row(self, kind: str, n: int, ours: Measurement | None, hf: Measurement | None, hf_system: str) -> None:
        r = {"model": kind, "num_adapters": n, "engine": ours and ours.to_json(), "hf_peft": hf and hf.to_json(),
             "hf_system": hf_system}
        if ours and hf:
            r["ratio_engine_over_hf"] = ours.tokens_per_s / hf.tokens_per_s
            if kind == "base":  # same weights on both sides: a correctness cross-check, not a speed figure
                r["greedy_agreement"] = agreement(ours.outputs, hf.outputs, self.s.config.eos_token_ids)
        self.result["rows"].append(r)
        write_json(self.out, self.result)

    def tasks_for(self, n: int) -> list[str | None]:
        """Prompt i on adapter i % n (n = 0: base model for every prompt)."""
        k = len(self.s.prompts)
        return [None] * k if n == 0 else [self.s.adapter_names[i % n] for i in range(k)]

    def engine_rows(self, engine: LLMEngine, kind: str, counts: list[int], hf_by_n: dict[int, Any]) -> None:
        """Engine rows for each N, against already measured HF figures."""
        prompts = self.s.prompts
        for n in counts:
            names = self.tasks_for(n)
            ours = self.measure(f"{kind} engine N={n}", lambda m, k: engine_run(engine, prompts[:k], names[:k], m))
            self.row(kind, n, ours, hf_by_n.get(n), "the fp16 HF figure of the same N, same run")


def run(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """Measure every configuration (partial results are written to `out` as rows complete)."""
    if cfg.threads and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    s = setup_random(cfg, tmp) if cfg.random else setup_real(cfg, tmp)
    b = _Bench(cfg, out, s)
    counts = sorted({len(s.adapter_names) if n == -1 else min(n, len(s.adapter_names)) for n in cfg.adapter_counts})
    quant = cfg.quant and cfg.random
    b.bar = Progress(total=(1 + len(counts)) * (2 + quant) * cfg.repeats, desc="bench_engine", unit="run")
    base_names = b.tasks_for(0)
    ours0 = b.measure("engine base", lambda m, k: engine_run(s.engine, s.prompts[:k], base_names[:k], m))
    hf_by_n = {0: b.measure("hf base", lambda m, k: hf_run(s.hf, s.prompts[:k], None, m, s.pad_id))}
    b.row("base", 0, ours0, hf_by_n[0], "transformers generate (no PEFT)")
    peft = s.make_peft()
    engine, model = s.engine, s.engine.model
    if s.bank is not None:  # random set-up: the bank exists only now (copied from PEFT)
        s.engine = engine = None
        gc.collect()
        engine = LLMEngine(model, None, engine_config_for(s.prompts, cfg.max_tokens), adapter_bank=s.bank)
    else:
        use_kernel_ops(engine.adapter_bank, cfg.kernels)
    b.result.update(kernel_paths=kernel_paths(engine.adapter_bank, model, cfg.device),
                    model_bytes=model_bytes(model), bank=engine.adapter_bank.stats())
    for n in counts:
        names = b.tasks_for(n)
        ours = b.measure(f"engine N={n}", lambda m, k: engine_run(engine, s.prompts[:k], names[:k], m))
        hf_by_n[n] = b.measure(f"hf N={n}", lambda m, k: hf_run(peft, s.prompts[:k], names[:k], m, s.pad_id))
        b.row("base", n, ours, hf_by_n[n], "transformers + PEFT generate(adapter_names=...)")
    if quant:
        bank = engine.adapter_bank
        peft = s.hf = engine = model = None  # free the fp16 models before building the 4-bit one
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            qengine = quant_engine(s.config, bank, s.prompts, cfg)
            b.result["quant"] = {"format": "GPTQ v1, 4 bits, group 128, fp16 scales, random codes",
                                 "model_bytes": model_bytes(qengine.model),
                                 "kernel_paths": kernel_paths(bank, qengine.model, cfg.device)}
            b.engine_rows(qengine, "gptq-4bit", [0, *counts], hf_by_n)
        except Exception as exc:  # noqa: BLE001 - record why the optional 4-bit part did not run
            b.result["quant"] = {"error": f"{type(exc).__name__}: {exc}"}
    b.bar.close()
    b.result["elapsed_s"] = time.monotonic() - b.t_start
    return b.result


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of tokens/s per (model, N): engine vs HF, ratio annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("engine")]
    labels = [f"{r['model']}\nN={r['num_adapters']}" for r in rows]
    ours = [r["engine"]["tokens_per_s"] for r in rows]
    hf = [(r.get("hf_peft") or {}).get("tokens_per_s", 0.0) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="inlaid-ray engine")
    ax.bar([i + 0.2 for i in x], hf, 0.4, label="transformers (+ PEFT mixed batch)")
    for i, r in enumerate(rows):
        if r.get("ratio_engine_over_hf"):
            ax.annotate(f"{r['ratio_engine_over_hf']:.2g}x", (i, max(ours[i], hf[i])), ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("generated tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{result['device']['device_name']}: {result['num_prompts']} prompts x {result['max_tokens']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--random", action="store_true", help="random-weight model of --shape (implied by --device cuda)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--num-prompts", type=int, default=None, help="default 8 on CPU, 32 on GPU")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--adapter-counts", default=None, help="comma list, -1 = all (default 1,4,-1)")
    p.add_argument("--num-adapters", type=int, default=32, help="random mode: adapters made")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modules", default=",".join(LINEAR_MODULES))
    p.add_argument("--quant", action="store_true", help="random mode: also the 4-bit engine (default on with cuda)")
    p.add_argument("--kernels", choices=("auto", "ops"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="default 2 on CPU, 1 on GPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-budget-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="only draw the PNG of an existing JSON")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    cfg = BenchConfig(
        device=a.device, random=a.random or cuda, shape=a.shape,
        num_prompts=a.num_prompts or (32 if cuda else 8), prompt_len=a.prompt_len, max_tokens=a.max_tokens,
        adapter_counts=tuple(int(x) for x in (a.adapter_counts or "1,4,-1").split(",")),
        num_random_adapters=a.num_adapters, rank=a.rank, modules=tuple(a.modules.split(",")),
        quant=a.quant or cuda, kernels=a.kernels, repeats=a.repeats or (1 if cuda else 2),
        threads=a.threads, time_budget_s=a.time_budget_s,
    )
    out = a.out or RESULTS / ("engine_gpu.json" if cuda else "engine_cpu.json")
    return cfg, out, a.plot


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out, plot_only = parse_args(argv)
    if plot_only is not None:
        import json

        plot(json.loads(plot_only.read_text()), plot_only.with_suffix(".png"))
        return
    result = run(cfg, out)
    write_json(out, result)
    for r in result["rows"]:
        e, h = r.get("engine"), r.get("hf_peft")
        print(f"{r['model']:>9} N={r['num_adapters']:>3}: engine {e['tokens_per_s'] if e else float('nan'):9.1f} tok/s, "
              f"HF {h['tokens_per_s'] if h else float('nan'):9.1f} tok/s, ratio {r.get('ratio_engine_over_hf', float('nan')):.2f}")
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no PNG (draw it later with --plot)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
