"""Pure parts of the HTTP load driver (inlaid_ray.demo.load_driver): which server variants a run covers, the
engine-side statistics of a run (replica stats samples, Prometheus histogram deltas), the
result table over (variant, rate), the inlaid-vs-baseline ratios, and the PNG plots.

No Ray, no HTTP here, so tests check the aggregation on a fake result set.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

POLICIES = ("fifo", "mlfq", "srtf-cost")
QUEUE_TIME_METRIC = "inlaid_request_queue_time_seconds"


@dataclass(frozen=True)
class Variant:
    """One server configuration: scheduling policy, 4-bit base or not, compressed adapters or not."""

    policy: str
    quantized: bool = False
    compressed: bool = False

    @property
    def name(self) -> str:
        return self.policy + ("+q4" if self.quantized else "") + ("+jd" if self.compressed else "")


def expand_variants(policies: Sequence[str], quantization: Sequence[bool], compression: Sequence[bool]) -> list[Variant]:
    """Every combination, grouped by (quantized, compressed) so policies of one group run back to back."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies or not quantization or not compression:
        raise ValueError(f"policies {list(policies)} must be non-empty and within {POLICIES}; "
                         f"quantization {list(quantization)} and compression {list(compression)} non-empty")
    return [Variant(p, q, c) for q, c in itertools.product(dict.fromkeys(quantization), dict.fromkeys(compression))
            for p in dict.fromkeys(policies)]


# ------------------------------------------------------------------------------ engine side


def summarize_engine_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Replica stats polled during a run: distinct adapters (tasks) per engine step, averaged over
    the samples taken while the replica had requests running, plus queue depth and KV use."""
    busy = [s for s in samples if s.get("running", 0) > 0]
    tasks = np.array([s.get("distinct_adapters_last_step", 0) for s in busy], dtype=np.float64)
    waiting = np.array([s.get("waiting", 0) for s in samples], dtype=np.float64)
    return {
        "num_samples": len(samples),
        "busy_samples": len(busy),
        "tasks_per_step_mean": float(tasks.mean()) if len(tasks) else None,
        "tasks_per_step_max": int(tasks.max()) if len(tasks) else None,
        "tasks_per_step_hist": {str(k): int((tasks == k).sum()) for k in sorted(set(tasks.astype(int).tolist()))},
        "running_mean": float(np.mean([s.get("running", 0) for s in busy])) if busy else None,
        "waiting_mean": float(waiting.mean()) if len(waiting) else None,
        "waiting_max": int(waiting.max()) if len(waiting) else None,
        "kv_usage_max": max((float(s.get("kv_usage", 0.0)) for s in samples), default=None),
    }


def histogram_totals(exposition: str, name: str = QUEUE_TIME_METRIC) -> dict[str, tuple[float, float]]:
    """{task: (sum, count)} of a Prometheus histogram with a `task` label, from /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(exposition):
        if fam.name != name:
            continue
        for s in fam.samples:
            task = s.labels.get("task", "")
            if s.name == f"{name}_sum":
                out.setdefault(task, [0.0, 0.0])[0] = s.value
            elif s.name == f"{name}_count":
                out.setdefault(task, [0.0, 0.0])[1] = s.value
    return {t: (v[0], v[1]) for t, v in out.items()}


