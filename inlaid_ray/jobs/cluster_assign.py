"""Step 4 of onboarding: join the new adapter to a registry cluster, or create one, as a row of
that cluster's jointly compressed bank (Compress then Serve; docs/algorithms.md 9.6, 9.8-9.9).

Candidates are the registry clusters with live members whose adapters adapt exactly the same
(layer, module) set as the new one (a joint basis is per module). For each: project the new
adapter onto the cluster's stored bank (`bank_uri`), or, for a cluster that has none yet (raw
PEFT members, e.g. the demo clusters), onto the joint compression of its members computed here.
The lowest mean relative error wins; within `error_budget` the adapter joins as a new row (the
bases stay, only its core is added, 9.6); above it, the winner is re-compressed with the new
member and kept if its members' errors stay within budget; otherwise the adapter starts a new
cluster of its own (compressed exactly: k = its rank). The result is a complete one-cluster bank
for the chosen cluster, written as the cluster's next version; the registry's `bank_uri` points
at it. Replicas serve raw adapters until compressed banks are served (`ClusterSpec.format`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inlaid_ray.lora import LoRAAdapter
from inlaid_ray.compress.adapter_set import banks_from_clustering
from inlaid_ray.lora.cluster_bank import ClusterBanks, add_adapter, load_cluster_banks
from inlaid_ray.compress.clustering import ClusterConfig, cluster_adapters
from inlaid_ray.compress.jd import JDConfig, ModuleKey, project_stacked, stack_factors
from inlaid_ray.model import ModelConfig
from inlaid_ray.registry import ClusterRecord, TaskRecord

log = logging.getLogger(__name__)

Factors = dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]
# (task record) -> its adapter, read from its adapter_uri
MemberLoader = Callable[[TaskRecord], LoRAAdapter]


@dataclass(frozen=True)
class ClusterSettings:
    """Joint compression of a cluster (docs/algorithms.md 9.4-9.5) and the join rule."""

    rank: int = 32  # shared rank k per module (capped by the members' stacked rank)
    kind: str = "full"  # "full" k x k cores or "diag"
    error_budget: float = 0.2  # max relative squared error of any member (9.7)
    new_cluster_prefix: str = "c-"  # a created cluster is named <prefix><task>


@dataclass
class ClusterChoice:
    """Where the adapter goes and the bank to write as that cluster's next version."""

    cluster_id: str
    created: bool
    previous: ClusterRecord | None  # the registry record before (None when created)
    bank: ClusterBanks  # one cluster (id 0) holding every member and the new adapter
    error: float  # the new adapter's mean relative error in `bank`
    how: str  # "projected" | "recompressed" | "new"
    candidates: dict[str, str] = field(default_factory=dict)  # cluster -> error or why it was skipped


def _factors(adapter: LoRAAdapter) -> Factors:
    return {k: (a, b) for k, (a, b) in adapter.folded_factors().items()}


def _raw_params(f: Factors) -> int:
    return sum(a.numel() + b.numel() for a, b in f.values())


def compress(names: list[str], factors: list[Factors], settings: ClusterSettings) -> ClusterBanks:
    """One jointly compressed cluster of `names` (JD at k = min(rank, stacked rank), 9.8)."""
    cfg = ClusterConfig(jd=JDConfig(rank=settings.rank, kind=settings.kind), num_clusters=1,
                        error_budget=settings.error_budget)  # type: ignore[arg-type]
    clustering = cluster_adapters(factors, cfg, progress=False)
    return banks_from_clustering(clustering, names, [_raw_params(f) for f in factors], dtype=torch.float32)


def project(banks: ClusterBanks, f: Factors) -> tuple[dict[ModuleKey, torch.Tensor], dict[ModuleKey, float]]:
    """Cores and relative errors of `f` on the bases of the bank's cluster 0 (no refit, 9.6)."""
    cl = banks.clusters[0]
    cores, errors = {}, {}
    for key, (a, b) in f.items():
        U, V = cl.U[key], cl.V[key]
        st = stack_factors([(a, b)], False, U.device, U.dtype)
        sig, rel = project_stacked(st, U, V, banks.kind)
        cores[key], errors[key] = sig[0], float(rel[0])
    return cores, errors


