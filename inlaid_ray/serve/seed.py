"""Idempotent registry seeding at start-up: API keys, and the tasks and clusters of a seed
manifest, registered live. Without a manifest the service starts with no task (tasks arrive by
onboarding); `inlaid-ray serve --demo` and `inlaid-ray demo` pass the demo's manifest.

The manifest is JSON; relative paths are relative to the manifest's own directory:

    {"tenant": "demo", "bank_rank": 16,
     "clusters": {"demo-short": ["sentiment", "extract"], "demo-long": ["rewrite", "email"]},
     "tasks": {"sentiment": {"adapter": "adapters/sentiment", "calibration": "data/sentiment/calib.jsonl",
                             "expected_output_tokens": 1.0, "slo_s": 2.1}, ...}}

Seeding again changes nothing unless an adapter file changed (then that task's version goes up),
so a restart keeps the registry. Tasks of the same name owned by another tenant, retired by an
operator or (re-)onboarded with another adapter are left alone. A seeded cluster keeps the members
onboarding added to it and its compressed bank (`bank_uri`); each task records its calibration
file (`extra["calibration_uri"]`) so that an onboarding job can compute its MLGPTQ statistics
when it re-quantizes the base. With `adapter_format="jd_bank"` each cluster is registered as a
compressed bank (rank `bank_rank`) built from its adapters the first time, and rebuilt only when
an adapter file changed (the bank's index records their sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.lora import load_peft_adapter
from inlaid_ray.lora.cluster_bank import INDEX_FILE, save_cluster_banks
from inlaid_ray.compress.clustering import ClusterConfig
from inlaid_ray.compress.jd import JDConfig
from inlaid_ray.compress.adapter_set import compress_adapter_set
from inlaid_ray.model import ModelConfig
from inlaid_ray.registry import ClusterRecord, TaskRecord, TaskRegistry

log = logging.getLogger(__name__)

ADMIN_TENANT = "admin"
DEFAULT_TENANT = "default"  # owner of the user key when no manifest names a tenant


@dataclass(frozen=True)
class SeedTask:
    """One task of a manifest, paths resolved."""

    adapter_dir: Path
    calibration: Path | None = None
    expected_output_tokens: float | None = None  # the length predictor's prior
    slo_s: float | None = None  # end-to-end deadline


@dataclass(frozen=True)
class SeedManifest:
    """Tasks grouped into clusters, all owned by `tenant`."""

    tenant: str
    clusters: dict[str, tuple[str, ...]]
    tasks: dict[str, SeedTask]
    bank_rank: int = 16  # shared rank of a cluster's compressed bank ("jd_bank")

    @classmethod
    def load(cls, path: str | Path) -> "SeedManifest":
        path = Path(path)
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
            root = path.parent

            def resolve(p: str | None) -> Path | None:
                return None if p is None else (root / p).resolve()

            tasks = {name: SeedTask(resolve(t["adapter"]), resolve(t.get("calibration")),
                                    t.get("expected_output_tokens"), t.get("slo_s"))
                     for name, t in raw["tasks"].items()}
            clusters = {c: tuple(members) for c, members in raw["clusters"].items()}
            manifest = cls(raw["tenant"], clusters, tasks, int(raw.get("bank_rank", 16)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"seed manifest {path}: {exc!r}") from exc
        unknown = {n for members in clusters.values() for n in members} - set(tasks)
        if unknown:
            raise InvalidRequest(f"seed manifest {path}: clusters list tasks it does not define: {sorted(unknown)}")
        return manifest


@dataclass(frozen=True)
class RegistrySeed:
    """What the app registers at start (carried to the router, which seeds again at its start)."""

    api_key: str | None = None  # the manifest tenant's (or DEFAULT_TENANT's) key; None: none
    admin_key: str | None = None
    manifest: str | None = None  # path of a seed manifest; None: keys only
    base_model: str = ""
    adapter_format: str = "peft"  # "jd_bank": register the manifest's clusters as compressed banks
    model_dir: str = ""  # base the banks are built for ("jd_bank" only)
    banks_dir: str = ""  # where the compressed banks live ("jd_bank" only; see cluster_banks_root)


def cluster_banks_root(artifact_dir: str | Path) -> Path:
    """Directory of the seeded clusters' compressed banks under an artifact root."""
    return Path(artifact_dir) / "seed-banks"


def cluster_bank_dir(banks_dir: str | Path, cluster: str) -> Path:
    """The compressed bank of one seeded cluster."""
    return Path(banks_dir) / cluster


