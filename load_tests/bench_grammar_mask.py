"""Cost of structured output (issue #18): what the grammar library costs per request and per
token, and what the engine's mask costs per decode step beside the step itself, on SmolLM2's
tokenizer (49,152 tokens) on this machine's CPU.

Per library (llguidance, the engine's choice, and xgrammar when it is installed; both fill the
same 32-bit-per-word bitmask on the host) and grammar (a JSON schema, any JSON object, a regex,
a choice): the time to compile the grammar for a new request (cold: a schema never seen; the
tokenizer's one-off preparation is timed separately) and the time to fill one token's mask,
walking a valid answer token by token (mean, p99, max over `--repeats` walks).

Then the engine: `StructuredOutputManager.mask` over a batch of 8 constrained rows (host fill,
unpack, -inf fill) against a SmolLM2 fp32 decode step of 8 unconstrained requests measured in
the same run: the ratio is the step time structured output adds on this CPU.

    python load_tests/bench_grammar_mask.py          # ~1 min on 2 cores
Writes load_tests/results/grammar_mask_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from inlaid_ray.config import Settings
from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.engine.request import StructuredOutput
from inlaid_ray.model import load_model
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.model.tokenizer import load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines"], "active": True}
REGEX = r"[A-Z][a-z]+ [0-9]{4}-[0-9]{2}-[0-9]{2}"
CHOICES = ["positive", "negative", "neutral"]
# (grammar, valid text the walk feeds token by token)
CASES = {
    "json_schema": json.dumps(ANSWER, separators=(",", ":")),
    "json_object": json.dumps({"result": ANSWER, "score": 0.93}, separators=(",", ":")),
    "regex": "Tuesday 2026-12-07",
    "choice": "negative",
}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _walk_stats(fill_times: list[float]) -> dict[str, float]:
    us = [t * 1e6 for t in fill_times]
    return {"mean_us": statistics.fmean(us), "p99_us": _percentile(us, 0.99), "max_us": max(us), "n": len(us)}


class _Llguidance:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int) -> None:
        import llguidance.hf

        t0 = time.perf_counter()
        self.ll = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=[tok.eos_token_id])
        self.prepare_s = time.perf_counter() - t0
        self.bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)

    def compile(self, kind: str, salt: int) -> Any:
        from llguidance import LLMatcher

        from inlaid_ray.engine.grammar import grammar_of

        matcher = LLMatcher(self.ll, grammar_of(_spec(kind, salt)), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher: Any) -> None:
        row = self.bitmask[0]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.prepare_s = time.perf_counter() - t0
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, kind: str, salt: int) -> Any:
        spec = _spec(kind, salt)
        if kind == "json_schema":
            compiled = self.compiler.compile_json_schema(spec.spec, any_whitespace=False, separators=(",", ":"))
        elif kind == "json_object":
            compiled = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"))
        elif kind == "regex":
            compiled = self.compiler.compile_regex(spec.spec)
        else:
            compiled = self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec.spec)))
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def accept(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)


def _spec(kind: str, salt: int) -> StructuredOutput:
    """A grammar of `kind` no cache has seen (`salt` renames a property / choice) of the same size."""
    if kind == "json_schema":
        schema = json.loads(json.dumps(SCHEMA).replace('"email"', '"email"' if salt == 0 else f'"email{salt}"'))
        return StructuredOutput(kind, json.dumps(schema))
    if kind == "regex":
        return StructuredOutput(kind, REGEX)
    if kind == "choice":
        return StructuredOutput(kind, json.dumps(CHOICES))
    return StructuredOutput(kind)


def bench_library(lib: Any, tok: Any, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"prepare_tokenizer_s": lib.prepare_s}
    for kind, text in CASES.items():
        tokens = tok.encode(text, add_special_tokens=False)
        compile_s, fills = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            matcher = lib.compile(kind, salt=0)  # the answer must fit the schema: same property names
            lib.fill(matcher)  # llguidance compiles lazily: the first mask is part of the cost
            compile_s.append(time.perf_counter() - t0)
            lib.accept(matcher, tokens[0])
            for token in tokens[1:] + [None]:  # None: the mask after the answer (its end)
                t0 = time.perf_counter()
                lib.fill(matcher)
                fills.append(time.perf_counter() - t0)
                if token is not None:
                    lib.accept(matcher, token)
        out[kind] = {"tokens": len(tokens), "first_mask_ms_median": statistics.median(compile_s) * 1e3,
                     "first_mask_ms_max": max(compile_s) * 1e3, "fill": _walk_stats(fills)}
    return out


def bench_engine_step(model_dir: Path, tok: Any, steps: int) -> dict[str, Any]:
    """Decode step of 8 free requests vs the mask of 8 constrained ones, same run."""
    engine = LLMEngine(load_model(model_dir), tok, EngineConfig(num_kv_blocks=256, max_model_len=512, max_num_seqs=8))
    prompt = tok.encode("Describe a person as JSON.", add_special_tokens=False)
    for _ in range(8):
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # the prefill
    step_s = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t0)
    manager = engine.structured_output
    tokens = tok.encode(CASES["json_schema"], add_special_tokens=False)
    reqs = [engine.make_request(prompt, SamplingParams(max_tokens=64, structured_output=_spec("json_schema", 0)))
            for _ in range(8)]
    logits = torch.zeros(8, engine.model_config.vocab_size)
    manager.mask(logits, reqs)  # the first mask compiles the grammars
    mask_s = []
    for token in tokens[:-1]:
        t0 = time.perf_counter()
        manager.mask(logits, reqs)
        mask_s.append(time.perf_counter() - t0)
        for req in reqs:
            manager.advance(req, token)
    step_ms, mask_ms = statistics.median(step_s) * 1e3, statistics.median(mask_s) * 1e3
    return {"batch": 8, "decode_step_ms_median": step_ms, "decode_steps": len(step_s),
            "mask_ms_median": mask_ms, "mask_ms_max": max(mask_s) * 1e3, "mask_steps": len(mask_s),
            "mask_over_step": mask_ms / step_ms}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    libs = [k for k in ("llguidance", "xgrammar") if k in result["libraries"]]
    kinds = list(CASES)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(libs)
    for j, lib in enumerate(libs):
        r = result["libraries"][lib]
        xs = [i + j * width for i in range(len(kinds))]
        axes[0].bar(xs, [r[k]["fill"]["mean_us"] for k in kinds], width, label=f"{lib} mean")
        axes[0].scatter(xs, [r[k]["fill"]["p99_us"] for k in kinds], marker="_", s=200, color="k")
        axes[1].bar(xs, [r[k]["first_mask_ms_median"] for k in kinds], width, label=lib)
    for ax, title, unit in ((axes[0], "mask fill per token (bar: mean, tick: p99)", "us"),
                            (axes[1], "new request: compile + first mask (median)", "ms")):
        ax.set_xticks([i + width * (len(libs) - 1) / 2 for i in range(len(kinds))], kinds)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend()
    e = result["engine"]
    fig.suptitle(f"SmolLM2 tokenizer, CPU. Engine, batch 8: mask {e['mask_ms_median']:.2f} ms vs decode step "
                 f"{e['decode_step_ms_median']:.1f} ms ({100 * e['mask_over_step']:.1f}%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="walks per grammar and library")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps of the engine baseline")
    ap.add_argument("--out", type=Path, default=RESULTS / "grammar_mask_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = prepare_smollm2(Settings.from_env().cache_dir)
    tok = load_tokenizer(model_dir)
    vocab = 49152
    result: dict[str, Any] = {"tokenizer": str(model_dir.name), "vocab": vocab, "repeats": args.repeats,
                              "libraries": {}, "versions": {}}
    libs: list[Callable[[], Any]] = [lambda: _Llguidance(tok, vocab)]
    if importlib.util.find_spec("xgrammar") is not None:
        libs.append(lambda: _Xgrammar(tok, vocab))
    else:
        print("xgrammar is not installed: measuring llguidance only")
    for make in libs:
        lib = make()
        print(f"{lib.name}: {len(CASES)} grammars x {args.repeats} walks ...", flush=True)
        result["libraries"][lib.name] = bench_library(lib, tok, args.repeats)
        result["versions"][lib.name] = importlib.metadata.version(lib.name)
    print("engine: decode steps and masks at batch 8 ...", flush=True)
    result["engine"] = bench_engine_step(model_dir, tok, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    for name, r in result["libraries"].items():
        print(name, {k: (round(r[k]["fill"]["mean_us"], 1), round(r[k]["fill"]["p99_us"], 1),
                         round(r[k]["first_mask_ms_median"], 2)) for k in CASES},
              f"tokenizer {r['prepare_tokenizer_s']:.2f} s")
    e = result["engine"]
    print(f"engine batch 8: mask {e['mask_ms_median']:.2f} ms, step {e['decode_step_ms_median']:.1f} ms, "
          f"ratio {e['mask_over_step']:.3f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
