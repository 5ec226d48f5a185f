"""Idempotent registry bootstrap of the embedded demo: the demo tenant (its API key is
Settings.api_key), an optional admin tenant, and the demo tasks whose trained PEFT adapters
exist, registered live in two clusters (short outputs / long outputs). Running it again
changes nothing unless an adapter file changed (then that task's version goes up), so a
restart keeps the registry. Tasks of the same name owned by another tenant, retired by an
operator or (re-)onboarded with another adapter are left alone.
A demo cluster keeps the members onboarding added to it and its compressed bank (`bank_uri`);
each demo task records its calibration file (`extra["calibration_uri"]`) so that an onboarding
job can compute its MLGPTQ statistics when it re-quantizes the base.
With `adapter_format="jd_bank"` each demo cluster is registered as a compressed bank (format
"jd_bank", rank DEMO_BANK_RANK) built from its demo adapters into `banks_dir/<cluster>` the first
time, and rebuilt only when an adapter file changed (the bank's index records their sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir, demo_data_path, task_length_stats
from inlaid_ray.lora import load_peft_adapter
from inlaid_ray.lora.cluster_bank import INDEX_FILE, save_cluster_banks
from inlaid_ray.lora.clustering import ClusterConfig
from inlaid_ray.lora.compress_jd import JDConfig
from inlaid_ray.lora.compress_set import compress_adapter_set
from inlaid_ray.model import ModelConfig
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
DEMO_BANK_RANK = 16  # shared rank of a demo cluster's compressed bank


@dataclass(frozen=True)
class DemoBootstrap:
    """What the embedded default registers (carried to the router, which runs it at start)."""

    api_key: str
    admin_key: str | None = None
    adapters_dir: str | None = None  # None: the adapters committed in inlaid_ray/demo/adapters
    base_model: str = ""
    adapter_format: str = "peft"  # "jd_bank": register the demo clusters as compressed banks
    model_dir: str = ""  # base the banks are built for ("jd_bank" only)
    banks_dir: str = ""  # where the demo banks live ("jd_bank" only; see demo_banks_root)


def demo_banks_root(artifact_dir: str | Path) -> Path:
    """Directory of the demo clusters' compressed banks under an artifact root."""
    return Path(artifact_dir) / "demo-banks"


def demo_bank_dir(banks_dir: str | Path, cluster: str) -> Path:
    """The compressed bank of one demo cluster."""
    return Path(banks_dir) / cluster


def _sha256(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def ensure_demo_bank(cluster: str, paths: dict[str, Path], model_dir: str | Path, banks_dir: str | Path) -> Path:
    """The compressed bank of `cluster`'s adapters `paths` (task -> PEFT dir), built if missing or
    built from other adapter files (rank DEMO_BANK_RANK, one cluster, full cores)."""
    out = demo_bank_dir(banks_dir, cluster)
    sources = {name: _sha256(path) for name, path in sorted(paths.items())}
    index = out / INDEX_FILE
    if index.is_file() and json.loads(index.read_text()).get("extra", {}).get("demo_sources") == sources:
        return out
    config = ModelConfig.from_dir(model_dir)
    adapters = [load_peft_adapter(path, config, name=name) for name, path in sorted(paths.items())]
    cfg = ClusterConfig(jd=JDConfig(rank=DEMO_BANK_RANK), num_clusters=1)
    compressed = compress_adapter_set(adapters, cfg, progress=False)
    compressed.banks.extra["demo_sources"] = sources
    save_cluster_banks(compressed.banks, out, overwrite=True)
    log.info("demo cluster %s: compressed bank of %s written to %s (%.1fs)", cluster, sorted(paths), out,
             compressed.seconds)
    return out


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
        adapter_sha256=_sha256(path), extra=extra,
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
        bank_uri = old_cluster.bank_uri if old_cluster else ""
        fmt = old_cluster.format if old_cluster else "peft"
        if wanted == set(members):  # only demo members: the bootstrap decides how they are served
            fmt = boot.adapter_format
            if fmt == "jd_bank":
                paths = {name: demo_adapter_dir(name, adapters_dir) for name in members}
                bank_uri = str(ensure_demo_bank(cluster, paths, boot.model_dir, boot.banks_dir))
        if old_cluster is None or set(old_cluster.members) != wanted or \
                (old_cluster.format, old_cluster.bank_uri) != (fmt, bank_uri):
            version = old_cluster.version + 1 if old_cluster else 1
            registry.upsert_cluster(ClusterRecord(cluster_id=cluster, version=version, members=tuple(wanted),
                                                  bank_uri=bank_uri, format=fmt))
    return sorted(n for members in live.values() for n in members)
