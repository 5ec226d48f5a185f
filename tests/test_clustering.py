"""Whole-adapter clustering on planted structures (tiny shapes), ARI, and onboarding by projection."""

from __future__ import annotations

import itertools

import pytest
import torch

from inlaid_ray.compress.clustering import (
    ClusterConfig,
    adjusted_rand_index,
    assign_new_adapter,
    cluster_adapters,
)
from inlaid_ray.compress.jd import JDConfig, reconstruction_errors
from inlaid_ray.lora.synthetic import SyntheticSpec, make_synthetic_adapters
from inlaid_ray.model.config import ModelConfig

TINY = ModelConfig(hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12)
F64 = torch.float64


def _planted(n=24, C=3, noise=0.05, seed=0, **kw):
    spec = SyntheticSpec(num_adapters=n, num_clusters=C, lora_rank=2, cluster_rank=4, noise=noise,
                         layers=(0, 2), modules=("q_proj", "v_proj"), seed=seed, **kw)
    return make_synthetic_adapters(spec, TINY, dtype=F64)


def _ari_reference(a, b):
    """Adjusted Rand index by brute-force pair counting (Hubert and Arabie)."""
    n = len(a)
    pairs = list(itertools.combinations(range(n), 2))
    same_a = [a[i] == a[j] for i, j in pairs]
    same_b = [b[i] == b[j] for i, j in pairs]
    both = sum(x and y for x, y in zip(same_a, same_b))
    sa, sb, total = sum(same_a), sum(same_b), len(pairs)
    expected = sa * sb / total
    return (both - expected) / ((sa + sb) / 2 - expected)


