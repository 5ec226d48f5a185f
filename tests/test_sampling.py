"""Sampling: greedy is argmax, top-k/top-p follow their definitions, the device-side uniforms are
splitmix64 (a pure-Python reference and the published first output), seeded draws are
reproducible and do not depend on the other rows of the batch, and temperature sampling
follows softmax(logits / T) empirically."""

from __future__ import annotations

import math

import pytest
import torch

from inlaid_ray.engine import SamplingParams, sample, sampling_probs
from inlaid_ray.engine.sampling import uniforms


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Reference on one row, written the slow obvious way (sorted list, running mass)."""
    scaled = (logits / temperature).tolist()
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    if top_k > 0:
        order = order[:top_k]
    z = [math.exp(scaled[i] - scaled[order[0]]) for i in order]
    mass = [v / sum(z) for v in z]
    kept, acc = [], 0.0
    for i, m in zip(order, mass):
        if acc >= top_p and top_p < 1.0:
            break
        kept.append(i)
        acc += m
    out = torch.zeros(len(scaled), dtype=torch.float64)
    zk = sum(math.exp(scaled[i] - scaled[order[0]]) for i in kept)
    for i in kept:
        out[i] = math.exp(scaled[i] - scaled[order[0]]) / zk
    return out


def test_greedy_is_argmax():
    logits = torch.randn(7, 50, generator=_gen(0))
    params = [SamplingParams()] * 7
    assert sample(logits, params, [None] * 7, [0] * 7) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.5, 5, 1.0), (1.3, -1, 0.6), (0.8, 7, 0.3), (2.0, 1, 1.0)])
def test_filtered_probabilities_match_reference(temperature, top_k, top_p):
    logits = torch.randn(4, 40, generator=_gen(1)) * 3
    got = sampling_probs(
        logits,
        torch.full((4,), temperature),
        torch.full((4,), top_k, dtype=torch.int64),
        torch.full((4,), top_p),
    )
    for row in range(4):
        torch.testing.assert_close(got[row].double(), _ref_probs(logits[row], temperature, top_k, top_p), atol=1e-6, rtol=1e-5)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = torch.randn(32, 100, generator=_gen(2))
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        assert sample(logits, [params] * 32, list(range(32)), [5] * 32) == greedy


def test_seeded_draws_are_reproducible_and_independent_of_batch_neighbours():
    torch.manual_seed(3)
    target = torch.randn(100)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)

    def run(neighbours: int, position: int) -> list[int]:
        tokens = []
        for step in range(20):
            rows = [torch.randn(100) for _ in range(neighbours)]
            rows.insert(position, target + step * 0.01)  # the target request's logits at this step
            kinds = [SamplingParams(temperature=0.7, top_k=10), SamplingParams(temperature=1.2, top_p=0.5),
                     SamplingParams(temperature=1.0), SamplingParams()]
            others = [kinds[(i + step) % 4] for i in range(neighbours)]  # same and other groups
            all_params = others[:position] + [params] + others[position:]
            seeds = [1000 + step * 10 + i for i in range(neighbours)]
            all_seeds = seeds[:position] + [123] + seeds[position:]
            counters = [step + 3 * i for i in range(neighbours + 1)]
            counters[position] = step  # the target's token index
            tokens.append(sample(torch.stack(rows), all_params, all_seeds, counters)[position])
        return tokens

    alone = run(0, 0)
    assert run(0, 0) == alone
    assert run(5, 2) == alone and run(9, 9) == alone
    assert len(set(alone)) > 3, f"the draws should vary, got {alone}"


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=4, top_p=0.8),
     SamplingParams(temperature=1.5, top_p=0.7)],
    ids=["temperature", "top_k+top_p", "top_p"],
)
def test_draws_follow_the_filtered_distribution(params):
    """Empirical frequencies match softmax(logits / T) after filtering; filtered tokens never appear."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -1.5]])
    expected = sampling_probs(
        logits, torch.tensor([params.temperature]), torch.tensor([params.top_k]), torch.tensor([params.top_p])
    )[0]
    if params.top_k == -1 and params.top_p == 1.0:
        torch.testing.assert_close(expected, torch.softmax(logits[0] / params.temperature, -1))
    n = 4000
    counts = torch.zeros(6)
    for i in range(n):
        counts[sample(logits, [params], [7], [i])[0]] += 1
    sigma = (expected * (1 - expected) / n).sqrt()
    deviation = (counts / n - expected).abs()
    assert (deviation <= 5 * sigma).all(), f"frequencies {counts / n} vs expected {expected}"
    assert (counts[expected == 0] == 0).all()


def _splitmix64(seed: int, counter: int) -> float:
    """splitmix64's output for state seed + (counter + 1) * gamma, in Python integers mod 2^64."""
    mask = (1 << 64) - 1
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


def test_uniforms_are_splitmix64():
    seeds = [0, 1, 123, 2**63 - 1, -5, -(2**63)]
    counters = [0, 1, 7, 1000, 2**31]
    pairs = [(s, c) for s in seeds for c in counters]
    got = uniforms(torch.tensor([s for s, _ in pairs]), torch.tensor([c for _, c in pairs])).tolist()
    assert got == [_splitmix64(s % (1 << 64), c) for s, c in pairs]
    # the first output of splitmix64 seeded with 0 is 0xE220A8397B1DCDAF (published test vector)
    assert uniforms(torch.tensor([0]), torch.tensor([0])).item() == (0xE220A8397B1DCDAF >> 11) * 2.0**-53
    u = uniforms(torch.full((20000,), 42), torch.arange(20000))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_unsigned_64_bit_seeds_wrap():
    logits = torch.randn(1, 30, generator=_gen(4))
    params = [SamplingParams(temperature=1.0)]
    assert sample(logits, params, [2**64 - 1], [3]) == sample(logits, params, [-1], [3])
