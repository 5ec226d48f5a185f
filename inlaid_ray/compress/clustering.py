"""Whole-adapter clustering for joint compression (Compress then Serve; docs/algorithms.md 9.8).

k-means-style alternation where the "centroid" of a cluster is its joint basis: seed K clusters
by k-means++ on a cheap subspace signature, then repeat {fit JD per cluster, warm-started;
reassign every adapter to the cluster whose bases give the lowest projection error averaged over
modules; re-seed empty clusters with the worst-fitted adapters} until the assignment is stable.
The unit is a whole adapter (all modules) because serving groups requests by cluster (11.15).
K is given, or "auto": the smallest K meeting an error budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor
from inlaid_ray.progress import Progress

from inlaid_ray.compress.jd import (
    AdapterFactors,
    JDConfig,
    JDModule,
    ModuleKey,
    StackedFactors,
    fit_stacked,
    project_stacked,
    psd_sqrt_factor as _psd_sqrt,
    stack_factors,
    validate_adapters,
    validate_factors,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Clustering knobs; the per-cluster compression is `jd`."""

    jd: JDConfig = field(default_factory=JDConfig)
    num_clusters: int | Literal["auto"] = "auto"  # K, or the smallest K meeting error_budget
    error_budget: float = 0.2  # on per-adapter error (mean over modules of 9.7's relative error)
    budget_stat: Literal["max", "mean"] = "max"  # statistic over adapters held to the budget
    max_clusters: int = 64  # upper end of the "auto" search
    max_rounds: int = 10  # alternation rounds (fit, reassign)
    round_iters: int = 5  # JD iterations per cluster per round (warm-started); final fit: jd.max_iters
    signature_modules: int = 2  # modules (spread over the list) used by the k-means++ seeding
    init_restarts: int = 4  # farthest-first seedings tried; the best-scoring one starts the alternation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clusters != "auto" and not (isinstance(self.num_clusters, int) and self.num_clusters >= 1):
            raise ValueError(f"num_clusters must be 'auto' or an int >= 1, got {self.num_clusters!r}")
        if self.budget_stat not in ("max", "mean") or not self.error_budget > 0:
            raise ValueError(
                f"need budget_stat 'max'|'mean' and error_budget > 0, got {self.budget_stat!r}, {self.error_budget}"
            )
        if min(self.max_clusters, self.max_rounds, self.round_iters, self.signature_modules, self.init_restarts) < 1:
            raise ValueError("max_clusters, max_rounds, round_iters, signature_modules and init_restarts must be >= 1")


@dataclass
class Cluster:
    """One cluster: its members (row order of the cores) and a fitted basis per module."""

    members: list[int]
    modules: dict[ModuleKey, JDModule]

    @property
    def errors(self) -> Tensor:
        """float64 [n_c]: each member's error, mean over modules."""
        return torch.stack([m.errors for m in self.modules.values()]).mean(dim=0)


@dataclass
class Clustering:
    """Result of cluster_adapters."""

    clusters: list[Cluster]
    labels: Tensor  # int64 [n]: cluster of each adapter
    errors: Tensor  # float64 [n]: error of each adapter in its cluster (mean over modules)
    module_keys: list[ModuleKey]
    config: ClusterConfig
    rounds: int = 0
    stable: bool = True
    budget_met: bool = True
    history: list[dict] = field(default_factory=list)  # per round: changed labels, mean cost
    search: list[dict] = field(default_factory=list)  # "auto": every K tried, its error statistics

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    def row_of(self, adapter: int) -> tuple[int, int]:
        """(cluster, row of its core in that cluster) of one adapter index."""
        c = int(self.labels[adapter])
        return c, self.clusters[c].members.index(adapter)


@dataclass
class Assignment:
    """Where a new adapter fits best (projection only, no refit) and whether to recompress."""

    cluster: int
    cores: dict[ModuleKey, Tensor]  # per module: [k, k] or [k], original scale
    error: float  # mean over modules of the relative squared error in that cluster
    errors_per_cluster: Tensor  # float64 [K]
    needs_recompress: bool  # the cluster's error statistic with this adapter exceeds the budget


def _budget_value(errors: Tensor, stat: str) -> float:
    return float(errors.max() if stat == "max" else errors.mean())


def _effective_rank(st: StackedFactors, jd: JDConfig) -> int:
    """k capped by the members' stacked rank: a cluster of few adapters is fitted exactly at lower k."""
    d_in, d_out = st.A.shape[2], st.Bt.shape[2]
    return min(jd.rank, st.stacked_rank, d_in, d_out)


