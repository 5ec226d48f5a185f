"""Flags of `inlaid-ray serve`: a chosen subset of the `AppArgs` fields, whose defaults, choices and
help come from `AppArgs` itself (serve/app_args.py, which imports no Ray or torch). A flag left
out takes the AppArgs default; validation happens in AppArgs when the command runs."""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.serve.app_args import AppArgs

# AppArgs fields offered as flags (--model-dir for model_dir, ...); every other field is --arg KEY=VALUE.
CLI_FIELDS = (
    "model_dir", "seed_manifest", "num_replicas", "num_gpus_per_replica", "num_cpus_per_replica", "policy",
    "step_cost_model", "max_clusters_per_replica", "max_model_len", "num_kv_blocks", "dtype", "device",
    "api_key", "admin_key", "predictor", "chat_template",
)
# The one default the CLI sets differently: AppArgs sizes the KV cache from free memory (right for a
# GPU replica); the local CLI, mostly run on CPU, caps it at 1024 blocks unless told 0.
CLI_NUM_KV_BLOCKS = 1024


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_kwargs(name: str) -> dict[str, Any]:
    """argparse kwargs for one AppArgs field: its type, its Literal choices, help with its default."""
    info = AppArgs.model_fields[name]
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`: the flag's type is X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    kwargs: dict[str, Any] = {"default": None}
    if typing.get_origin(kind) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(kind))
    elif kind in (int, float):
        kwargs["type"] = kind
    shown = info.default_factory is None and info.default is not None  # else the description says what happens
    kwargs["help"] = f"{info.description} (default {info.default})" if shown else info.description
    return kwargs


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` subcommand's flags to `parser`."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    seed = parser.add_mutually_exclusive_group()
    seed.add_argument("--demo", action="store_true",
                      help="seed the demo tenant and its four tasks (key: $INLAID_API_KEY, else 'demo')")
    for name in CLI_FIELDS:
        kwargs = _field_kwargs(name)
        if name == "num_kv_blocks":
            kwargs.update(default=CLI_NUM_KV_BLOCKS,
                          help=f"KV blocks per replica (default {CLI_NUM_KV_BLOCKS}, sized for CPU; 0 = from free memory)")
        (seed if name == "seed_manifest" else parser).add_argument(_flag(name), **kwargs)
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="any other AppArgs field (value parsed as JSON, else taken as a string); repeatable")


def app_fields_from_cli(ns: argparse.Namespace) -> dict[str, Any]:
    """AppArgs fields (as a dict) from flags parsed by `add_cli_arguments`: only those given."""
    fields: dict[str, Any] = {name: getattr(ns, name) for name in CLI_FIELDS if getattr(ns, name) is not None}
    if fields.get("num_kv_blocks") == 0:
        fields["num_kv_blocks"] = None  # 0 on the command line: size from free memory
    for item in ns.arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"--arg {item!r}: expected KEY=VALUE")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields
