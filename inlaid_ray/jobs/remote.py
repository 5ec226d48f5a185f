"""Run one onboarding step as a Ray task, on a GPU when the cluster has one (`ray job submit`
drivers usually run on the CPU head node while the GPUs sit on workers), or in this process
when Ray is not wanted. Exceptions raised in the task come back as the original exception."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteSettings:
    """Where the heavy steps run."""

    use_ray: bool = True  # False: run in the job's own process
    num_gpus: float | None = None  # None: 1 when the Ray cluster has a GPU, else 0
    num_cpus: float = 1.0  # CPUs the task reserves (0 lets it share CPUs with serving replicas)
    ray_address: str | None = None  # used only when Ray is not initialized yet (None = start a local instance)


def _gpus(settings: RemoteSettings) -> float:
    import ray

    if settings.num_gpus is not None:
        return settings.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_step(name: str, fn: Callable[..., T], *args: Any, remote: RemoteSettings = RemoteSettings(),
             **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` as a Ray task named `name` (or in-process), returning its result."""
    settings = remote
    if not settings.use_ray:
        return fn(*args, **kwargs)
    import ray

    if not ray.is_initialized():
        # `ray job submit` sets RAY_ADDRESS; otherwise a local instance ("local" never waits on a stale
        # /tmp/ray/ray_current_cluster), as `inlaid-ray serve` does.
        ray.init(address=settings.ray_address or "local", log_to_driver=True)
    gpus = _gpus(settings)
    task = ray.remote(fn).options(name=name, num_gpus=gpus, num_cpus=settings.num_cpus, max_retries=0)
    log.info("running %s as a Ray task (num_gpus=%g, num_cpus=%g)", name, gpus, settings.num_cpus)
    ref = task.remote(*args, **kwargs)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        # The task's own exception (AdapterError, ValueError, ...), not Ray's wrapper.
        cause = exc.as_instanceof_cause()
        raise cause from None
    except BaseException:
        ray.cancel(ref, force=True)  # interrupted driver: do not leave the step running
        raise
