"""Flags of `inlaid-ray serve` and their AppArgs fields; imports nothing heavy (no Ray), so the
CLI parser can be built quickly. Validation happens in AppArgs when the command runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from inlaid_ray.errors import InvalidRequest


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` subcommand's flags to `parser`."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--model-dir", help="base model directory (default: the bundled SmolLM2)")
    seed = parser.add_mutually_exclusive_group()
    seed.add_argument("--demo", action="store_true",
                      help="seed the demo tenant and its four tasks (key: $INLAID_API_KEY, else 'demo')")
    seed.add_argument("--seed-manifest", help="JSON manifest of tasks registered live at start (default: none)")
    parser.add_argument("--num-replicas", type=int, default=2, help="engine replicas (default 2)")
    parser.add_argument("--num-gpus-per-replica", type=float, default=0, help="GPUs per replica (default 0 = CPU)")
    parser.add_argument("--num-cpus-per-replica", type=float, default=1, help="CPUs per replica (default 1)")
    parser.add_argument("--policy", choices=["fifo", "mlfq", "srtf-task-cap", "srtf-cost"], default="srtf-cost",
                        help="scheduling policy (default inlaid; fifo = S-LoRA's)")
    parser.add_argument("--step-cost-model", default=None,
                        help="inlaid's step-cost model, fitted on the replicas' device (inlaid-ray bench step-cost JSON)")
    parser.add_argument("--max-clusters-per-replica", type=int, default=2, help="resident adapter clusters per replica")
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per sequence")
    parser.add_argument("--num-kv-blocks", type=int, default=1024,
                        help="KV blocks of 16 tokens per replica (default 1024, sized for CPU; 0 = from free memory)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights and activations (default auto: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="replica device (default auto: cuda when --num-gpus-per-replica > 0)")
    parser.add_argument("--api-key", help="the user key (default: $INLAID_API_KEY); stored hashed")
    parser.add_argument("--admin-key", help="the admin key (default: $INLAID_ADMIN_KEY); stored hashed")
    parser.add_argument("--predictor", default=None,
                        help="length predictor: task_quantile | minilm | module:factory (default minilm if installed)")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="any other AppArgs field (value parsed as JSON, else taken as a string); repeatable")


def app_fields_from_cli(ns: argparse.Namespace) -> dict[str, Any]:
    """AppArgs fields (as a dict) from flags parsed by `add_cli_arguments`."""
    fields: dict[str, Any] = {
        "model_dir": ns.model_dir, "num_replicas": ns.num_replicas, "num_gpus_per_replica": ns.num_gpus_per_replica,
        "num_cpus_per_replica": ns.num_cpus_per_replica, "policy": ns.policy, "step_cost_model": ns.step_cost_model,
        "max_clusters_per_replica": ns.max_clusters_per_replica, "max_model_len": ns.max_model_len,
        "num_kv_blocks": ns.num_kv_blocks or None, "dtype": ns.dtype, "device": ns.device,
        "seed_manifest": ns.seed_manifest, "api_key": ns.api_key, "admin_key": ns.admin_key,
    }
    if ns.predictor is not None:  # else AppArgs' default (the learned predictor when installed)
        fields["predictor"] = ns.predictor
    for item in ns.arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"--arg {item!r}: expected KEY=VALUE")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields
