"""The one Serve application builder (`inlaid_ray.serve.app:build_app`) behind
deploy/serve_config.yaml, `serve run`, `inlaid-ray serve` and the KubeRay RayService
(docs/style.md rule 17): typed `AppArgs` -> Router (ingress) bound to the EngineReplica deployment
with the cluster-affinity request router.

Unset fields fall back to the process settings (`inlaid_ray.config.Settings`: INLAID_CACHE_DIR,
INLAID_API_KEY, INLAID_ADMIN_KEY, REDIS_URL) of the process that builds the app. `model_dir`
None means the bundled SmolLM2, converted here once if missing; on a multi-node cluster point
`model_dir` and `artifact_dir` at a path every node sees.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from inlaid_ray.config import Settings
from inlaid_ray.engine import EngineConfig, limits
from inlaid_ray.model import ModelConfig
from inlaid_ray.model.prepare import prepare_smollm2
from inlaid_ray.serve.app_args import AppArgs
from inlaid_ray.serve.engine_builder import ReplicaSpec
from inlaid_ray.serve.replica import EngineReplica
from inlaid_ray.serve.router import Router, RouterSpec
from inlaid_ray.serve.seed import RegistrySeed, cluster_banks_root

REQUEST_ROUTER_PATH = "inlaid_ray.serve.request_router:ClusterAffinityRouter"
__all__ = ["AppArgs", "AppSpecs", "app_specs", "bind_app", "build_app", "derive_spec", "engine_deployment_options"]

Spec = TypeVar("Spec")


def resolve_model_dir(args: AppArgs, settings: Settings) -> Path:
    """The base model directory, preparing the bundled SmolLM2 when none is given."""
    return Path(args.model_dir) if args.model_dir else prepare_smollm2(settings.cache_dir)


def resolve_max_model_len(args: AppArgs, model_config: ModelConfig) -> int:
    """The engine's rule (engine/limits.py), so router and replicas agree on the limit."""
    return limits.resolve_max_model_len(args.max_model_len, model_config.max_position_embeddings,
                                        args.max_num_batched_tokens)


def read_chat_template(path: str | None) -> str | None:
    """The text of AppArgs.chat_template, read once here so every router replica gets the same."""
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"chat_template {path!r} cannot be read: {exc.strerror}") from exc


def registry_seed(args: AppArgs, settings: Settings, model_dir: Path, artifact_dir: str | Path,
                  base_model_id: str) -> RegistrySeed:
    """What the registry is seeded with at start: keys, and the manifest's tasks if one is given."""
    return RegistrySeed(api_key=args.api_key or settings.api_key, admin_key=args.admin_key or settings.admin_key,
                        manifest=args.seed_manifest, base_model=base_model_id, adapter_format=args.adapter_format,
                        model_dir=str(model_dir), banks_dir=str(cluster_banks_root(artifact_dir)))


def registry_location(args: AppArgs, settings: Settings) -> tuple[str | None, str]:
    """(redis URL or None for embedded, embedded data directory)."""
    return args.redis_url or settings.redis_url, args.data_dir or str(settings.cache_dir / "registry")


def build_app(args: dict[str, Any]) -> Application:
    """The Serve builder (exactly one parameter, as Serve requires): validate and bind the app."""
    return bind_app(AppArgs.model_validate(args or {}), Settings.from_env())


def derive_spec(cls: type[Spec], args: AppArgs, **resolved: Any) -> Spec:
    """A `cls` dataclass derived from `args`: a field takes the AppArgs field (or property) of the
    same name, unless it is `resolved` here (paths, the resolved length limit, nested specs).
    Fields with neither keep their dataclass default, so a spec never restates an AppArgs default."""
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(resolved) - names:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    taken = {n: getattr(args, n) for n in names - set(resolved) if hasattr(args, n)}
    return cls(**taken, **resolved)


@dataclasses.dataclass(frozen=True)
class AppSpecs:
    """What the deployments are bound with, all derived from one AppArgs."""

    replica: ReplicaSpec
    router: RouterSpec


def app_specs(args: AppArgs, settings: Settings) -> AppSpecs:
    """The replica and router specs of `args`; the only values not copied by name are resolved here."""
    model_dir = resolve_model_dir(args, settings)
    max_model_len = resolve_max_model_len(args, ModelConfig.from_dir(model_dir))
    redis_url, data_dir = registry_location(args, settings)
    artifact_dir = args.artifact_dir or str(settings.cache_dir / "artifacts")
    base_model_id = args.base_model_id or model_dir.name
    # dtype/device are the replica's strings ("auto", ...); the engine takes the model's.
    engine = derive_spec(EngineConfig, args, max_model_len=max_model_len, dtype=None, device=None)
    replica = derive_spec(
        ReplicaSpec, args, model_dir=str(model_dir), artifact_dir=artifact_dir, engine=engine,
        device="cuda" if args.device == "auto" and args.num_gpus_per_replica > 0 else args.device,
        torch_threads=args.torch_threads or max(1, int(args.num_cpus_per_replica)),
    )
    router = derive_spec(
        RouterSpec, args, model_dir=str(model_dir), base_model_id=base_model_id, max_model_len=max_model_len,
        redis_url=redis_url, data_dir=data_dir, chat_template=read_chat_template(args.chat_template),
        registry_seed=registry_seed(args, settings, model_dir, artifact_dir, base_model_id),
    )
    return AppSpecs(replica=replica, router=router)


def engine_deployment_options(args: AppArgs) -> dict[str, Any]:
    """`EngineReplica.options(...)` of `args`: a fixed replica count or Serve's autoscaling."""
    count: dict[str, Any] = ({"num_replicas": args.num_replicas} if args.autoscaling is None
                             else {"autoscaling_config": args.autoscaling.model_dump()})
    return count | dict(
        max_ongoing_requests=args.max_ongoing_requests,
        graceful_shutdown_timeout_s=args.shutdown_drain_timeout_s,
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica},
        request_router_config=RequestRouterConfig(
            request_router_class=REQUEST_ROUTER_PATH,
            request_router_kwargs={"affinity_hint_s": args.affinity_hint_s, "imbalance_tokens": args.imbalance_tokens,
                                   "max_clusters_per_replica": args.max_clusters_per_replica},
            request_routing_stats_period_s=args.routing_stats_period_s,
        ),
    )


def bind_app(args: AppArgs, settings: Settings) -> Application:
    """Router (ingress) bound to EngineReplica with cluster-affinity routing."""
    specs = app_specs(args, settings)
    replicas = EngineReplica.options(**engine_deployment_options(args)).bind(specs.replica, args.engine_factory)
    return Router.options(
        num_replicas=args.num_router_replicas,
        max_ongoing_requests=args.router_max_ongoing_requests,
        graceful_shutdown_timeout_s=args.shutdown_drain_timeout_s,
        ray_actor_options={"num_cpus": 0},
    ).bind(replicas, specs.router)
