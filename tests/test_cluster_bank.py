"""Cluster bank format: bit-exact round trip, reconstruction, PEFT interop, validation, size report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inlaid_ray.errors import AdapterError
from inlaid_ray.lora.cluster_bank import (
    FORMAT_VERSION,
    INDEX_FILE,
    add_adapter,
    bank_size_report,
    load_cluster_banks,
    module_key_name,
    parse_module_key,
    save_cluster_banks,
    stack_for_serving,
    to_peft_factors,
)
from inlaid_ray.compress.adapter_set import banks_from_clustering
from inlaid_ray.compress.clustering import ClusterConfig, assign_new_adapter, cluster_adapters
from inlaid_ray.compress.jd import JDConfig
from inlaid_ray.lora.synthetic import SyntheticSpec, make_synthetic_adapters, raw_lora_params
from inlaid_ray.model.config import ModelConfig

TINY = ModelConfig(hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12)
F64 = torch.float64


def _build(kind="full", n=13, dtype=torch.float32):
    spec = SyntheticSpec(num_adapters=n, num_clusters=2, lora_rank=2, cluster_rank=4, noise=0.05,
                         layers=(0, 2), modules=("q_proj", "v_proj"), seed=3)
    syn = make_synthetic_adapters(spec, TINY, dtype=dtype)
    rank = 4 if kind == "full" else 8
    cfg = ClusterConfig(jd=JDConfig(rank=rank, kind=kind, max_iters=20), num_clusters=2)
    res = cluster_adapters(syn.adapters[:-1], cfg, dtype=dtype, progress=False)
    banks = banks_from_clustering(res, syn.names[:-1], [raw_lora_params(a) for a in syn.adapters[:-1]])
    return syn, res, banks


@pytest.fixture(scope="module", params=["full", "diag"])
def built(request):
    return _build(request.param)


def _all_tensors(banks):
    for cl in banks.clusters:
        for part in ("U", "V", "sigma", "errors"):
            for key, t in getattr(cl, part).items():
                yield (cl.cluster_id, part, key), t


def test_round_trip_is_bit_exact(built, tmp_path):
    _, _, banks = built
    path = save_cluster_banks(banks, tmp_path / "bank")
    loaded = load_cluster_banks(path, model_config=TINY)
    a, b = dict(_all_tensors(banks)), dict(_all_tensors(loaded))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.adapters == banks.adapters
    assert [c.members for c in loaded.clusters] == [c.members for c in banks.clusters]
    assert (loaded.kind, loaded.rank, loaded.transform) == (banks.kind, banks.rank, banks.transform)
    assert loaded.module_shapes == banks.module_shapes
    index = json.loads((path / INDEX_FILE).read_text())
    assert index["format_version"] == FORMAT_VERSION and index["scaling_folded"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_layout_is_serving_shaped(built):
    _, res, banks = built
    for cl in banks.clusters:
        n_c = len(cl.members)
        for key in banks.module_keys:
            d_out, d_in = banks.module_shapes[key]
            k = cl.ranks[key]
            assert cl.U[key].shape == (d_out, k) and cl.V[key].shape == (d_in, k)
            assert cl.sigma[key].shape == ((n_c, k, k) if banks.kind == "full" else (n_c, k))


def test_bank_delta_equals_fitted_reconstruction_and_peft_factors(built):
    syn, res, banks = built
    for name, entry in banks.adapters.items():
        i = syn.names.index(name)
        mods = res.clusters[entry.cluster].modules
        peft = to_peft_factors(banks.clusters[entry.cluster], entry.row)
        errs = []
        for key in banks.module_keys:
            mod = mods[key]
            want = mod.U @ (mod.sigma[entry.row] if mod.sigma.dim() == 3 else torch.diag(mod.sigma[entry.row])) @ mod.V.T
            torch.testing.assert_close(banks.delta(name, key), want)
            A, B = peft[key]
            assert A.shape == (mod.rank, mod.V.shape[0]) and B.shape == (mod.U.shape[0], mod.rank)
            torch.testing.assert_close(B @ A, want, rtol=1e-5, atol=1e-6)
            A0, B0 = syn.adapters[i][key]
            orig = (B0 @ A0).double()
            errs.append(float(((orig - want.double()) ** 2).sum() / (orig**2).sum()))
        # The stored per-adapter error is the mean over modules of the true dense error.
        assert entry.error == pytest.approx(sum(errs) / len(errs), rel=1e-3, abs=1e-6)
        assert entry.max_module_error == pytest.approx(max(errs), rel=1e-3, abs=1e-6)


def test_serving_stacks_reproduce_every_delta():
    # Clusters of 3 and 4 adapters of rank 2 at k = 8: the small one has k_c = 6, so padding is exercised.
    spec = SyntheticSpec(num_adapters=7, num_clusters=2, lora_rank=2, cluster_rank=4, noise=0.3, layers=(1,), seed=5)
    syn = make_synthetic_adapters(spec, TINY, dtype=F64)
    for kind in ("full", "diag"):
        res = cluster_adapters(syn.adapters, ClusterConfig(jd=JDConfig(rank=8, kind=kind, max_iters=20), num_clusters=2),
                               dtype=F64, progress=False)
        banks = banks_from_clustering(res, syn.names)
        for key in banks.module_keys:
            V, U, sig = stack_for_serving(banks, key)
            assert V.shape[0] == U.shape[0] == sig.shape[0] == 2 and V.shape[2] == 8 and sig.shape[1] == 4
            for name, e in banks.adapters.items():
                core = sig[e.cluster, e.row] if kind == "full" else torch.diag(sig[e.cluster, e.row])
                # The kernel's semantics: y += U_c (Sigma (V_c^T x)) for every x, i.e. delta = U Sigma V^T.
                torch.testing.assert_close(U[e.cluster] @ core @ V[e.cluster].T, banks.delta(name, key))
        assert sorted({r for cl in banks.clusters for r in cl.ranks.values()}) == [6, 8]


def test_size_report_counts_tensors(built):
    syn, _, banks = built
    rep = bank_size_report(banks)
    core = sum(t.nbytes for (c, part, k), t in _all_tensors(banks) if part == "sigma")
    shared = sum(t.nbytes for (c, part, k), t in _all_tensors(banks) if part in ("U", "V"))
    raw = sum(raw_lora_params(a) for a in syn.adapters[:-1]) * 4
    assert rep["core_bytes"] == core and rep["shared_basis_bytes"] == shared
    assert rep["compressed_bytes"] == core + shared and rep["raw_bytes"] == raw
    assert rep["compression_ratio"] == pytest.approx(raw / (core + shared))
    assert rep["num_adapters"] == 12


def test_add_adapter_appends_row_and_round_trips(tmp_path):
    syn, res, banks = _build("full")
    got = assign_new_adapter(res, syn.adapters[-1])
    errors = {}
    for key, core in got.cores.items():
        mod = res.clusters[got.cluster].modules[key]
        A, B = syn.adapters[-1][key]
        d = (B @ A).double()
        errors[key] = float(((d - (mod.U @ core @ mod.V.T).double()) ** 2).sum() / (d**2).sum())
    entry = add_adapter(banks, syn.names[-1], got.cluster, got.cores, errors, raw_lora_params(syn.adapters[-1]))
    assert entry.error == pytest.approx(got.error, rel=1e-4)
    loaded = load_cluster_banks(save_cluster_banks(banks, tmp_path / "b"))
    key = banks.module_keys[0]
    mod = res.clusters[got.cluster].modules[key]
    torch.testing.assert_close(loaded.delta(syn.names[-1], key), mod.U @ got.cores[key] @ mod.V.T)
    with pytest.raises(AdapterError, match="already in the bank"):
        add_adapter(banks, syn.names[-1], got.cluster, got.cores, errors)


def test_overwrite_is_explicit_and_atomic(built, tmp_path):
    _, _, banks = built
    path = save_cluster_banks(banks, tmp_path / "bank")
    with pytest.raises(FileExistsError):
        save_cluster_banks(banks, path)
    save_cluster_banks(banks, path, overwrite=True)
    load_cluster_banks(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def _saved(tmp_path: Path):
    _, _, banks = _build("full", n=9)
    return save_cluster_banks(banks, tmp_path / "bank")


def _edit_index(path: Path, fn):
    index = json.loads((path / INDEX_FILE).read_text())
    fn(index)
    (path / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda ix: ix.update(format_version=FORMAT_VERSION + 1), "format_version"),
        (lambda ix: ix.update(format="something-else"), "format is 'something-else'"),
        (lambda ix: ix.update(kind="dense"), "kind 'dense'"),
        (lambda ix: ix.update(scaling_folded=False), "scaling_folded"),
        (lambda ix: ix.pop("adapters"), r"missing keys \['adapters'\]"),
        (lambda ix: ix["clusters"][0].update(file="nope.safetensors"), "'nope.safetensors' is missing"),
        (lambda ix: ix["clusters"][0].update(members=ix["clusters"][0]["members"][:-1]), "expected U"),
        (lambda ix: ix["modules"].update({"layers.0.q_proj": [48, 47]}), r"layers.0.q_proj .*expected U \(48"),
        (lambda ix: next(iter(ix["adapters"].values())).update(row=99), "row 99"),
        (lambda ix: ix["modules"].update({"layers.0.qq_proj": [1, 1]}), "bad module name"),
    ],
)
def test_refuses_mismatched_index(tmp_path, edit, match):
    path = _saved(tmp_path)
    _edit_index(path, edit)
    with pytest.raises(AdapterError, match=match):
        load_cluster_banks(path)


def test_refuses_corrupt_files(tmp_path):
    path = _saved(tmp_path)
    file = path / "cluster_00000.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # flip a bit inside a tensor
    file.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256 mismatch"):
        load_cluster_banks(path)
    file.write_bytes(bytes(data[:40]))  # truncated
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_cluster_banks(path, verify_checksums=False)
    (path / INDEX_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_cluster_banks(path)
    with pytest.raises(AdapterError, match="no index.json"):
        load_cluster_banks(tmp_path)


def test_refuses_bank_for_another_model(tmp_path):
    path = _saved(tmp_path)
    other = ModelConfig(hidden_size=64, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(AdapterError, match="does not fit the model"):
        load_cluster_banks(path, model_config=other)
    with pytest.raises(AdapterError, match="is not in this cluster bank"):
        load_cluster_banks(path).locate("no-such-adapter")


def test_module_key_names_round_trip():
    assert module_key_name((12, "down_proj")) == "layers.12.down_proj"
    assert parse_module_key("layers.12.down_proj") == (12, "down_proj")
    with pytest.raises(ValueError, match="bad module name"):
        parse_module_key("model.layers.1.q_proj")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_clustering_and_bank_round_trip(tmp_path):
    spec = SyntheticSpec(num_adapters=12, num_clusters=2, lora_rank=2, cluster_rank=4, noise=0.05,
                         layers=(0, 2), seed=3)
    syn = make_synthetic_adapters(spec, TINY, device="cuda", dtype=F64)
    cfg = ClusterConfig(jd=JDConfig(rank=4), num_clusters=2)
    res = cluster_adapters(syn.adapters, cfg, device="cuda", dtype=F64, progress=False)
    cpu = cluster_adapters([{k: (a.cpu(), b.cpu()) for k, (a, b) in ad.items()} for ad in syn.adapters], cfg,
                           dtype=F64, progress=False)
    assert torch.equal(res.labels, cpu.labels)
    torch.testing.assert_close(res.errors, cpu.errors, rtol=1e-5, atol=1e-9)
    banks = banks_from_clustering(res, syn.names)
    loaded = load_cluster_banks(save_cluster_banks(banks, tmp_path / "b"), device="cuda")
    key = banks.module_keys[0]
    assert loaded.clusters[0].U[key].device.type == "cuda"
    assert torch.equal(loaded.clusters[0].sigma[key], banks.clusters[0].sigma[key])