def histogram_delta(before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Mean of the observations made between two scrapes, per task and over all tasks."""
    per_task = {}
    total_sum = total_n = 0.0
    for task, (s1, n1) in sorted(after.items()):
        s0, n0 = before.get(task, (0.0, 0.0))
        ds, dn = s1 - s0, n1 - n0
        if dn > 0:
            per_task[task] = {"count": int(dn), "mean_s": ds / dn}
            total_sum, total_n = total_sum + ds, total_n + dn
    return {"count": int(total_n), "mean_s": total_sum / total_n if total_n else None, "by_task": per_task}


# ------------------------------------------------------------------------------ table


ROW_FIELDS = {  # table column -> key of load_stats.summarize
    "num_requests": "num_requests",
    "num_ok": "num_ok",
    "throughput_tokens_per_s": "throughput_tokens_per_s",
    "throughput_req_per_s": "throughput_req_per_s",
    "latency_mean_s": "e2e_latency_mean_s",
    "latency_p99_s": "e2e_latency_p99_s",
    "jct_mean_s": "jct_mean_s",
    "ttft_mean_s": "ttft_mean_s",
    "ttft_p99_s": "ttft_p99_s",
    "norm_latency_mean_s": "norm_latency_per_token_mean_s",
    "slo_attainment": "slo_attainment",
}


def result_rows(variants: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (variant, rate) of the runnable variants, from each run's summaries."""
    rows = []
    for v in variants:
        if v.get("status") != "ok":
            continue
        for run in v["runs"]:
            s, eng = run["summary"], run.get("engine") or {}
            row = {"variant": v["name"], "policy": v["policy"], "quantized": v["quantized"],
                   "compressed": v["compressed"], "rate": run["rate"]}
            row.update({col: s.get(key) for col, key in ROW_FIELDS.items()})
            row["tasks_per_step_mean"] = eng.get("tasks_per_step_mean")
            row["queue_time_mean_s"] = (run.get("queue_time") or {}).get("mean_s")
            rows.append(row)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def policy_comparison(rows: Sequence[Mapping[str, Any]], target: str = "srtf-cost") -> list[dict[str, Any]]:
    """Per (quantized, compressed, rate): `target`'s mean JCT, p99 latency and SLO attainment
    over each other policy's (JCT/p99 < 1 and SLO > 1 mean `target` is better)."""
    index = {(r["policy"], r["quantized"], r["compressed"], r["rate"]): r for r in rows}
    out = []
    for (policy, q, c, rate), r in sorted(index.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], kv[0][0])):
        if policy != target:
            continue
        for base in POLICIES:
            b = index.get((base, q, c, rate))
            if base == target or b is None:
                continue
            out.append({"quantized": q, "compressed": c, "rate": rate, "baseline": base,
                        "jct_ratio": _ratio(r["jct_mean_s"], b["jct_mean_s"]),
                        "latency_p99_ratio": _ratio(r["latency_p99_s"], b["latency_p99_s"]),
                        "slo_attainment_ratio": _ratio(r["slo_attainment"], b["slo_attainment"]),
                        "slo_attainment": r["slo_attainment"], "baseline_slo_attainment": b["slo_attainment"]})
    return out


# ------------------------------------------------------------------------------ plots

PANELS = (
    ("throughput_tokens_per_s", "throughput (output tokens/s)"),
    ("latency_mean_s", "mean latency = mean JCT (s)"),
    ("latency_p99_s", "p99 latency (s)"),
    ("ttft_mean_s", "mean TTFT (s)"),
    ("slo_attainment", "SLO attainment"),
    ("tasks_per_step_mean", "tasks (adapters) per engine step"),
)
_COLORS = {"fifo": "tab:blue", "mlfq": "tab:orange", "srtf-cost": "tab:green", "srtf-fifo-bound": "tab:red"}


def plot_rows(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """2x3 panels of the PANELS metrics vs request rate, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for ax, (key, label) in zip(axes.flat, PANELS):
        for name in variants:
            pts = sorted((r["rate"], r[key]) for r in rows if r["variant"] == name and r.get(key) is not None
                         and not (isinstance(r[key], float) and math.isnan(r[key])))
            if not pts:
                continue
            first = next(r for r in rows if r["variant"] == name)
            style = dict(color=_COLORS.get(first["policy"], "tab:gray"),
                         linestyle="--" if first["quantized"] else "-",
                         marker="s" if first["quantized"] else "o")
            if first["compressed"]:
                style["linestyle"] = ":"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "slo_attainment":
            ax.set_ylim(-0.05, 1.05)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
