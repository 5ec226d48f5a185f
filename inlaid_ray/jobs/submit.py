"""`inlaid-ray onboard --submit`: run the onboarding as a Ray job on the serving cluster (what
`ray job submit -- inlaid-ray onboard ...` does) and follow it to its end, with nothing to set
up first. The job goes to the Ray dashboard that `inlaid-ray serve` recorded in the registry
(or `--ray-dashboard`), so it never lands on another Ray cluster of the same host; its driver
joins that cluster through the RAY_ADDRESS the job agent sets.

Why not only `ray job submit`: since Ray 2.59 a cluster that `ray.init()` starts has token
authentication on, but Ray's job CLI sends the token only when RAY_AUTH_MODE=token is set in its
environment (`ray job submit` then fails with "Authentication token is missing"). Here the token
is used exactly when `ray start` would use it: RAY_AUTH_MODE unset and a token available.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from inlaid_ray.config import Settings
from inlaid_ray.errors import InvalidRequest

# Flags whose value is a local path: sent absolute, since the job's working directory is not ours.
_PATH_FLAGS = ("adapter", "calib", "base_dir", "artifact_dir", "data_dir", "report")


def job_argv(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """The `inlaid-ray onboard` arguments of the job: what was given here, paths made absolute,
    without --submit, --ray-dashboard and --admin-key (the key travels in the job's environment,
    not in its command line that the dashboard lists), and without progress bars (job logs are
    not a terminal)."""
    argv = ["--task", args.task, "--tenant", args.tenant]
    for name in ("adapter", "calib", *(f.replace("-", "_") for f in flags)):
        value = getattr(args, name, None)
        if value is None or name == "admin_key":
            continue
        if name in _PATH_FLAGS:
            value = str(Path(value).resolve())
        argv += [f"--{name.replace('_', '-')}", str(value)]
    if args.no_ray:
        argv.append("--no-ray")
    if args.report:
        argv += ["--report", str(Path(args.report).resolve())]
    return argv + ["--no-progress"]


def dashboard_address(args: argparse.Namespace, settings: Settings) -> str:
    """--ray-dashboard, else the dashboard `inlaid-ray serve` recorded in the registry."""
    if args.ray_dashboard:
        return args.ray_dashboard
    from inlaid_ray.registry import TaskRegistry, connect_redis

    data_dir = args.data_dir or settings.cache_dir / "registry"
    client = connect_redis(args.redis_url or settings.redis_url, data_dir)
    try:
        location = TaskRegistry(client, args.namespace).service_location()
    finally:
        client.close()
    if location is None or not location.ray_dashboard:
        raise InvalidRequest(f"no running `inlaid-ray serve` with a Ray dashboard is recorded in namespace "
                             f"{args.namespace!r} of the registry; pass --ray-dashboard URL")
    return location.ray_dashboard


def _use_cluster_token() -> None:
    # Ray's own rule for `ray start`: RAY_AUTH_MODE unset + a token on disk -> token mode.
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def submit_and_follow(args: argparse.Namespace, flags: tuple[str, ...], settings: Settings) -> int:
    """Submit the job, stream its log here, and return its driver's exit code (2: the input was
    refused, 1: the job failed and rolled back). Ctrl-C stops the job, which then rolls back."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = dashboard_address(args, settings)
    _use_cluster_token()
    client = JobSubmissionClient(address)
    env = {"INLAID_ADMIN_KEY": args.admin_key or settings.admin_key or ""}
    entrypoint = shlex.join(["inlaid-ray", "onboard", *job_argv(args, flags)])
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=f"onboard-{args.task}-{uuid.uuid4().hex[:8]}",
                               runtime_env={"env_vars": {k: v for k, v in env.items() if v}})
    print(f"inlaid-ray: submitted {job_id} to {address}", file=sys.stderr, flush=True)
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"inlaid-ray: stopping {job_id}; it rolls back", file=sys.stderr, flush=True)
        return 130
    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    print(f"inlaid-ray: {job_id} {info.status.value.lower()}: {info.message or ''}".rstrip(), file=sys.stderr)
    return info.driver_exit_code if info.driver_exit_code in (1, 2) else 1


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