def _fit_cluster(
    stacks: dict[ModuleKey, StackedFactors], members: list[int], jd: JDConfig, iters: int,
    warm: Cluster | None, progress: str | None = None,
) -> Cluster:
    cfg = JDConfig(jd.rank, jd.kind, jd.transform, iters, jd.tol, jd.seed)
    modules = {}
    for key, st in Progress(stacks.items(), desc=progress, disable=progress is None, leave=False, unit="module"):
        sub = st.select(members)
        if sub.stacked_rank == 0:  # no member adapts this module (rank-0 padding): exact zeros
            modules[key] = _zero_module(sub, jd.kind)
            continue
        c = JDConfig(_effective_rank(sub, jd), cfg.kind, cfg.transform, cfg.max_iters, cfg.tol, cfg.seed)
        init = (warm.modules[key].U, warm.modules[key].V) if warm is not None else None
        modules[key] = fit_stacked(sub, c, init)
    return Cluster(list(members), modules)


def _zero_module(st: StackedFactors, kind: str) -> JDModule:
    """A module none of the adapters adapts: rank-1 unit bases and zero cores (error 0)."""
    n, _, d_in = st.A.shape
    d_out = st.Bt.shape[2]
    U = torch.zeros(d_out, 1, dtype=st.A.dtype, device=st.A.device)
    V = torch.zeros(d_in, 1, dtype=st.A.dtype, device=st.A.device)
    U[0, 0] = V[0, 0] = 1.0
    sigma = torch.zeros((n, 1, 1) if kind == "full" else (n, 1), dtype=st.A.dtype, device=st.A.device)
    return JDModule(U, V, sigma, torch.zeros(n, dtype=torch.float64))


def _cost_matrix(stacks: dict[ModuleKey, StackedFactors], clusters: list[Cluster], kind: str) -> Tensor:
    """float64 [n, K]: mean over modules of each adapter's projection error onto each cluster."""
    n = next(iter(stacks.values())).n
    cost = torch.zeros(n, len(clusters), dtype=torch.float64)
    for c, cl in enumerate(clusters):
        for key, st in stacks.items():
            cost[:, c] += project_stacked(st, cl.modules[key].U, cl.modules[key].V, kind)[1]
    return cost / len(stacks)


def _subspace_blocks(stacks: dict[ModuleKey, StackedFactors], cfg: ClusterConfig) -> list[Tensor]:
    """Per signature module and side, W^T [n, r, d] with W_i W_i^T = C_i / ||C_i||_F, where
    C_i = (B_i A_i)(B_i A_i)^T (columns) or (B_i A_i)^T (B_i A_i) (rows).

    C_i ignores how an update splits between A and B and its scale; adapters sharing subspaces
    have overlapping C_i even when their cores differ, so <C_i, C_j> = ||W_i^T W_j||_F^2 measures
    how well they compress together.
    """
    keys = list(stacks)
    count = min(cfg.signature_modules, len(keys))
    pick = sorted({keys[round(j * (len(keys) - 1) / max(count - 1, 1))] for j in range(count)})
    blocks = []
    for key in pick:
        st = stacks[key]
        la = _psd_sqrt(torch.bmm(st.A, st.A.transpose(1, 2)))  # L L^T = A A^T  [n, r, r]
        lb = _psd_sqrt(torch.bmm(st.Bt, st.Bt.transpose(1, 2)))
        for W in (torch.bmm(st.Bt.transpose(1, 2), la), torch.bmm(st.A.transpose(1, 2), lb)):
            norm = torch.linalg.matrix_norm(torch.bmm(W.transpose(1, 2), W)).clamp_min(1e-30)
            blocks.append((W / norm.sqrt()[:, None, None]).transpose(1, 2).contiguous())
    return blocks


def _similarity(blocks: list[Tensor], j: int) -> Tensor:
    """float64 [n]: mean over blocks of the cosine <C_i, C_j> / (||C_i|| ||C_j||) in [0, 1]."""
    sim = torch.zeros(blocks[0].shape[0], dtype=torch.float64)
    for Wt in blocks:  # [n, r, d]: rows of W_i^T
        n, r, d = Wt.shape
        cross = Wt.reshape(n * r, d) @ Wt[j].T  # rows of W_i^T W_j, [n r, r]
        sim += (cross.double() ** 2).view(n, -1).sum(1).cpu()
    return sim / len(blocks)


