"""Ray Serve application: OpenAI-compatible router (ingress), engine replicas multiplexed by
adapter cluster, cluster-affinity request router, metrics, and the app builder used by
deploy/serve_config.yaml, `serve run`, `inlaid-ray serve` and KubeRay.

Names are re-exported lazily (PEP 562) so that `inlaid_ray.serve.cli_args` and the
`inlaid-ray` CLI do not pay for importing Ray until a command needs it.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AppArgs": "inlaid_ray.serve.app",
    "bind_app": "inlaid_ray.serve.app",
    "build_app": "inlaid_ray.serve.app",
    "EngineBundle": "inlaid_ray.serve.engine_builder",
    "ReplicaSpec": "inlaid_ray.serve.engine_builder",
    "build_engine": "inlaid_ray.serve.engine_builder",
    "run_serve": "inlaid_ray.serve.launcher",
    "EngineReplica": "inlaid_ray.serve.replica",
    "ClusterAffinityRouter": "inlaid_ray.serve.request_router",
    "rank_replicas": "inlaid_ray.serve.request_router",
    "REPLICA_HEADER": "inlaid_ray.serve.router",
    "Router": "inlaid_ray.serve.router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'inlaid_ray.serve' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