def test_ari_matches_pair_counting_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 4, (30,), generator=gen).tolist()
        b = torch.randint(0, 3, (30,), generator=gen).tolist()
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_reference(a, b), abs=1e-12)
    a = [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(a, [5, 5, 3, 3, 9, 9]) == 1.0  # label names do not matter
    with pytest.raises(ValueError, match="equally long"):
        adjusted_rand_index([0, 1], [0, 1, 2])


@pytest.mark.parametrize("kind,rank", [("full", 4), ("diag", 12)])
def test_recovers_planted_clusters(kind, rank):
    syn = _planted()
    jd = JDConfig(rank=rank, kind=kind, max_iters=30)
    res = cluster_adapters(syn.adapters, ClusterConfig(jd=jd, num_clusters=3),
                           dtype=F64, progress=False)
    assert adjusted_rand_index(res.labels, syn.labels) == 1.0
    assert res.stable and sorted(len(c.members) for c in res.clusters) == [8, 8, 8]
    # Reported errors are the real reconstruction errors of each member, module by module.
    for cl in res.clusters:
        for key, mod in cl.modules.items():
            want = reconstruction_errors([syn.adapters[i][key] for i in cl.members], mod.U, mod.V, mod.sigma)
            torch.testing.assert_close(mod.errors, want, rtol=1e-6, atol=1e-12)
        for row, i in enumerate(cl.members):
            assert res.row_of(i) == (res.clusters.index(cl), row)


def test_error_weakly_decreases_with_more_clusters():
    syn = _planted(noise=0.1)
    means = []
    for K in (1, 2, 3):
        res = cluster_adapters(syn.adapters, ClusterConfig(jd=JDConfig(rank=4), num_clusters=K),
                               dtype=F64, progress=False)
        means.append(float(res.errors.mean()))
    assert means[0] >= means[1] >= means[2], means
    assert means[2] < 0.5 * means[0]


def test_auto_k_finds_smallest_k_under_budget():
    syn = _planted(n=30, C=3, noise=0.05)
    cfg = ClusterConfig(jd=JDConfig(rank=4), num_clusters="auto", error_budget=0.05, max_clusters=8)
    res = cluster_adapters(syn.adapters, cfg, dtype=F64, progress=False)
    assert res.num_clusters == 3 and res.budget_met
    assert float(res.errors.max()) <= 0.05
    tried = {t["num_clusters"]: t for t in res.search}
    assert sorted(tried) == [1, 2, 3, 4]  # doubling 1, 2, 4, then bisection down to 3
    assert all(tried[K]["max_error"] > 0.05 and not tried[K]["budget_met"] for K in (1, 2))
    assert tried[3]["max_error"] == pytest.approx(float(res.errors.max()))


def test_auto_k_reports_unmet_budget():
    syn = _planted(n=12, C=3, noise=0.5)
    cfg = ClusterConfig(jd=JDConfig(rank=2), num_clusters="auto", error_budget=1e-6, max_clusters=2)
    res = cluster_adapters(syn.adapters, cfg, dtype=F64, progress=False)
    assert res.num_clusters == 2 and not res.budget_met


def test_no_cluster_is_left_empty():
    syn = _planted(n=12, C=2)
    dup = [syn.adapters[0]] * 6 + syn.adapters[6:]  # six identical adapters
    res = cluster_adapters(dup, ClusterConfig(jd=JDConfig(rank=2), num_clusters=5), dtype=F64, progress=False)
    assert all(len(c.members) >= 1 for c in res.clusters)
    assert sorted(i for c in res.clusters for i in c.members) == list(range(12))


def test_small_cluster_gets_exact_lower_rank():
    syn = _planted(n=6, C=2, noise=0.3)
    res = cluster_adapters(syn.adapters, ClusterConfig(jd=JDConfig(rank=12), num_clusters=2),
                           dtype=F64, progress=False)
    for cl in res.clusters:  # 3 adapters of rank 2 each: stacked rank 6 < 12
        for mod in cl.modules.values():
            assert mod.rank == min(12, 2 * len(cl.members))
            assert float(mod.errors.max()) < 1e-10


def test_assign_new_adapter_picks_its_cluster_and_flags_outsiders():
    syn = _planted(n=25, C=3, noise=0.02)
    held = syn.adapters[-1]
    res = cluster_adapters(syn.adapters[:-1], ClusterConfig(jd=JDConfig(rank=4), num_clusters=3, error_budget=0.05),
                           dtype=F64, progress=False)
    got = assign_new_adapter(res, held)
    mates = (syn.labels[:-1] == syn.labels[-1]).nonzero().flatten().tolist()
    assert set(res.clusters[got.cluster].members) == set(mates)
    assert got.error == pytest.approx(float(got.errors_per_cluster.min()))
    assert got.error < 0.05 and not got.needs_recompress
    # Its cores are the projection onto that cluster's bases.
    for key, core in got.cores.items():
        mod = res.clusters[got.cluster].modules[key]
        err = reconstruction_errors([held[key]], mod.U, mod.V, core[None])
        assert float(err[0]) < 0.05
    # An adapter from an unrelated subspace does not fit anywhere: recompress.
    other = make_synthetic_adapters(SyntheticSpec(num_adapters=1, num_clusters=1, lora_rank=2, cluster_rank=4,
                                                  layers=(0, 2), seed=99), TINY, dtype=F64)
    assert assign_new_adapter(res, other.adapters[0]).needs_recompress
    with pytest.raises(ValueError, match="modules differ"):
        assign_new_adapter(res, {(0, "q_proj"): held[(0, "q_proj")]})


def test_bad_inputs():
    syn = _planted(n=6, C=2)
    with pytest.raises(ValueError, match="exceeds the number of adapters 6"):
        cluster_adapters(syn.adapters, ClusterConfig(jd=JDConfig(rank=2), num_clusters=7), progress=False)
    with pytest.raises(ValueError, match=r"rank 30 exceeds min\(d_in, d_out\) = min\(48, 24\)"):
        cluster_adapters(syn.adapters, ClusterConfig(jd=JDConfig(rank=30), num_clusters=2), progress=False)
    with pytest.raises(ValueError, match="num_clusters"):
        ClusterConfig(num_clusters=0)
    with pytest.raises(ValueError, match="empty"):
        cluster_adapters([], ClusterConfig(num_clusters=1), progress=False)
