"""Synthetic multi-task serving workloads for the simulator (docs/algorithms.md 8, reproduction
protocol): 1..1000 tasks whose prompt/output lengths follow per-task log-normal laws shaped
like LoRA-Inlaid's Fig.3 kinds (translation, table summary, text summary, code generation),
Poisson or bursty gamma arrivals, uniform or Zipf task popularity, and a predicted output
length per request from a chosen prediction model.

SLO of a request (explicit, item 20 of section 11): `slo_multiple x` its isolated latency,
i.e. the end-to-end time of the same (prompt, output) lengths alone on the replica under the
simulator's cost model (`StepCostModel.isolated_latency`); computed in `metrics.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class LengthProfile:
    """Log-normal prompt and output lengths (tokens) of one kind of task."""

    kind: str
    prompt_median: float
    prompt_sigma: float  # of ln(tokens)
    output_median: float
    output_sigma: float


# Medians read off the shape of LoRA-Inlaid Fig.3 (log10 token counts per task) [I]: short
# in/short out translation, long-in/short-out summaries, short-in/long-out code generation.
PAPER_PROFILES: tuple[LengthProfile, ...] = (
    LengthProfile("translation", 40, 0.5, 45, 0.5),
    LengthProfile("table_summary", 600, 0.4, 90, 0.4),
    LengthProfile("text_summary", 900, 0.5, 60, 0.5),
    LengthProfile("code_generation", 120, 0.5, 300, 0.6),
)


@dataclass(frozen=True)
class WorkloadConfig:
    """Knobs of a generated workload; every field has a default."""

    num_tasks: int = 100  # 1..1000 tasks, kind of task i = PAPER_PROFILES[i % 4]
    num_requests: int = 2000
    rate: float = 10.0  # mean arrivals per second
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0  # coefficient of variation of inter-arrival times (gamma only; 2-8 = bursty)
    # diurnal rate: rate x (1 + amplitude x sin(2 pi t / period)); 0 = constant rate
    diurnal_amplitude: float = 0.0
    diurnal_period_s: float = 600.0
    popularity: Literal["uniform", "zipf"] = "uniform"
    zipf_s: float = 1.0  # P(task i) ~ 1 / (i + 1)**zipf_s
    task_jitter_sigma: float = 0.3  # per-task medians = kind median * exp(N(0, this))
    prompt_scale: float = 1.0  # prompt medians x this (long-prompt-heavy workloads: > 1)
    output_sigma_scale: float = 1.0  # output log-normal sigmas x this (heavy-tailed outputs: > 1)
    max_prompt_tokens: int = 2048
    max_output_tokens: int = 1024
    # predicted output length: "oracle" = true length, "noisy" = true * exp(N(0, sigma)),
    # "task_median" = the task's median, "none" = no prediction (policies fall back)
    prediction: Literal["oracle", "noisy", "task_median", "none"] = "noisy"
    prediction_sigma: float = 0.5  # log-error of "noisy" (calibrate from the predictor eval)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_tasks <= 100_000 or self.num_requests < 1 or self.rate <= 0:
            raise ValueError(
                f"num_tasks={self.num_tasks} must be >= 1, num_requests={self.num_requests} >= 1, rate={self.rate} > 0"
            )
        if self.arrival == "gamma" and self.cv <= 0:
            raise ValueError(f"cv={self.cv} must be > 0 for gamma arrivals")
        if not 0.0 <= self.diurnal_amplitude < 1.0 or self.diurnal_period_s <= 0:
            raise ValueError(f"diurnal_amplitude={self.diurnal_amplitude} must be in [0, 1) and "
                             f"diurnal_period_s={self.diurnal_period_s} > 0")
        if self.prompt_scale <= 0 or self.output_sigma_scale <= 0:
            raise ValueError(f"prompt_scale={self.prompt_scale} and output_sigma_scale={self.output_sigma_scale} must be > 0")


@dataclass(frozen=True)
class TaskSpec:
    """One task's name, kind and its own length medians."""

    name: str
    profile: LengthProfile
    prompt_median: float
    output_median: float


