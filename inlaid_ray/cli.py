"""Command line entry point `inlaid-ray` (argparse; each subcommand calls library code)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path

from inlaid_ray.config import Settings
from inlaid_ray.errors import InlaidError
from inlaid_ray.jobs.cli import add_keys_parser, add_onboard_parser, add_tasks_parser
from inlaid_ray.compress.cli import add_compress_parser
from inlaid_ray.demo.eval_cli import add_eval_parser
from inlaid_ray.quant.cli import add_quantize_parser
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD
from inlaid_ray.serve.app_args import AppArgs
from inlaid_ray.serve.cli_args import add_cli_arguments as add_serve_arguments


def _cmd_model_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.model.prepare import prepare_smollm2

    cache_dir = Path(args.cache_dir) if args.cache_dir else settings.cache_dir
    print(prepare_smollm2(cache_dir, force=args.force))
    return 0


def _default_base(args: argparse.Namespace, settings: Settings) -> Path:
    from inlaid_ray.model.prepare import prepare_smollm2

    return Path(args.base) if args.base else prepare_smollm2(settings.cache_dir)


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.engine import EngineConfig, SamplingParams
    from inlaid_ray.engine.builder import build_engine
    from inlaid_ray.model import encode_chat, encode_text

    adapters: dict[str, Path] = {}
    task = None
    if args.task:
        from inlaid_ray.demo import demo_adapter_dir

        task, adapters = args.task, {args.task: demo_adapter_dir(args.task)}
    elif args.adapter:
        task, adapters = "adapter", {"adapter": Path(args.adapter)}
    engine = build_engine(
        _default_base(args, settings), adapters, dtype=args.dtype, device=args.device,
        engine_config=EngineConfig(num_kv_blocks=args.kv_blocks),
    )
    tok = engine.tokenizer
    prompt = encode_text(tok, args.prompt) if args.raw else encode_chat(tok, [{"role": "user", "content": args.prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop),
    )
    print(engine.generate([prompt], params, [task])[0].text)
    return 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.serve.launcher import run_from_cli

    if args.demo:  # the CLI is the one place that knows the demo: it hands serving a manifest
        from inlaid_ray.demo.manifest import DEMO_API_KEY, DEMO_MANIFEST

        args.seed_manifest = str(DEMO_MANIFEST)
        settings = dataclasses.replace(settings, api_key=settings.api_key or DEMO_API_KEY)
    return run_from_cli(args, settings)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.demo.run_demo import DemoConfig, run_demo

    chosen = {k: v for k, v in {"num_replicas": args.num_replicas, "examples_per_task": args.examples_per_task}.items()
              if v is not None}
    common = dict(policy=args.policy, port=args.port, device=args.device, quant_method=args.quant_method)
    if args.smoke:
        work_dir = Path(args.work_dir) if args.work_dir else settings.cache_dir / "demo-smoke"
        cfg = DemoConfig.smoke(work_dir=work_dir, **common, **chosen)
    else:
        cfg = DemoConfig(work_dir=Path(args.work_dir) if args.work_dir else None, **common, **chosen)
    run_demo(cfg, settings)
    return 0


_BENCHMARKS = {
    "load": "HTTP load generator against a running server (Poisson / bursty arrivals, JSON summary)",
    "http": "start the Serve app per variant (policy x quantization x compression) and load it (JSON + PNG)",
    "step-cost": "measure engine steps on this device and fit the step-cost model policies read (JSON + PNG)",
}


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Each benchmark parses its own flags (`inlaid-ray bench NAME --help`)."""
    argv = list(args.bench_args)
    if args.benchmark == "load":
        from inlaid_ray.bench.loadgen import main as load_main
        from inlaid_ray.demo.load_driver import demo_mix

        load_main(argv, demo_mix=demo_mix)  # the CLI is the one place that hands the demo to the tools
    elif args.benchmark == "http":
        from inlaid_ray.demo.load_driver import main as http_main

        http_main(argv)
    else:
        from inlaid_ray.bench.step_cost import main as step_cost_main

        step_cost_main(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inlaid-ray", description="Serve one base LLM with many LoRA adapters (tasks): quantize the base once for all "
        "tasks (MLGPTQ), compress adapters per cluster, serve an OpenAI-compatible API on Ray Serve, onboard tasks live.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="base model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prep = model_sub.add_parser("prepare", help="convert the bundled SmolLM2 GGUF into a HF directory (once)")
    prep.add_argument("--cache-dir", help="cache root (default: $INLAID_CACHE_DIR or ~/.cache/inlaid-ray)")
    prep.add_argument("--force", action="store_true", help="convert again even if present")
    prep.set_defaults(func=_cmd_model_prepare)

    gen = sub.add_parser("generate", help="generate text with the base model plus one adapter (or none)")
    which = gen.add_mutually_exclusive_group()
    which.add_argument("--task", help="a demo task name (its committed adapter)")
    which.add_argument("--adapter", help="a PEFT adapter directory")
    gen.add_argument("--prompt", required=True, help="user message (or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, not through the chat template")
    gen.add_argument("--base", help="base model directory (default: the prepared SmolLM2)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    gen.add_argument("--kv-blocks", type=int, default=512, help="KV cache blocks of 16 tokens")
    gen.set_defaults(func=_cmd_generate)

    add_quantize_parser(sub)
    add_eval_parser(sub)
    add_compress_parser(sub)
    add_onboard_parser(sub)
    add_tasks_parser(sub)
    add_keys_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks: " + "; ".join(f"{k}: {v}" for k, v in _BENCHMARKS.items()))
    bench.add_argument("benchmark", choices=list(_BENCHMARKS), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="its own flags (NAME --help lists them)")
    bench.set_defaults(func=_cmd_bench)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible Ray Serve app (router + engine replicas)")
    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="prepare, quantize (MLGPTQ), compress, serve and send requests, end to end")
    demo.add_argument("--work-dir", help="artifacts (default: <cache>/demo; reused when present)")
    demo.add_argument("--smoke", action="store_true",
                      help="the same path at a fraction of the cost (256 calibration tokens per task, 1 replica, "
                           "1 request per task; artifacts under <cache>/demo-smoke); CI runs it")
    demo.add_argument("--num-replicas", type=int, default=None, help="engine replicas (default 2; --smoke: 1)")
    demo.add_argument("--policy", choices=typing.get_args(AppArgs.model_fields["policy"].annotation), default=None,
                      help=f"scheduling policy (default: the serving default, {AppArgs.model_fields['policy'].default})")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--examples-per-task", type=int, default=None,
                      help="eval prompts sent to each task (default 3; --smoke: 1)")
    demo.add_argument("--device", default="cpu", help="device for quantization (cpu, cuda)")
    demo.add_argument("--quant-method", default=DEFAULT_SHARED_METHOD,
                      choices=["gptq-mixed", "mlgptq-channel", "mlgptq", "rtn"],
                      help=f"shared-base quantization (default {DEFAULT_SHARED_METHOD}: load_tests/results/"
                           "quant_quality.md; the element-wise max of mlgptq collapses on the demo tasks)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, Settings.from_env())
    except InlaidError as exc:  # user errors: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
