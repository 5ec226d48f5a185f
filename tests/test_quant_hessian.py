"""HessianAccumulator: H = 2/N_real_tokens * sum x x^T, pad-masked, fed by hooks; mix aggregation
equals GPTQ on the union of the tasks' data; the channel-max aggregate keeps the max diagonal and
stays PSD where the element-wise max does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inlaid_ray.quant import (
    HessianAccumulator,
    channel_max_aggregate_hessians,
    eigenbasis_max_aggregate_hessians,
    max_aggregate_hessians,
    mix_aggregate_hessians,
    normalized_max_aggregate_hessians,
)


def _ref_hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(xs).double()
    return (2.0 / x.shape[0] * x.t() @ x).float()


def test_running_average_equals_batch_formula() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(n, 24) for n in (7, 1, 30, 12)]
    acc = HessianAccumulator(24)
    for x in xs:
        acc.add_batch(x)
    torch.testing.assert_close(acc.H, _ref_hessian(xs), rtol=1e-5, atol=1e-5)
    assert acc.num_tokens == 50 and acc.H.dtype == torch.float32


def test_padding_is_masked_and_normaliser_counts_real_tokens() -> None:
    torch.manual_seed(1)
    lengths = [5, 2, 8]
    x = torch.randn(3, 8, 16) * 100  # pad positions hold large garbage on purpose
    mask = torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
    acc = HessianAccumulator(16)
    acc.add_batch(x, mask=mask)
    real = [x[b, :n] for b, n in enumerate(lengths)]
    torch.testing.assert_close(acc.H, _ref_hessian(real), rtol=1e-5, atol=1e-3)
    assert acc.num_tokens == sum(lengths) and acc.num_sequences == 3


def test_all_pad_batch_adds_nothing() -> None:
    acc = HessianAccumulator(4)
    acc.add_batch(torch.randn(2, 3, 4), mask=torch.zeros(2, 3, dtype=torch.bool))
    assert acc.num_tokens == 0 and torch.count_nonzero(acc.H) == 0


def test_forward_pre_hook_records_linear_input() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(12, 5)
    acc = HessianAccumulator(12)
    handle = lin.register_forward_pre_hook(acc.hook)
    xs = [torch.randn(9, 12), torch.randn(4, 12)]
    for x in xs:
        lin(x)
    handle.remove()
    torch.testing.assert_close(acc.H, _ref_hessian(xs), rtol=1e-5, atol=1e-5)


def test_mix_aggregate_equals_union_of_tasks() -> None:
    torch.manual_seed(3)
    tasks = [[torch.randn(n, 10) * s for n in ns] for s, ns in ((1.0, (4, 9)), (3.0, (20,)), (0.5, (2, 2, 2)))]
    accs = []
    for batches in tasks:
        acc = HessianAccumulator(10)
        for x in batches:
            acc.add_batch(x)
        accs.append(acc)
    union = _ref_hessian([x for batches in tasks for x in batches])
    torch.testing.assert_close(mix_aggregate_hessians(accs), union, rtol=1e-5, atol=1e-5)
    mixed = mix_aggregate_hessians([a.H for a in accs], [a.num_tokens for a in accs])
    torch.testing.assert_close(mixed, union, rtol=1e-5, atol=1e-5)


def _task_hessians(seed: int, d: int = 40, tokens: int = 200, tasks: int = 4) -> list[torch.Tensor]:
    """PSD Hessians of tasks sharing a mean activation but with task-specific channel mixing."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g)
    out = []
    for _ in range(tasks):
        x = mean + torch.randn(tokens, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
        out.append(_ref_hessian([x]))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_channel_max_is_psd_with_the_max_diagonal(seed: int) -> None:
    hs = _task_hessians(seed)
    counts = [200] * len(hs)
    elementwise = max_aggregate_hessians(hs)
    channel = channel_max_aggregate_hessians(hs, counts)
    assert float(torch.linalg.eigvalsh(elementwise.double()).min()) < 0  # the hazard it avoids (5.4)
    torch.testing.assert_close(channel.diagonal(), elementwise.diagonal(), rtol=1e-5, atol=0)
    torch.testing.assert_close(channel, channel.t())
    evals = torch.linalg.eigvalsh(channel.double())
    assert float(evals.min()) > -1e-5 * float(evals.max())
    # the correlations are the pooled data's: normalising either matrix by its diagonal agrees
    mix = mix_aggregate_hessians(hs, counts)
    corr = lambda h: h / torch.outer(h.diagonal().sqrt(), h.diagonal().sqrt())  # noqa: E731
    torch.testing.assert_close(corr(channel), corr(mix), rtol=1e-4, atol=1e-5)


def test_channel_max_of_identical_tasks_and_dead_channels() -> None:
    h = _task_hessians(7, tasks=1)[0]
    h[:, 3] = 0
    h[3, :] = 0  # a channel no task ever activates stays zero (GPTQ treats it as dead)
    out = channel_max_aggregate_hessians([h, h.clone()], [5, 9])
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)
    assert torch.all(out[3] == 0) and torch.all(out[:, 3] == 0)


