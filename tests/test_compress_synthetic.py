"""Synthetic adapters with a planted cluster structure: shapes, determinism, and the planted
subspaces really hold every member (compression on them is exact without noise)."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.compress.jd import JDConfig, compress_module, project_factors
from inlaid_ray.lora.synthetic import SMOLLM2_135M, SyntheticSpec, make_synthetic_adapters, raw_lora_params
from inlaid_ray.model.config import ModelConfig

TINY = ModelConfig(hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12)
F64 = torch.float64


@pytest.mark.slow
def test_builtin_smollm2_shape_matches_real_config(smollm2_dir):
    real = ModelConfig.from_dir(smollm2_dir)
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size"):
        assert getattr(SMOLLM2_135M, field) == getattr(real, field), field


def test_shapes_labels_and_determinism():
    spec = SyntheticSpec(num_adapters=10, num_clusters=3, lora_rank=2, cluster_rank=4, layers=(0, 2),
                         modules=("q_proj", "k_proj", "down_proj"))
    a = make_synthetic_adapters(spec, TINY, dtype=F64)
    b = make_synthetic_adapters(spec, TINY, dtype=F64)
    assert sorted(torch.bincount(a.labels).tolist()) == [3, 3, 4]
    for ad in a.adapters:
        assert sorted(ad) == [(l, m) for l in (0, 2) for m in ("down_proj", "k_proj", "q_proj")]
        for (layer, module), (A, B) in ad.items():
            d_out, d_in = TINY.module_shape(module)
            assert A.shape == (2, d_in) and B.shape == (d_out, 2) and A.dtype == F64
    assert raw_lora_params(a.adapters[0]) == sum(2 * sum(TINY.module_shape(m)) for m in ("q_proj", "k_proj", "down_proj")) * 2
    for x, y in zip(a.adapters, b.adapters):
        assert all(torch.equal(x[k][0], y[k][0]) and torch.equal(x[k][1], y[k][1]) for k in x)
    assert torch.equal(a.labels, b.labels)


def test_noise_free_members_lie_in_planted_subspaces():
    spec = SyntheticSpec(num_adapters=12, num_clusters=2, lora_rank=2, cluster_rank=5, noise=0.0, layers=(1,))
    syn = make_synthetic_adapters(spec, TINY, dtype=F64)
    for key, pairs in syn.bases.items():
        for c, (U, V) in enumerate(pairs):
            members = (syn.labels == c).nonzero().flatten().tolist()
            factors = [syn.adapters[i][key] for i in members]
            _, err = project_factors(factors, U, V, "full")
            assert float(err.max()) < 1e-12  # the planted basis is exact
            mod = compress_module(factors, JDConfig(rank=5), dtype=F64)
            assert float(mod.errors.max()) < 1e-10  # and JD finds an equally good one
            other = [syn.adapters[i][key] for i in (syn.labels != c).nonzero().flatten().tolist()]
            assert float(project_factors(other, U, V, "full")[1].min()) > 0.5  # clusters are distinct


def test_noise_sets_the_error_floor():
    base = dict(num_adapters=12, num_clusters=2, lora_rank=2, cluster_rank=5, layers=(1,), modules=("q_proj",))
    floors = []
    for noise in (0.05, 0.2):
        syn = make_synthetic_adapters(SyntheticSpec(noise=noise, **base), TINY, dtype=F64)
        (key,) = syn.bases
        U, V = syn.bases[key][0]
        members = (syn.labels == 0).nonzero().flatten().tolist()
        floors.append(float(project_factors([syn.adapters[i][key] for i in members], U, V, "full")[1].mean()))
    assert 0 < floors[0] < floors[1] < 0.2


def test_bad_specs():
    with pytest.raises(ValueError, match="num_clusters"):
        SyntheticSpec(num_adapters=2, num_clusters=3)
    with pytest.raises(ValueError, match="modules"):
        SyntheticSpec(modules=("qkv_proj",))
    with pytest.raises(ValueError, match=r"layers \[5\] outside 0..2"):
        make_synthetic_adapters(SyntheticSpec(layers=(5,)), TINY)
    with pytest.raises(ValueError, match="cluster_rank 30 exceeds"):
        make_synthetic_adapters(SyntheticSpec(cluster_rank=30, modules=("k_proj",)), TINY)