def _seed_labels(blocks: list[Tensor], K: int, gen: torch.Generator, restarts: int) -> Tensor:
    """Farthest-first seeding (the adapter least similar to every seed so far becomes the next
    seed), then each adapter joins its most similar seed. Keeps the best of `restarts` random
    first seeds (largest total similarity to the chosen seeds).

    Chosen over k-means++ sampling: adapters of one cluster share only part of the cluster's
    subspace (similarity ~0.2-0.5, unrelated adapters ~0), so distance-squared sampling still
    often draws two seeds from the same cluster, which the alternation cannot undo.
    """
    n = blocks[0].shape[0]
    cache: dict[int, Tensor] = {}

    def sim(j: int) -> Tensor:
        if j not in cache:
            cache[j] = _similarity(blocks, j)
        return cache[j]

    best, best_score = torch.zeros(n, dtype=torch.long), -math.inf
    for _ in range(restarts):
        seeds = [int(torch.randint(n, (1,), generator=gen))]
        closest = sim(seeds[0]).clone()
        for _ in range(1, K):
            closest[seeds] = math.inf  # never re-pick a seed
            seeds.append(int(closest.argmin()))
            closest = torch.maximum(closest, sim(seeds[-1]))
        stacked = torch.stack([sim(j) for j in seeds], dim=1)  # [n, K]
        labels = stacked.argmax(1)
        labels[seeds] = torch.arange(K)  # a seed always starts its own cluster
        score = float(stacked.max(1).values.sum())
        if score > best_score:
            best, best_score = labels, score
    return best


def _reseed_empty(labels: Tensor, cost: Tensor, K: int) -> Tensor:
    """Give each empty cluster the worst-fitted adapter of a cluster that has more than one member."""
    labels = labels.clone()
    own = cost.gather(1, labels[:, None]).squeeze(1)
    for c in range(K):
        if (labels == c).any():
            continue
        counts = torch.bincount(labels, minlength=K)
        movable = counts[labels] > 1
        worst = int(torch.where(movable, own, torch.full_like(own, -1.0)).argmax())
        labels[worst] = c
        own[worst] = -1.0
    return labels


def _cluster_fixed(
    stacks: dict[ModuleKey, StackedFactors], K: int, cfg: ClusterConfig, progress: bool
) -> Clustering:
    n = next(iter(stacks.values())).n
    gen = torch.Generator().manual_seed(cfg.seed)
    if K > 1:
        labels = _seed_labels(_subspace_blocks(stacks, cfg), K, gen, cfg.init_restarts)
    else:
        labels = torch.zeros(n, dtype=torch.long)
    labels = _reseed_empty(labels, torch.zeros(n, K, dtype=torch.float64), K)
    clusters: list[Cluster] = []
    history, stable, rounds = [], K == 1, 0  # one cluster: nothing to alternate
    bar = Progress(total=cfg.max_rounds, desc=f"cluster K={K}", disable=not progress or stable, leave=False)
    while not stable and rounds < cfg.max_rounds:
        rounds += 1
        clusters = [
            _fit_cluster(stacks, (labels == c).nonzero().flatten().tolist(), cfg.jd, cfg.round_iters,
                         clusters[c] if clusters else None)
            for c in range(K)
        ]
        cost = _cost_matrix(stacks, clusters, cfg.jd.kind)
        new = _reseed_empty(cost.argmin(1), cost, K)
        changed = int((new != labels).sum())
        history.append({"round": rounds, "changed": changed, "mean_cost": float(cost.min(1).values.mean())})
        bar.update(1)
        bar.set_postfix(changed=changed, err=f"{history[-1]['mean_cost']:.4f}")
        labels, stable = new, changed == 0
    bar.close()
    # Final fit at full iterations, warm-started from the last round's bases where members agree.
    final = []
    for c in range(K):
        members = (labels == c).nonzero().flatten().tolist()
        warm = clusters[c] if c < len(clusters) and clusters[c].members == members else None
        final.append(_fit_cluster(stacks, members, cfg.jd, cfg.jd.max_iters, warm,
                                  f"fit cluster {c + 1}/{K}" if progress else None))
    errors = torch.zeros(n, dtype=torch.float64)
    for cl in final:
        errors[cl.members] = cl.errors
    budget_met = _budget_value(errors, cfg.budget_stat) <= cfg.error_budget
    return Clustering(final, labels, errors, list(stacks), cfg, rounds, stable, budget_met, history)


def _stacks(
    adapters: Sequence[AdapterFactors], jd: JDConfig, device: torch.device | str, dtype: torch.dtype
) -> dict[ModuleKey, StackedFactors]:
    keys = validate_adapters(adapters)
    stacks = {}
    for key in keys:
        factors = [ad[key] for ad in adapters]
        try:
            d_out, d_in = validate_factors(factors)
        except ValueError as exc:
            raise ValueError(f"module {key}: {exc}") from exc
        if jd.rank > min(d_out, d_in):
            raise ValueError(f"rank {jd.rank} exceeds min(d_in, d_out) = min({d_in}, {d_out}) of module {key}")
        stacks[key] = stack_factors(factors, jd.transform == "normalize", device, dtype)
    return stacks


