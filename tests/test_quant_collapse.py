"""The helpers of load_tests/quant_collapse.py (the diagnostic of the element-wise-max collapse) on
a tiny random Llama with three PEFT tasks: the aggregates it compares are the ones MLGPTQ uses
(mix = token-weighted mean, channel max PSD, the element-wise max shifted until PSD), the
element-wise max itself is indefinite, the eigenvalue summary is exact on a known matrix, and the
dequantized checkpoint is a grid reconstruction of the base (at most 2^bits levels per group)."""

from __future__ import annotations


import pytest
import torch

from inlaid_ray.model.config import LINEAR_MODULES
from inlaid_ray.model.loader import read_safetensors_dir
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quantized_base.checkpoint import load_gptq_checkpoint, split_layers
from inlaid_ray.quant.incremental import quantize_base
from inlaid_ray.quant.mlgptq import GROUP_OF, MLGPTQConfig, hf_prefix
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore
from test_mlgptq_setup import GROUP_SIZE, make_task_sources, write_tiny_base

from inlaid_ray.quant.diagnostics import aggregate_variants, dequantized, min_eig_over_mean_diag

BITS = 4
# rank-deficient tiny-model Hessians have eigenvalues of float32 noise, ~1e-7 of the mean diagonal
PSD_NOISE = -1e-5


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("collapse")
    base = write_tiny_base(root / "base")
    sources = make_task_sources(root, base)
    cfg = MLGPTQConfig(method="mlgptq", grid=QuantGrid(bits=BITS, group_size=GROUP_SIZE), batch_tokens=96)
    quantize_base(base, sources, root / "ckpt", cfg, CalibrationConfig(tokens_per_task=150), root / "stats",
                  progress=False, keep_task_hessians=True)
    return base, root / "ckpt", StatsStore.open(root / "stats"), [s.name for s in sources]


def test_min_eig_over_mean_diag_is_exact_on_a_known_matrix():
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    eig = torch.tensor([-2.0, -0.5, 1.0, 3.0, 8.5], dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.T
    ratio, negatives = min_eig_over_mean_diag(h)
    assert negatives == 2
    assert ratio == pytest.approx(-2.0 / (eig.sum().item() / 5), rel=1e-9)  # trace is basis-independent


@pytest.mark.parametrize("module", ["q_proj", "down_proj"])
def test_aggregates_are_the_ones_mlgptq_compares(quantized, module):
    _, _, store, tasks = quantized
    parts = [store.task_layer(t, 0)[GROUP_OF[module]].double() for t in tasks]
    counts = torch.tensor([store.tasks[t].num_tokens for t in tasks], dtype=torch.float64)
    variants = {k: v.double() for k, v in aggregate_variants(store, tasks, 0, module).items()}
    assert set(variants) == {"mix", "elementwise max (eig-clipped)", "elementwise max shifted to PSD", "channel max"}
    mix = sum(c * h for c, h in zip(counts, parts)) / counts.sum()
    torch.testing.assert_close(variants["mix"], mix, rtol=1e-5, atol=1e-6 * mix.abs().max().item())
    # the channel max keeps each channel's largest energy and is PSD by construction
    stacked_diag = torch.stack([h.diagonal() for h in parts])
    torch.testing.assert_close(variants["channel max"].diagonal(), stacked_diag.max(0).values, rtol=1e-5, atol=0.0)
    assert min_eig_over_mean_diag(variants["channel max"])[0] > PSD_NOISE
    # the element-wise max of PSD matrices is not PSD (the collapse); the shift by 1.01 x its most
    # negative eigenvalue makes it PSD and leaves the off-diagonals untouched
    shifted, elementwise = variants["elementwise max shifted to PSD"], variants["elementwise max (eig-clipped)"]
    assert min(min_eig_over_mean_diag(h)[0] for h in parts) > PSD_NOISE
    assert min_eig_over_mean_diag(elementwise)[0] < -0.1
    assert min_eig_over_mean_diag(shifted)[1] == 0
    off = ~torch.eye(len(shifted), dtype=torch.bool)
    torch.testing.assert_close(shifted[off], elementwise[off])
    shift = (shifted - elementwise).diagonal()
    torch.testing.assert_close(shift, shift[0].expand_as(shift), rtol=1e-5, atol=1e-6)


def test_dequantized_checkpoint_is_a_grid_reconstruction_of_the_base(quantized):
    base, ckpt, _, _ = quantized
    weights = dequantized(ckpt, BITS)
    _, _, tensors = load_gptq_checkpoint(ckpt, "cpu")
    packed = split_layers(tensors)
    dense = read_safetensors_dir(base)
    layers = sorted({int(p.split(".")[2]) for p in weights})
    assert set(weights) == {hf_prefix(layer, m) for layer in layers for m in LINEAR_MODULES}
    for prefix, w in weights.items():
        reference = dense[prefix + ".weight"].float()
        # at most 2^BITS levels per output row and quantization group (g_idx), near the fp weights
        g_idx = packed[prefix]["g_idx"].long()
        for g in g_idx.unique():
            cols = w[:, g_idx == g]
            assert max(len(row.unique()) for row in cols) <= 2**BITS, prefix
        assert (w - reference).norm() / reference.norm() < 0.2, prefix
