"""MLGPTQ math (docs/algorithms.md 5.3-5.4, 6.3): element-wise max aggregation of per-task Hessians and
its properties, and GPTQ on a non-PSD max-aggregate (damping escalation, then eigen-clipping)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from inlaid_ray.quant import (
    HessianAccumulator,
    QuantGrid,
    gptq_quantize,
    max_aggregate_hessians,
    mix_aggregate_hessians,
    rtn_quantize,
)


def _task_hessians(n_tasks: int = 3, d_in: int = 32, seed: int = 0) -> list[HessianAccumulator]:
    """Per-task Hessians of tasks that use different input channels with different energy."""
    g = torch.Generator().manual_seed(seed)
    accs = []
    for t in range(n_tasks):
        energy = torch.rand(d_in, generator=g) ** 4 * 10  # each task has its own salient channels
        acc = HessianAccumulator(d_in)
        acc.add_batch(torch.randn(50 + 30 * t, d_in, generator=g) * energy)
        accs.append(acc)
    return accs


def test_max_is_elementwise_and_bounds_every_task() -> None:
    accs = _task_hessians()
    agg = max_aggregate_hessians(accs)
    assert torch.equal(agg, torch.stack([a.H for a in accs]).amax(dim=0))
    for a in accs:
        assert torch.all(agg.diagonal() >= a.H.diagonal())
        assert torch.all(agg >= a.H)
    assert torch.equal(agg, agg.t())  # max of symmetric matrices is symmetric


def test_max_is_order_invariant_idempotent_and_incremental() -> None:
    accs = _task_hessians(4, seed=1)
    hs = [a.H for a in accs]
    full = max_aggregate_hessians(hs)
    for order in itertools.permutations(range(4)):
        assert torch.equal(max_aggregate_hessians([hs[i] for i in order]), full)
    assert torch.equal(max_aggregate_hessians(hs + [hs[2]]), full)  # a task added twice
    assert torch.equal(max_aggregate_hessians([full, hs[1]]), full)
    # section 6.3: old aggregate + new tasks == aggregate over all tasks, exactly
    assert torch.equal(max_aggregate_hessians([max_aggregate_hessians(hs[:2]), *hs[2:]]), full)


def test_max_differs_from_mix_and_keeps_salient_channels() -> None:
    """Mixing averages a channel that one task relies on; the max keeps its full energy."""
    accs = _task_hessians(3, seed=2)
    mx, mix = max_aggregate_hessians(accs), mix_aggregate_hessians(accs)
    assert torch.all(mx.diagonal() >= mix.diagonal() - 1e-5)
    assert float((mx.diagonal() - mix.diagonal()).max()) > 0.1 * float(mix.diagonal().max())


def _spec_example() -> torch.Tensor:
    """docs/algorithms.md 5.4: tasks with single tokens v=(1,1,0), w=(0,1,1); max(vv^T, ww^T) has det -1."""
    hs = []
    for v in ((1.0, 1.0, 0.0), (0.0, 1.0, 1.0)):
        acc = HessianAccumulator(3)
        acc.add_batch(torch.tensor([v]) / 2**0.5)  # H = 2/1 * (v/sqrt2)(v/sqrt2)^T = v v^T
        hs.append(acc)
    return max_aggregate_hessians(hs)


def test_spec_example_is_not_psd() -> None:
    H = _spec_example()
    torch.testing.assert_close(H, torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]]))
    assert float(torch.linalg.det(H.double())) == pytest.approx(-1.0, rel=1e-5)


def test_non_psd_aggregate_quantizes_with_escalated_damping() -> None:
    H = _spec_example()
    W = torch.tensor([[0.3, -0.7, 0.2], [1.0, 0.1, -0.4]])
    grid = QuantGrid(bits=4, group_size=-1)
    r = gptq_quantize(W, H, grid)
    assert torch.isfinite(r.Q).all() and not r.eig_clipped
    assert r.damp_used > grid.damp_percent
    # the damping found is the first doubling that makes H + damp * mean(diag) * I positive definite
    min_eig, mean_diag = float(torch.linalg.eigvalsh(H.double()).min()), float(H.diagonal().mean())
    assert min_eig + r.damp_used * mean_diag > 0 >= min_eig + r.damp_used / 2 * mean_diag
    assert torch.equal(r.Q, grid.find_params(W)[0][:, None] * (r.codes - r.zeros[r.g_idx.long()].t()))


def test_eigen_clipping_is_the_last_resort() -> None:
    H = _spec_example()
    W = torch.tensor([[0.3, -0.7, 0.2], [1.0, 0.1, -0.4]])
    grid = QuantGrid(bits=4, group_size=-1, damp_max=0.05)  # too little damping allowed
    r = gptq_quantize(W, H, grid)
    assert r.eig_clipped and r.damp_used == grid.damp_percent
    assert torch.isfinite(r.Q).all()


def test_shift_repair_is_gptq_on_the_shifted_hessian() -> None:
    """psd_repair="shift": H + (floor - min eigenvalue) I, then standard damping; i.e. the same
    result as GPTQ run directly on that PSD matrix (float64 eigenvalue as the reference)."""
    H = _spec_example()
    W = torch.tensor([[0.3, -0.7, 0.2], [1.0, 0.1, -0.4]])
    grid = QuantGrid(bits=4, group_size=-1, damp_max=0.05, psd_repair="shift")
    r = gptq_quantize(W, H, grid)
    assert r.eig_clipped and r.damp_used == grid.damp_percent
    shifted = H.clone()
    shifted.diagonal().add_(-float(torch.linalg.eigvalsh(H.double()).min()) + float(H.diagonal().mean()) * 1e-6)
    direct = gptq_quantize(W, shifted, grid)
    assert not direct.eig_clipped
    torch.testing.assert_close(r.Q, direct.Q)
    clipped = gptq_quantize(W, H, dataclasses.replace(grid, psd_repair="clip"))
    assert clipped.eig_clipped
    with pytest.raises(ValueError, match="psd_repair"):
        QuantGrid(psd_repair="abs")


def test_max_aggregate_gptq_bounds_per_task_error() -> None:
    """Quantizing once with H_max keeps every task's layer-output error below RTN's."""
    d_in, d_out = 64, 32
    g = torch.Generator().manual_seed(5)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    xs, accs = [], []
    for _ in range(3):
        mix = torch.randn(d_in, d_in, generator=g) * (torch.rand(d_in, generator=g) ** 3 * 4 + 0.05)
        x = torch.randn(400, d_in, generator=g) @ mix
        acc = HessianAccumulator(d_in)
        acc.add_batch(x)
        xs.append(x)
        accs.append(acc)
    grid = QuantGrid(bits=3, group_size=32)
    Q = gptq_quantize(W, max_aggregate_hessians(accs), grid).Q
    Q_rtn = rtn_quantize(W, grid).Q
    for x in xs:
        assert float(((x @ (W - Q).t()) ** 2).sum()) < float(((x @ (W - Q_rtn).t()) ** 2).sum())