def adapter_ready(path: Path) -> bool:
    """A complete PEFT directory (training writes the config last)."""
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def adapter_sha256(path: Path) -> str:
    """sha256 of a PEFT directory's weights file (the registry's adapter_sha256)."""
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def ensure_cluster_bank(cluster: str, paths: dict[str, Path], model_dir: str | Path, banks_dir: str | Path,
                        rank: int) -> Path:
    """The compressed bank of `cluster`'s adapters `paths` (task -> PEFT dir), built if missing or
    built from other adapter files (one cluster, full cores)."""
    out = cluster_bank_dir(banks_dir, cluster)
    sources = {name: adapter_sha256(path) for name, path in sorted(paths.items())}
    index = out / INDEX_FILE
    if index.is_file() and json.loads(index.read_text()).get("extra", {}).get("seed_sources") == sources:
        return out
    config = ModelConfig.from_dir(model_dir)
    adapters = [load_peft_adapter(path, config, name=name) for name, path in sorted(paths.items())]
    compressed = compress_adapter_set(adapters, ClusterConfig(jd=JDConfig(rank=rank), num_clusters=1), progress=False)
    compressed.banks.extra["seed_sources"] = sources
    save_cluster_banks(compressed.banks, out, overwrite=True)
    log.info("cluster %s: compressed bank of %s written to %s (%.1fs)", cluster, sorted(paths), out,
             compressed.seconds)
    return out


def _task_record(name: str, task: SeedTask, tenant: str, cluster: str, base_model: str, version: int) -> TaskRecord:
    path = task.adapter_dir
    cfg = json.loads((path / "adapter_config.json").read_text())
    extra: dict[str, float | str] = {}
    if task.expected_output_tokens is not None:
        extra["expected_output_tokens"] = task.expected_output_tokens
    if task.slo_s is not None:
        extra["slo_s"] = task.slo_s
    if task.calibration is not None and task.calibration.is_file():
        extra["calibration_uri"] = str(task.calibration)
    targets = cfg.get("target_modules") or ()
    return TaskRecord(
        name=name, tenant=tenant, adapter_uri=str(path.resolve()), base_model=base_model,
        rank=int(cfg.get("r", 0)), target_modules=tuple([targets] if isinstance(targets, str) else targets),
        cluster=cluster, version=version, status="live", adapter_sha256=adapter_sha256(path), extra=extra,
    )


def seed_registry(registry: TaskRegistry, seed: RegistrySeed) -> list[str]:
    """Register the keys and the manifest's ready tasks; returns the live seeded task names."""
    manifest = SeedManifest.load(seed.manifest) if seed.manifest else None
    tenant = manifest.tenant if manifest else DEFAULT_TENANT
    registry.bootstrap_keys(seed.api_key, seed.admin_key, tenant=tenant, admin_tenant=ADMIN_TENANT)
    if manifest is None:
        return []
    live: dict[str, list[str]] = {}
    for cluster, names in manifest.clusters.items():
        for name in names:
            task = manifest.tasks[name]
            if not adapter_ready(task.adapter_dir):
                log.warning("adapter of %s missing at %s; task not registered", name, task.adapter_dir)
                continue
            old = registry.get_task(name)
            if old is not None and old.tenant != tenant:
                log.warning("task %s belongs to tenant %s; seeding leaves it alone", name, old.tenant)
                continue
            if old is not None and (old.status != "live" or old.adapter_uri != str(task.adapter_dir.resolve())):
                # Retired by an operator, or (re-)onboarded by a job: not the seed's to reset.
                log.info("task %s is %s with adapter %s; seeding leaves it alone", name, old.status, old.adapter_uri)
                continue
            record = _task_record(name, task, tenant, cluster, seed.base_model, old.version if old else 1)
            unchanged = old is not None and old.status == "live" and old.cluster == cluster and \
                old.adapter_sha256 == record.adapter_sha256 and old.adapter_uri == record.adapter_uri and \
                old.extra == record.extra
            if not unchanged:
                if old is not None and old.adapter_sha256 != record.adapter_sha256:
                    record = replace(record, version=old.version + 1)
                registry.upsert_task(record)
            live.setdefault(cluster, []).append(name)
    for cluster, members in live.items():
        old_cluster = registry.get_cluster(cluster)
        wanted = set(members)
        for name in old_cluster.members if old_cluster else ():  # members onboarding added stay
            task = registry.get_task(name)
            if task is not None and task.status in ("live", "onboarding") and task.cluster == cluster:
                wanted.add(name)
        bank_uri = old_cluster.bank_uri if old_cluster else ""
        fmt = old_cluster.format if old_cluster else "peft"
        if wanted == set(members):  # only seeded members: the seed decides how they are served
            fmt = seed.adapter_format
            if fmt == "jd_bank":
                paths = {name: manifest.tasks[name].adapter_dir for name in members}
                bank_uri = str(ensure_cluster_bank(cluster, paths, seed.model_dir, seed.banks_dir, manifest.bank_rank))
        if old_cluster is None or set(old_cluster.members) != wanted or \
                (old_cluster.format, old_cluster.bank_uri) != (fmt, bank_uri):
            version = old_cluster.version + 1 if old_cluster else 1
            registry.upsert_cluster(ClusterRecord(cluster_id=cluster, version=version, members=tuple(wanted),
                                                  bank_uri=bank_uri, format=fmt))
    return sorted(n for members in live.values() for n in members)
