"""Step-cost model: the least-squares fit recovers the parameters that generated the steps,
stays non-negative, and round-trips through JSON; the multi-LoRA terms are fitted from the
SGMV kernel benchmark and the defaults are that fit of the H100 measurement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inlaid_ray.sched.cost_model import (
    LLAMA2_7B_LORA_MODULES,
    StepCostModel,
    StepSample,
    fit_cost_model,
    lora_terms_from_kernel_bench,
)

KERNELS_H100 = Path(__file__).resolve().parents[1] / "load_tests" / "results" / "kernels_h100.json"


def samples_from(model: StepCostModel, n: int, noise: float, seed: int = 0) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bt, ad, kv = int(rng.integers(1, 2048)), int(rng.integers(0, 32)), int(rng.integers(1, 100_000))
        t = model.step_time(bt, ad, kv) * float(np.exp(rng.normal(0.0, noise)))
        out.append(StepSample(bt, ad, kv, t))
    return out


def test_fit_recovers_generating_parameters_without_noise():
    truth = StepCostModel(a_s=2e-3, b_s_per_token=4e-5, c_s_per_adapter=2e-5, d_s_per_kv_token=3e-7)
    fitted, stats = fit_cost_model(samples_from(truth, 50, noise=0.0))
    for name in ("a_s", "b_s_per_token", "c_s_per_adapter", "d_s_per_kv_token"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    assert stats["max_rel_err"] < 1e-9


def test_fit_with_noise_is_close_and_non_negative():
    truth = StepCostModel(a_s=2e-3, b_s_per_token=4e-5, c_s_per_adapter=0.0, d_s_per_kv_token=3e-7)
    fitted, stats = fit_cost_model(samples_from(truth, 400, noise=0.05, seed=1))
    assert min(fitted.a_s, fitted.b_s_per_token, fitted.c_s_per_adapter, fitted.d_s_per_kv_token) >= 0.0
    assert fitted.b_s_per_token == pytest.approx(truth.b_s_per_token, rel=0.1)
    assert fitted.a_s == pytest.approx(truth.a_s, rel=0.1)
    assert stats["median_rel_err"] < 0.06


def test_save_and_load_round_trip(tmp_path):
    model = StepCostModel(a_s=1.0, b_s_per_token=2.0, c_s_per_adapter=3.0, d_s_per_kv_token=4.0, source="x")
    model.save(tmp_path / "m.json", extra={"r2": 0.5})
    assert StepCostModel.load(tmp_path / "m.json") == model


def test_fit_rejects_too_few_or_bad_samples():
    with pytest.raises(ValueError, match="at least 4"):
        fit_cost_model([StepSample(1, 1, 1, 1.0)])
    with pytest.raises(ValueError, match="must be > 0"):
        fit_cost_model([StepSample(i, 1, 1, 0.0) for i in range(5)])


def test_lora_terms_recover_a_linear_kernel_timing():
    fixed_us, per_adapter_us, modules = 7.0, 0.2, 10
    rows = [{"what": "raw", "tokens": 32, "distinct_adapters": n, "base_us": 20.0 + b,
             "base_plus_lora_us": 20.0 + b + fixed_us + per_adapter_us * n} for n in (1, 2, 4, 8, 16, 32) for b in (0.0, 5.0)]
    rows.append({"what": "compressed", "tokens": 32, "distinct_adapters": 32, "base_us": 1.0, "base_plus_lora_us": 99.0})
    fixed, per_adapter = lora_terms_from_kernel_bench(rows, modules_per_step=modules)
    assert fixed == pytest.approx(fixed_us * 1e-6 * modules)
    assert per_adapter == pytest.approx(per_adapter_us * 1e-6 * modules)
    with pytest.raises(ValueError, match="2 adapter counts"):
        lora_terms_from_kernel_bench(rows[:2])


def test_default_adapter_terms_are_the_h100_kernel_fit():
    fixed, per_adapter = lora_terms_from_kernel_bench(json.loads(KERNELS_H100.read_text())["lora"], LLAMA2_7B_LORA_MODULES)
    default = StepCostModel()
    assert default.c_s_per_adapter == pytest.approx(per_adapter, rel=1e-3)
    assert default.a_s == pytest.approx(1.7e-3 + fixed, rel=1e-3)  # base estimate + LoRA kernels of any step