@dataclass(frozen=True)
class RequestSpec:
    """One generated request: what the simulator replays."""

    request_id: str
    task: str
    arrival_time: float
    prompt_tokens: int
    output_tokens: int  # true length: the request finishes after exactly this many tokens
    max_tokens: int
    predicted_output_len: float | None


def make_tasks(cfg: WorkloadConfig, rng: np.random.Generator) -> list[TaskSpec]:
    """Tasks cycling through the paper's kinds, each with jittered medians."""
    tasks = []
    for i in range(cfg.num_tasks):
        prof = PAPER_PROFILES[i % len(PAPER_PROFILES)]
        jp, jo = np.exp(rng.normal(0.0, cfg.task_jitter_sigma, size=2))
        tasks.append(TaskSpec(f"task-{i:04d}", prof, prof.prompt_median * jp, prof.output_median * jo))
    return tasks


def arrival_times(cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Cumulative arrival times (s): exponential gaps (Poisson) or gamma gaps with the given CV,
    time-changed to the diurnal rate when it has an amplitude."""
    n = cfg.num_requests
    if cfg.arrival == "poisson":
        gaps = rng.exponential(1.0 / cfg.rate, size=n)
    else:
        shape = 1.0 / cfg.cv**2  # gamma: mean shape*scale = 1/rate, CV = 1/sqrt(shape)
        gaps = rng.gamma(shape, 1.0 / (cfg.rate * shape), size=n)
    times = np.cumsum(gaps)
    if cfg.diurnal_amplitude == 0.0:
        return times
    # Arrival k happens when the cumulative intensity reaches rate x times[k]:
    # Lambda(t) / rate = t + A P / (2 pi) (1 - cos(2 pi t / P)), increasing for A < 1.
    a, period = cfg.diurnal_amplitude, cfg.diurnal_period_s
    grid = np.linspace(0.0, times[-1] / (1.0 - a) + period, 200_000)
    warped = grid + a * period / (2 * np.pi) * (1.0 - np.cos(2 * np.pi * grid / period))
    return np.interp(times, warped, grid)


def task_probabilities(cfg: WorkloadConfig) -> np.ndarray:
    """Popularity of each task (uniform or Zipf), summing to 1."""
    if cfg.popularity == "uniform":
        return np.full(cfg.num_tasks, 1.0 / cfg.num_tasks)
    w = 1.0 / np.arange(1, cfg.num_tasks + 1) ** cfg.zipf_s
    return w / w.sum()


def generate_workload(cfg: WorkloadConfig) -> tuple[list[TaskSpec], list[RequestSpec]]:
    """Tasks and requests (sorted by arrival) for `cfg`; deterministic in `cfg.seed`."""
    rng = np.random.default_rng(cfg.seed)
    tasks = make_tasks(cfg, rng)
    times = arrival_times(cfg, rng)
    which = rng.choice(cfg.num_tasks, size=cfg.num_requests, p=task_probabilities(cfg))
    z_in, z_out, z_pred = rng.standard_normal((3, cfg.num_requests))
    requests = []
    for i in range(cfg.num_requests):
        t = tasks[which[i]]
        p = int(np.clip(round(cfg.prompt_scale * t.prompt_median * np.exp(t.profile.prompt_sigma * z_in[i])), 1,
                        cfg.max_prompt_tokens))
        sigma_out = cfg.output_sigma_scale * t.profile.output_sigma
        o = int(np.clip(round(t.output_median * np.exp(sigma_out * z_out[i])), 1, cfg.max_output_tokens))
        requests.append(
            RequestSpec(f"r{i:06d}", t.name, float(times[i]), p, o, cfg.max_output_tokens, _prediction(cfg, t, o, z_pred[i]))
        )
    return tasks, requests


def _prediction(cfg: WorkloadConfig, task: TaskSpec, true_len: int, z: float) -> float | None:
    if cfg.prediction == "oracle":
        return float(true_len)
    if cfg.prediction == "noisy":
        return float(true_len * np.exp(cfg.prediction_sigma * z))
    if cfg.prediction == "task_median":
        return float(task.output_median)
    return None