def test_bad_inputs_raise() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        acc.add_batch(torch.randn(3, 7))
    with pytest.raises(ValueError, match="mask shape"):
        acc.add_batch(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_counts"):
        mix_aggregate_hessians([torch.eye(3)])
    with pytest.raises(ValueError, match="one shape"):
        mix_aggregate_hessians([torch.eye(3), torch.eye(4)], [1, 1])


def test_token_weights_give_the_weighted_mean() -> None:
    """H = 2 sum w x x^T / sum w in float64, across batches, with padding masked; weight 0 drops a
    token and num_tokens still counts it."""
    torch.manual_seed(4)
    xs = [torch.randn(6, 12), torch.randn(9, 12) * 5]
    ws = [torch.rand(6), torch.cat([torch.zeros(1), torch.rand(8) + 0.5])]
    acc = HessianAccumulator(12)
    for x, w in zip(xs, ws):
        acc.add_batch(x, weights=w)
    x, w = torch.cat(xs).double(), torch.cat(ws).double()
    ref = 2 * (x * w[:, None]).t() @ x / w.sum()
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-5)
    assert acc.num_tokens == 15 and acc.weight_total == pytest.approx(float(w.sum()), rel=1e-6)
    masked = HessianAccumulator(12)
    masked.add_batch(torch.stack([xs[1], xs[1] * 0 + 99]), mask=torch.tensor([[True] * 9, [False] * 9]),
                     weights=torch.stack([ws[1], ws[1]]))
    single = HessianAccumulator(12)
    single.add_batch(xs[1], weights=ws[1])
    torch.testing.assert_close(masked.H, single.H)
    with pytest.raises(ValueError, match="non-negative"):
        acc.add_batch(xs[0], weights=-ws[0])
    # the mix of weighted accumulators is the weighted union of their data
    other = HessianAccumulator(12)
    y, wy = torch.randn(20, 12) * 2, torch.rand(20)
    other.add_batch(y, weights=wy)
    xy, wxy = torch.cat([x, y.double()]), torch.cat([w, wy.double()])
    union = 2 * (xy * wxy[:, None]).t() @ xy / wxy.sum()
    torch.testing.assert_close(mix_aggregate_hessians([acc, other]).double(), union, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_eigenbasis_max_is_psd_and_keeps_every_tasks_energy_per_direction(seed: int) -> None:
    hs = _task_hessians(seed)
    counts = [200, 100, 300, 200]
    out = eigenbasis_max_aggregate_hessians(hs, counts).double()
    evals = torch.linalg.eigvalsh(out)
    assert float(evals.min()) > -1e-6 * float(evals.max())
    # float64 reference: eigenvectors of the pooled mean, each task's energy along each of them
    mix = sum(n * h.double() for n, h in zip(counts, hs)) / sum(counts)
    _, basis = torch.linalg.eigh(mix)
    energies = torch.stack([torch.einsum("id,ij,jd->d", basis, h.double(), basis) for h in hs])
    ref = basis @ torch.diag(energies.amax(0)) @ basis.t()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    along = torch.einsum("id,ij,jd->d", basis, out, basis)
    assert bool((along >= energies.amax(0) * (1 - 1e-4)).all())


def test_eigenbasis_max_equals_elementwise_max_for_commuting_diagonal_hessians() -> None:
    g = torch.Generator().manual_seed(9)
    hs = [torch.diag(torch.rand(16, generator=g) + 0.1) for _ in range(3)]
    torch.testing.assert_close(eigenbasis_max_aggregate_hessians(hs, [1, 1, 1]), max_aggregate_hessians(hs))


def test_normalized_max_compares_shapes_not_scales() -> None:
    hs = _task_hessians(11, tasks=3)
    scaled = [hs[0] * 100, hs[1], hs[2] * 0.01]
    out = normalized_max_aggregate_hessians(scaled).double()
    e = [float(h.double().diagonal().mean()) for h in scaled]
    ref = torch.stack([h.double() / ei for h, ei in zip(scaled, e)]).amax(0) * (sum(e) / 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # rescaling one task leaves the shape of the result unchanged (the plain max would follow task 0)
    shape = lambda h: h / h.diagonal().mean()  # noqa: E731
    torch.testing.assert_close(shape(out), shape(normalized_max_aggregate_hessians(hs).double()), rtol=1e-4, atol=1e-6)


def test_shared_token_split_and_shared_mean_max() -> None:
    """The Hessian of each sequence's first k tokens, recovered from a full and a sink_weight=0
    accumulation, equals the float64 formula on those tokens; the shared-mean max pools them and
    takes the element-wise max of the rest (identical tasks: unchanged)."""
    from inlaid_ray.quant.diagnostics import shared_mean_max_aggregate, shared_token_hessian

    torch.manual_seed(5)
    seqs = [torch.randn(n, 10) * torch.linspace(0.5, 3, 10) for n in (9, 4, 12)]
    k = 2
    full, rest = HessianAccumulator(10), HessianAccumulator(10)
    for x in seqs:
        full.add_batch(x)
        rest.add_batch(x, weights=torch.cat([torch.zeros(k), torch.ones(len(x) - k)]))
    shared = shared_token_hessian(full.H, full.num_tokens, rest.H, rest.weight_total)
    torch.testing.assert_close(shared, _ref_hessian([x[:k] for x in seqs]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rest.H, _ref_hessian([x[k:] for x in seqs]), rtol=1e-5, atol=1e-5)
    ns, nr = 3 * k, full.num_tokens - 3 * k
    same = shared_mean_max_aggregate([shared, shared], [rest.H, rest.H], [ns, ns], [nr, nr])
    torch.testing.assert_close(same, full.H, rtol=1e-4, atol=1e-4)
    other = rest.H * 2
    mixed = shared_mean_max_aggregate([shared, shared * 3], [rest.H, other], [ns, ns], [nr, nr])
    f = ns / full.num_tokens
    ref = f * (shared.double() * 2) + (1 - f) * torch.maximum(rest.H, other).double()
    torch.testing.assert_close(mixed.double(), ref, rtol=1e-5, atol=1e-5)
