"""Step-time model of one engine iteration, used by the simulator and for SLOs:

    t_step = a + b * batch_tokens + c * distinct_adapters + d * kv_tokens  (+ e * adapter_loads)

`batch_tokens` = tokens processed this step (prefill tokens + one per decoding sequence),
`distinct_adapters` = distinct tasks with an adapter among the scheduled sequences,
`kv_tokens` = sum over scheduled sequences of their context length after the step (attention
reads), `adapter_loads` = adapters copied in from host memory this step (only when the
simulated replica holds fewer adapter slots than tasks, as S-LoRA's swapping).
Parameters are fitted by non-negative least squares on measured steps (`fit_cost_model`,
driven by `inlaid_ray/bench/step_cost.py`) and stored as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StepCostModel:
    """Linear step-time model; the defaults are an H100 / Llama-2-7B 4-bit estimate.

    a = 1.7 ms base (docs/performance.md bound: 3.9 GB of 4-bit weights at ~3 TB/s is 1.3 ms, the
    engine target is 1.3x that) + 0.944 ms of multi-LoRA kernels present in any step with an
    adapter, and c = 17.6 us per distinct adapter: both fitted (`lora_terms_from_kernel_bench`)
    on the H100 SGMV measurement load_tests/results/kernels_h100.json (4096 x 4096 layer,
    batch 32, rank 16, 1..32 distinct adapters: 7.38 us + 0.137 us per adapter) times the 128
    q/k/v/o projections of Llama-2-7B. b = 30 us per token (13.4 GFLOP per token at ~450
    TFLOP/s), d = 0.175 us per context token (512 KiB of fp16 K/V per token at 3 TB/s),
    e = 1.3 ms per adapter load (33.5 MB over ~25 GB/s PCIe): analytic bounds.
    """

    a_s: float = 1.7e-3 + 0.944e-3
    b_s_per_token: float = 3.0e-5
    c_s_per_adapter: float = 1.757e-5
    d_s_per_kv_token: float = 1.75e-7
    e_s_per_adapter_load: float = 1.3e-3
    source: str = (
        "default: Llama-2-7B shape, 4-bit GPTQ, H100; docs/performance.md bounds, "
        "LoRA terms fitted on kernels_h100.json"
    )

    def step_time(self, batch_tokens: int, distinct_adapters: int, kv_tokens: int, adapter_loads: int = 0) -> float:
        """Seconds one step takes."""
        return (
            self.a_s
            + self.b_s_per_token * batch_tokens
            + self.c_s_per_adapter * distinct_adapters
            + self.d_s_per_kv_token * kv_tokens
            + self.e_s_per_adapter_load * adapter_loads
        )

    def isolated_latency(self, prompt_tokens: int, output_tokens: int, with_adapter: bool = True) -> float:
        """End-to-end seconds of one request alone on the replica (adapter resident).

        One prefill step (p tokens, context p) then `o - 1` decode steps (context p + i).
        """
        p, o = prompt_tokens, output_tokens
        adapter = 1 if with_adapter else 0
        kv = o * p + (o - 1) * o // 2
        return o * (self.a_s + self.c_s_per_adapter * adapter) + self.b_s_per_token * (p + o - 1) + self.d_s_per_kv_token * kv

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the parameters (plus fit statistics in `extra`) as JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**self.to_dict(), **(extra or {})}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "StepCostModel":
        """Read parameters saved by `save` (extra keys are ignored)."""
        data = json.loads(Path(path).read_text())
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass(frozen=True)
class StepSample:
    """One measured engine step."""

    batch_tokens: int
    distinct_adapters: int
    kv_tokens: int
    seconds: float


_FEATURES = ("a_s", "b_s_per_token", "c_s_per_adapter", "d_s_per_kv_token")


def _design(samples: Sequence[StepSample]) -> np.ndarray:
    return np.array([[1.0, s.batch_tokens, s.distinct_adapters, s.kv_tokens] for s in samples], dtype=np.float64)


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: drop the most negative column and refit."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[active] = sol
        if (sol >= 0).all() or len(active) == 1:
            return np.clip(coef, 0.0, None)
        active.pop(int(np.argmin(sol)))


def fit_cost_model(
    samples: Sequence[StepSample], source: str = "fit", e_s_per_adapter_load: float = 0.0
) -> tuple[StepCostModel, dict]:
    """Fit a, b, c, d (all >= 0) minimising *relative* squared error; returns (model, stats).

    Relative error so that the many cheap decode steps weigh as much as a few long prefills.
    `stats` holds n, r2 (on seconds) and the median / max absolute relative error.
    """
    if len(samples) < len(_FEATURES):
        raise ValueError(f"need at least {len(_FEATURES)} step samples to fit, got {len(samples)}")
    x = _design(samples)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    if (y <= 0).any():
        raise ValueError(f"step times must be > 0, got min {y.min()}")
    coef = _nnls(x / y[:, None], np.ones_like(y))
    pred = x @ coef
    rel = np.abs(pred - y) / y
    r2 = 1.0 - float(((pred - y) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    model = StepCostModel(**dict(zip(_FEATURES, map(float, coef))), e_s_per_adapter_load=e_s_per_adapter_load, source=source)
    stats = {"n": len(samples), "r2": r2, "median_rel_err": float(np.median(rel)), "max_rel_err": float(rel.max())}
    return model, stats


# q, k, v, o of every layer of Llama-2-7B: 32 layers x 4 projections, all 4096 x 4096
LLAMA2_7B_LORA_MODULES = 32 * 4


def lora_terms_from_kernel_bench(
    rows: Sequence[dict], modules_per_step: int = LLAMA2_7B_LORA_MODULES, tokens: int = 32
) -> tuple[float, float]:
    """(seconds per step with any adapter, seconds per distinct adapter) from SGMV timings.

    `rows` are the "lora" entries of `load_tests/bench_kernels.py`'s JSON: one layer's time
    with and without the multi-LoRA term for a batch of `tokens` spread over 1..n distinct
    raw adapters. Least squares of the LoRA time `base_plus_lora_us - base_us` on the
    number of distinct adapters (both base kernels pooled: the LoRA term does not depend on
    them), scaled by the LoRA-carrying projections one step runs.
    """
    use = [r for r in rows if r.get("what") == "raw" and r["tokens"] == tokens]
    if len({r["distinct_adapters"] for r in use}) < 2:
        raise ValueError(f"need raw LoRA timings at >= 2 adapter counts for {tokens} tokens, got {len(use)} rows")
    x = np.array([[1.0, r["distinct_adapters"]] for r in use])
    y = np.array([r["base_plus_lora_us"] - r["base_us"] for r in use]) * 1e-6
    (fixed, per_adapter), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(fixed) * modules_per_step, float(per_adapter) * modules_per_step