def cluster_adapters(
    adapters: Sequence[AdapterFactors],
    config: ClusterConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Clustering:
    """Cluster whole adapters and compress each cluster jointly (docs/algorithms.md 9.8).

    With num_clusters="auto", K doubles from 1 until the budget holds, then bisects down to the
    smallest passing K (assumes error falls with K, which holds up to k-means local optima);
    if max_clusters does not meet it, the largest K is returned with budget_met False.
    """
    stacks = _stacks(adapters, config.jd, device, dtype)
    n = len(adapters)
    if config.num_clusters != "auto":
        if config.num_clusters > n:
            raise ValueError(f"num_clusters {config.num_clusters} exceeds the number of adapters {n}")
        return _cluster_fixed(stacks, config.num_clusters, config, progress)
    top = min(config.max_clusters, n)
    tried: dict[int, Clustering] = {}
    bar = Progress(desc="auto K", disable=not progress)

    def attempt(K: int) -> bool:
        tried[K] = _cluster_fixed(stacks, K, config, progress)
        bar.update(1)
        bar.set_postfix(K=K, err=f"{_budget_value(tried[K].errors, config.budget_stat):.4f}")
        return tried[K].budget_met

    K, low = 1, 0  # low: largest K known to fail
    while not attempt(K):
        low = K
        if K == top:
            bar.close()
            log.warning("no K <= %d meets error budget %g", top, config.error_budget)
            return _with_search(tried[K], tried)
        K = min(2 * K, top)
    high = K
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid):
            high = mid
        else:
            low = mid
    bar.close()
    return _with_search(tried[high], tried)


def _with_search(result: Clustering, tried: dict[int, Clustering]) -> Clustering:
    result.search = [
        {"num_clusters": K, "mean_error": float(r.errors.mean()), "max_error": float(r.errors.max()),
         "budget_met": r.budget_met}
        for K, r in sorted(tried.items())
    ]
    return result


def assign_new_adapter(
    clustering: Clustering, adapter: AdapterFactors, error_budget: float | None = None
) -> Assignment:
    """Project a new adapter onto every cluster's bases (9.6) and pick the lowest mean error.

    needs_recompress is set when the chosen cluster's error statistic (config.budget_stat over its
    members plus this adapter) exceeds error_budget (default: the clustering's budget).
    """
    keys = validate_adapters([adapter])
    if keys != clustering.module_keys:
        missing = sorted(set(clustering.module_keys) - set(keys))[:4]
        extra = sorted(set(keys) - set(clustering.module_keys))[:4]
        raise ValueError(f"adapter modules differ from the clustering's: missing {missing}, extra {extra}")
    cfg = clustering.config
    budget = cfg.error_budget if error_budget is None else error_budget
    per_cluster = torch.zeros(clustering.num_clusters, dtype=torch.float64)
    cores_by_cluster = []
    for c, cl in enumerate(clustering.clusters):
        cores = {}
        for key in keys:
            mod = cl.modules[key]
            validate_factors([adapter[key]])
            st = stack_factors([adapter[key]], False, mod.U.device, mod.U.dtype)
            sig, rel = project_stacked(st, mod.U, mod.V, mod.kind)
            cores[key] = sig[0]
            per_cluster[c] += float(rel[0]) / len(keys)
        cores_by_cluster.append(cores)
    best = int(per_cluster.argmin())
    err = float(per_cluster[best])
    stat = _budget_value(torch.cat([clustering.clusters[best].errors, torch.tensor([err])]), cfg.budget_stat)
    return Assignment(best, cores_by_cluster[best], err, per_cluster, stat > budget)


def adjusted_rand_index(labels_a: Tensor | Sequence[int], labels_b: Tensor | Sequence[int]) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions, ~0 = chance)."""
    a = torch.as_tensor(labels_a, dtype=torch.long)
    b = torch.as_tensor(labels_b, dtype=torch.long)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"labelings must be 1-D and equally long, got {tuple(a.shape)} and {tuple(b.shape)}")
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones_like(a, dtype=torch.float64), accumulate=True)

    def pairs(x: Tensor) -> Tensor:
        return (x * (x - 1) / 2).sum()

    n_pairs = a.numel() * (a.numel() - 1) / 2
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / n_pairs if n_pairs > 0 else torch.tensor(0.0)
    max_index = (rows + cols) / 2
    if float(max_index - expected) == 0:
        return 1.0  # both partitions trivial (all singletons or one block) and equal in that sense
    return float((index - expected) / (max_index - expected))
