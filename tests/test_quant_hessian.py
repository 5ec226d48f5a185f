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
    max_aggregate_hessians,
    mix_aggregate_hessians,
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