def _mean(errors: Mapping[ModuleKey, float]) -> float:
    return sum(errors.values()) / len(errors)


def _member_factors(live: list[TaskRecord], load: MemberLoader) -> list[Factors]:
    return [_factors(load(t)) for t in live]


def choose_cluster(task: str, adapter: LoRAAdapter, clusters: Mapping[str, ClusterRecord],
                   tasks: Mapping[str, TaskRecord], load_member: MemberLoader, model_config: ModelConfig,
                   settings: ClusterSettings = ClusterSettings(), artifact_root: Path | None = None) -> ClusterChoice:
    """Pick (or create) the cluster of `task` and build its next bank (see module docstring)."""
    f_new = _factors(adapter)
    keys = set(f_new)
    why: dict[str, str] = {}
    scored: list[tuple[float, str, ClusterBanks, list[TaskRecord], dict, dict]] = []
    for cid, record in sorted(clusters.items()):
        live = [tasks[m] for m in record.members if m != task and m in tasks and tasks[m].status == "live"]
        if not live:
            why[cid] = "skipped: no live members"
            continue
        banks = _stored_bank(record, model_config, artifact_root, {t.name for t in live}, keys)
        if banks is None:
            members = _member_factors(live, load_member)
            odd = [t.name for t, f in zip(live, members) if set(f) != keys]
            if odd:
                why[cid] = f"skipped: members {odd} adapt other (layer, module) sets"
                continue
            banks = compress([t.name for t in live], members, settings)
        cores, errors = project(banks, f_new)
        why[cid] = f"{_mean(errors):.4f}"
        scored.append((_mean(errors), cid, banks, live, cores, errors))
    if scored:
        err, cid, banks, live, cores, errors = min(scored, key=lambda s: (s[0], s[1]))
        if err <= settings.error_budget:
            add_adapter(banks, task, 0, cores, errors, _raw_params(f_new))
            return ClusterChoice(cid, False, clusters[cid], banks, err, "projected", why)
        refit = compress([t.name for t in live] + [task], _member_factors(live, load_member) + [f_new], settings)
        worst = max(e.error for e in refit.adapters.values())
        if worst <= settings.error_budget:
            return ClusterChoice(cid, False, clusters[cid], refit, refit.adapters[task].error, "recompressed", why)
        why[cid] += f" (re-compressed with {task!r}: worst member error {worst:.4f} > {settings.error_budget})"
    new_id = f"{settings.new_cluster_prefix}{task}"
    if new_id in clusters:  # a leftover cluster of the same name: take the next free suffix
        new_id = next(f"{new_id}-{i}" for i in range(2, 10_000) if f"{new_id}-{i}" not in clusters)
    banks = compress([task], [f_new], settings)
    return ClusterChoice(new_id, True, None, banks, banks.adapters[task].error, "new", why)


def _stored_bank(record: ClusterRecord, model_config: ModelConfig, root: Path | None, live: set[str],
                 keys: set[ModuleKey]) -> ClusterBanks | None:
    """The cluster's stored bank if it is usable for this join (holds every live member, same modules)."""
    if not record.bank_uri:
        return None
    path = Path(record.bank_uri)
    path = path if path.is_absolute() or root is None else root / path
    try:
        banks = load_cluster_banks(path, model_config=model_config)
    except Exception as exc:  # noqa: BLE001 - a missing/corrupt bank is rebuilt from the raw members
        log.warning("cluster %s: bank %s unusable (%s); compressing its members again", record.cluster_id, path, exc)
        return None
    if len(banks.clusters) != 1 or not live <= set(banks.adapters) or set(banks.module_keys) != keys:
        return None
    if set(banks.adapters) != live:  # rows of members that left: rebuild from the live members
        return None
    return banks
