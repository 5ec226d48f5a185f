"""Idempotent registry bootstrap of the embedded demo: the demo tenant (its API key is
Settings.api_key), an optional admin tenant, and the demo tasks whose trained PEFT adapters
exist, registered live in two clusters (short outputs / long outputs). Running it again
changes nothing unless an adapter file changed (then that task's version goes up), so a
restart keeps the registry. Tasks of the same name owned by another tenant, retired by an
operator or (re-)onboarded with another adapter are left alone.
A demo cluster keeps the members onboarding added to it and its compressed bank (`bank_uri`);
each demo task records its calibration file (`extra["calibration_uri"]`) so that an onboarding
job can compute its MLGPTQ statistics when it re-quantizes the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir, demo_data_path, task_length_stats
from inlaid_ray.registry import ClusterRecord, TaskRecord, TaskRegistry

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"
ADMIN_TENANT = "admin"
# Raw adapters are not compressed yet; the clusters group tasks of similar output length.
DEMO_CLUSTERS: dict[str, tuple[str, ...]] = {
    "demo-short": ("sentiment", "extract"),
    "demo-long": ("rewrite", "email"),
}
# Demo SLO: e2e deadline = TTFT budget + per-token budget * p90 output length (CPU-scale numbers).
SLO_TTFT_S = 2.0
SLO_PER_TOKEN_S = 0.1


@dataclass(frozen=True)
class DemoBootstrap:
    """What the embedded default registers (carried to the router, which runs it at start)."""

    api_key: str
    admin_key: str | None = None
    adapters_dir: str | None = None  # None: the adapters committed in inlaid_ray/demo/adapters
    base_model: str = ""


def adapter_ready(path: Path) -> bool:
    """A complete PEFT directory (training writes the config last)."""
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def _task_record(name: str, cluster: str, path: Path, base_model: str, version: int) -> TaskRecord:
    cfg = json.loads((path / "adapter_config.json").read_text())
    extra: dict[str, float | str] = {}
    try:
        completion = task_length_stats(name)["completion_tokens"]
        extra = {"expected_output_tokens": completion["p50"],
                 "slo_s": SLO_TTFT_S + SLO_PER_TOKEN_S * completion["p90"]}
    except (FileNotFoundError, KeyError) as exc:
        log.warning("no length statistics for demo task %s (%s); no prior or SLO", name, exc)
    calib = demo_data_path(name, "calib")
    if calib.is_file():
        extra["calibration_uri"] = str(calib)  # type: ignore[assignment]
    targets = cfg.get("target_modules") or ()
    return TaskRecord(
        name=name, tenant=DEMO_TENANT, adapter_uri=str(path.resolve()), base_model=base_model,
        rank=int(cfg.get("r", 0)), target_modules=tuple([targets] if isinstance(targets, str) else targets),
        cluster=cluster, version=version, status="live",
        adapter_sha256=hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest(), extra=extra,
    )


def bootstrap_demo(registry: TaskRegistry, boot: DemoBootstrap) -> list[str]:
    """Register the demo tenant, keys and ready demo tasks; returns the live demo task names."""
    registry.bootstrap_keys(boot.api_key, boot.admin_key, tenant=DEMO_TENANT, admin_tenant=ADMIN_TENANT)
    adapters_dir = Path(boot.adapters_dir) if boot.adapters_dir else None
    live: dict[str, list[str]] = {}
    for cluster, names in DEMO_CLUSTERS.items():
        for name in names:
            assert name in DEMO_TASKS, f"demo cluster {cluster} lists unknown task {name!r}"
            path = demo_adapter_dir(name, adapters_dir)
            if not adapter_ready(path):
                log.warning("demo adapter %s missing at %s; task not registered (train it with "
                            "`python -m inlaid_ray.demo.train`)", name, path)
                continue
            old = registry.get_task(name)
            if old is not None and old.tenant != DEMO_TENANT:
                log.warning("task %s belongs to tenant %s; the demo leaves it alone", name, old.tenant)
                continue
            if old is not None and (old.status != "live" or old.adapter_uri != str(path.resolve())):
                # Retired by an operator, or (re-)onboarded by a job: not the bootstrap's to reset.
                log.info("task %s is %s with adapter %s; the demo bootstrap leaves it alone", name, old.status,
                         old.adapter_uri)
                continue
            record = _task_record(name, cluster, path, boot.base_model, old.version if old else 1)
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
        if old_cluster is None or set(old_cluster.members) != wanted:
            version = old_cluster.version + 1 if old_cluster else 1
            registry.upsert_cluster(ClusterRecord(cluster_id=cluster, version=version, members=tuple(wanted),
                                                  bank_uri=old_cluster.bank_uri if old_cluster else ""))
    return sorted(n for members in live.values() for n in members)
