"""Per-request records of a load run and their summary statistics, shared by the HTTP load
generator (bench/loadgen.py) and the engine-level GPU benchmark (load_tests/bench_engine_gpu.py);
the simulator's metrics (bench/sim_metrics.py) use the same latency statistics and SLO rule.
Pure Python + numpy.

Definitions (times in seconds on the run's clock, relative to its start):
- a request is *ok* when it got a complete response (HTTP 200 and `data: [DONE]`, or the
  engine finished it); everything else (HTTP error, error event, timeout, cancelled) is failed;
- TTFT = first token time - start; e2e latency = JCT = end - start (start = when the request
  was sent / arrived); inter-token latency (ITL) = gap between successive token events;
- throughput = output tokens (requests) of ok requests / (last end - first start);
- SLO attainment = fraction of ALL requests that are ok with e2e <= their task's SLO (a failed
  request misses its SLO); `slo_attainment_at[k]` uses k x the SLO;
- percentiles use numpy's linear interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SLO_SCALES = (0.5, 1.0, 2.0)


@dataclass
class RequestRecord:
    """What happened to one request (filled in as it runs)."""

    index: int
    task: str
    scheduled_s: float  # planned arrival
    start_s: float | None = None  # actually sent (HTTP) / arrived (engine)
    first_token_s: float | None = None
    end_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one entry per token event (SSE chunk with text)
    num_prompt_tokens: int | None = None
    num_output_tokens: int = 0  # usage.completion_tokens when reported, else the token events
    status: str = "pending"  # ok | http_<code> | error | timeout | cancelled | pending
    error: str | None = None
    finish_reason: str | None = None
    slo_s: float | None = None  # e2e latency objective of this request's task
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_s is None or self.start_s is None:
            return None
        return self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        if self.end_s is None or self.start_s is None:
            return None
        return self.end_s - self.start_s

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t[:-1], t[1:])]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ttft_s=self.ttft_s, e2e_s=self.e2e_s)
        return d


def latency_stats(values: Sequence[float], prefix: str) -> dict[str, float | None]:
    """`{prefix}_mean_s`, `_p50_s`, `_p99_s` of `values` (None when empty): the one definition
    the load runs and the simulator (bench/sim_metrics.py) report."""
    if not len(values):
        return {f"{prefix}_mean_s": None, f"{prefix}_p50_s": None, f"{prefix}_p99_s": None}
    v = np.asarray(values, dtype=np.float64)
    return {
        f"{prefix}_mean_s": float(v.mean()),
        f"{prefix}_p50_s": float(np.percentile(v, 50)),
        f"{prefix}_p99_s": float(np.percentile(v, 99)),
    }


def slo_attainment(e2e_s: Sequence[float | None], slo_s: Sequence[float | None], scale: float = 1.0) -> float | None:
    """Fraction of the requests that have an SLO whose e2e latency is <= scale x it; a failed
    request (e2e None) misses. The one rule of the load runs and the simulator (whose SLO is a
    multiple of each request's isolated latency); None when no request has an SLO."""
    pairs = [(e, s) for e, s in zip(e2e_s, slo_s, strict=True) if s is not None]
    if not pairs:
        return None
    return sum(1 for e, s in pairs if e is not None and e <= scale * s) / len(pairs)


def _attainment(records: Sequence[RequestRecord], scale: float) -> float | None:
    return slo_attainment([r.e2e_s if r.ok else None for r in records], [r.slo_s for r in records], scale)


def summarize(records: Sequence[RequestRecord], slo_scales: Sequence[float] = SLO_SCALES) -> dict[str, Any]:
    """Run-level statistics of `records` (see module docstring); a pure function of them."""
    ok = [r for r in records if r.ok]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    out: dict[str, Any] = {"num_requests": len(records), "num_ok": len(ok), "statuses": dict(sorted(statuses.items()))}
    if ok:
        starts = [r.start_s for r in ok]
        ends = [r.end_s for r in ok]
        span = max(ends) - min(starts)
        tokens = sum(r.num_output_tokens for r in ok)
        out["makespan_s"] = span
        out["output_tokens"] = tokens
        out["throughput_tokens_per_s"] = tokens / span if span > 0 else None
        out["throughput_req_per_s"] = len(ok) / span if span > 0 else None
    else:
        out.update(makespan_s=None, output_tokens=0, throughput_tokens_per_s=None, throughput_req_per_s=None)
    e2e = [r.e2e_s for r in ok]
    out.update(latency_stats(e2e, "e2e_latency"))
    out["jct_mean_s"] = out["e2e_latency_mean_s"]
    out.update(latency_stats([r.ttft_s for r in ok if r.ttft_s is not None], "ttft"))
    out.update(latency_stats([g for r in ok for g in r.itls_s], "itl"))
    out.update(latency_stats([r.e2e_s / r.num_output_tokens for r in ok if r.num_output_tokens > 0], "norm_latency_per_token"))
    sent = [r for r in records if r.start_s is not None]
    out["send_lag_max_s"] = max((r.start_s - r.scheduled_s for r in sent), default=None)
    out["slo_attainment"] = _attainment(records, 1.0)
    out["slo_attainment_at"] = {f"{k:g}x": _attainment(records, k) for k in slo_scales}
    return out


def summarize_by_task(records: Sequence[RequestRecord], slo_scales: Sequence[float] = SLO_SCALES) -> dict[str, Any]:
    """`summarize` of each task's records, keyed by task name (sorted)."""
    tasks = sorted({r.task for r in records})
    return {t: summarize([r for r in records if r.task == t], slo_scales) for t in tasks}
