"""Workload generator: arrival burstiness (gamma CV), popularity shapes, length laws, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from inlaid_ray.bench.workload import PAPER_PROFILES, WorkloadConfig, generate_workload


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 2.0), ("gamma", 8.0)])
def test_interarrival_mean_and_cv(arrival, cv):
    cfg = WorkloadConfig(num_requests=40_000, rate=5.0, arrival=arrival, cv=cv, num_tasks=4, seed=1)
    gaps = np.diff([0.0] + [r.arrival_time for r in generate_workload(cfg)[1]])
    assert gaps.mean() == pytest.approx(1 / cfg.rate, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_zipf_popularity_is_skewed_and_uniform_is_flat():
    zipf = WorkloadConfig(num_tasks=50, num_requests=20_000, popularity="zipf", seed=2)
    counts = np.bincount([int(r.task.split("-")[1]) for r in generate_workload(zipf)[1]], minlength=50)
    expected = 1.0 / np.arange(1, 51)
    assert counts[0] / counts.sum() == pytest.approx(expected[0] / expected.sum(), rel=0.1)
    uni = WorkloadConfig(num_tasks=50, num_requests=20_000, popularity="uniform", seed=2)
    counts = np.bincount([int(r.task.split("-")[1]) for r in generate_workload(uni)[1]], minlength=50)
    assert counts.max() / counts.min() < 1.5


def test_lengths_follow_task_kinds():
    cfg = WorkloadConfig(num_tasks=4, num_requests=8000, task_jitter_sigma=0.0, prediction="oracle", seed=3)
    _, reqs = generate_workload(cfg)
    for i, prof in enumerate(PAPER_PROFILES):
        mine = [r for r in reqs if r.task == f"task-{i:04d}"]
        assert np.median([r.prompt_tokens for r in mine]) == pytest.approx(prof.prompt_median, rel=0.1)
        assert np.median([r.output_tokens for r in mine]) == pytest.approx(prof.output_median, rel=0.1)
        assert all(r.predicted_output_len == r.output_tokens for r in mine)


def test_same_seed_same_workload():
    cfg = WorkloadConfig(num_tasks=10, num_requests=50, arrival="gamma", cv=4.0, seed=9)
    assert generate_workload(cfg) == generate_workload(cfg)


def test_diurnal_rate_follows_its_sine():
    """Arrivals per half-period against the integral of rate x (1 + A sin): (1 +- 2A/pi) / 2 x rate x P."""
    cfg = WorkloadConfig(num_tasks=4, num_requests=60_000, rate=20.0, diurnal_amplitude=0.6, diurnal_period_s=100.0, seed=4)
    times = np.array([r.arrival_time for r in generate_workload(cfg)[1]])
    full = int(times[-1] // 100.0)
    phase = times[times < full * 100.0] % 100.0
    high, low = (phase < 50.0).sum() / full, (phase >= 50.0).sum() / full
    assert high == pytest.approx(20.0 * 50.0 * (1 + 2 * 0.6 / np.pi), rel=0.05)
    assert low == pytest.approx(20.0 * 50.0 * (1 - 2 * 0.6 / np.pi), rel=0.05)


def test_long_prompts_and_heavy_tailed_outputs():
    base = WorkloadConfig(num_tasks=4, num_requests=8000, task_jitter_sigma=0.0, max_prompt_tokens=100_000,
                          max_output_tokens=1_000_000, seed=5)
    scaled = WorkloadConfig(**{**base.__dict__, "prompt_scale": 4.0, "output_sigma_scale": 2.0})
    for i, prof in enumerate(PAPER_PROFILES):
        plain = [r for r in generate_workload(base)[1] if r.task == f"task-{i:04d}"]
        heavy = [r for r in generate_workload(scaled)[1] if r.task == f"task-{i:04d}"]
        assert np.median([r.prompt_tokens for r in heavy]) == pytest.approx(4.0 * prof.prompt_median, rel=0.1)
        assert np.std(np.log([r.output_tokens for r in heavy])) == pytest.approx(2.0 * prof.output_sigma, rel=0.1)
        assert np.median([r.output_tokens for r in heavy]) == pytest.approx(np.median([r.output_tokens for r in plain]), rel=0.1)
