"""`inlaid-ray onboard --submit`: run the onboarding as a Ray job on the serving cluster (what
`ray job submit -- inlaid-ray onboard ...` does) and follow it to its end, with nothing to set
up first. The job goes to the Ray dashboard that `inlaid-ray serve` recorded in the registry
(or `--ray-dashboard`), so it never lands on another Ray cluster of the same host; its driver
joins that cluster through the RAY_ADDRESS the job agent sets.

Why not only `ray job submit`: since Ray 2.59 a cluster that `ray.init()` starts has token
authentication on, but Ray's job CLI sends the token only when RAY_AUTH_MODE=token is set in its
environment (`ray job submit` then fails with "Authentication token is missing"). Here the token
is used exactly when `ray start` would use it: RAY_AUTH_MODE unset and a token available.

Secrets: the job inherits the serving cluster's environment (INLAID_ADMIN_KEY, REDIS_URL of
`inlaid-ray serve`). An admin key or Redis URL given here travels in the job's runtime_env,
which the dashboard shows to whoever holds the cluster's token; never in its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from inlaid_ray.config import Settings
from inlaid_ray.errors import InvalidRequest

# Flags whose value is a local path: sent absolute, since the job's working directory is not ours.
_PATH_FLAGS = ("adapter", "calib", "batch", "eval_data", "base_dir", "artifact_dir", "data_dir", "report")
# Flags sent through the job's environment instead of its command line (env var, flag).
_SECRET_FLAGS = {"admin_key": "INLAID_ADMIN_KEY", "redis_url": "REDIS_URL"}
# How long a stopped job may take to roll back before Ray kills it (Ray's default is 3 s).
ROLLBACK_WAIT_S = 120


def job_argv(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """The `inlaid-ray onboard` arguments of the job: what was given here as `--flag=value`,
    paths made absolute, without --submit, --ray-dashboard and the secret flags, and without
    progress bars (job logs are not a terminal)."""
    argv = [f"--{name}={getattr(args, name)}" for name in ("task", "tenant") if getattr(args, name, None)]
    for name in ("adapter", "calib", "batch", *(f.replace("-", "_") for f in flags)):
        value = getattr(args, name, None)
        if value is None or name in _SECRET_FLAGS:
            continue
        if name in _PATH_FLAGS:
            value = str(Path(value).resolve())
        argv.append(f"--{name.replace('_', '-')}={value}")
    if args.no_ray:
        argv.append("--no-ray")
    if args.report:
        argv.append(f"--report={Path(args.report).resolve()}")
    return argv + ["--no-progress"]


def dashboard_address(args: argparse.Namespace, registry: Any) -> str:
    """--ray-dashboard, else the dashboard `inlaid-ray serve` recorded in `registry`."""
    if args.ray_dashboard:
        return args.ray_dashboard
    from inlaid_ray.jobs.service import running_service

    location = running_service(registry)
    if location is None or not location.ray_dashboard:
        raise InvalidRequest(f"no running `inlaid-ray serve` with a Ray dashboard is recorded in namespace "
                             f"{registry.namespace!r} of the registry; pass --ray-dashboard URL")
    return location.ray_dashboard


def _use_cluster_token() -> None:
    # Ray's own rule for `ray start`: RAY_AUTH_MODE unset + a token on disk -> token mode.
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # Ray < 2.59: no token authentication to set up
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def submit_and_follow(args: argparse.Namespace, flags: tuple[str, ...], options: Any, settings: Settings) -> int:
    """Submit the job, stream its log here, and return its driver's exit code (2: the input was
    refused, 1: the job failed and rolled back). Ctrl-C stops the job and waits for its rollback."""
    from ray.job_submission import JobSubmissionClient

    from inlaid_ray.registry import TaskRegistry, connect_redis
    from inlaid_ray.registry.records import check_name, check_task_name

    if args.batch:  # its tasks are read (and refused if malformed) here, before a job is submitted
        from inlaid_ray.jobs.onboard import read_task_specs

        specs = read_task_specs(args.batch)
    else:
        from inlaid_ray.jobs.onboard import TaskSpec

        specs = [TaskSpec(args.task, args.tenant, Path(args.adapter), Path(args.calib))]
    for spec in specs:
        check_task_name(spec.task)  # it names the submission, and a bad one should not travel
        check_name("tenant", spec.tenant)
    client = connect_redis(options.redis_url or settings.redis_url, options.data_dir or settings.cache_dir / "registry")
    try:
        address = dashboard_address(args, TaskRegistry(client, options.namespace))
    finally:
        client.close()
    _use_cluster_token()
    try:
        jobs = JobSubmissionClient(address)
    except ConnectionError as exc:
        raise InvalidRequest(f"the Ray dashboard at {address} does not answer ({exc}); is `inlaid-ray serve` "
                             "still running? pass --ray-dashboard URL otherwise") from None
    env = {var: getattr(args, name) for name, var in _SECRET_FLAGS.items() if getattr(args, name)}
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(ROLLBACK_WAIT_S)
    job_id = None
    try:
        job_id = jobs.submit_job(entrypoint=shlex.join(["inlaid-ray", "onboard", *job_argv(args, flags)]),
                                 submission_id=f"onboard-{specs[0].task}-{uuid.uuid4().hex[:8]}",
                                 runtime_env={"env_vars": env})
        print(f"inlaid-ray: submitted {job_id} to {address}", file=sys.stderr, flush=True)
        asyncio.run(_follow(jobs, job_id))
    except KeyboardInterrupt:
        if job_id is None:
            raise
        print(f"inlaid-ray: stopping {job_id}; waiting for its rollback", file=sys.stderr, flush=True)
        jobs.stop_job(job_id)
        _wait_final(jobs, job_id, ROLLBACK_WAIT_S + 30)
        return 130
    return _exit_code(_wait_final(jobs, job_id, 60), job_id)


async def _follow(jobs: Any, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _wait_final(jobs: Any, job_id: str, timeout_s: float) -> Any:
    """The job's info once its status is final (or the last one seen after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    info = jobs.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = jobs.get_job_info(job_id)
    return info


def _exit_code(info: Any, job_id: str) -> int:
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    print(f"inlaid-ray: {job_id} {info.status.value.lower()}: {info.message or ''}".rstrip(), file=sys.stderr)
    return info.driver_exit_code if info.driver_exit_code in (1, 2) else 1
