"""Command line entry point `inlaid-ray` (argparse; each subcommand calls library code)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from inlaid_ray.config import Settings


def _cmd_model_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.model.prepare import prepare_smollm2

    cache_dir = Path(args.cache_dir) if args.cache_dir else settings.cache_dir
    print(prepare_smollm2(cache_dir, force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inlaid-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="base model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prep = model_sub.add_parser("prepare", help="convert the bundled SmolLM2 GGUF into a HF directory (once)")
    prep.add_argument("--cache-dir", help="cache root (default: $INLAID_CACHE_DIR or ~/.cache/inlaid-ray)")
    prep.add_argument("--force", action="store_true", help="convert again even if present")
    prep.set_defaults(func=_cmd_model_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args, Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
