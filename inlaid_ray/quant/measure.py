"""Wall time and peak memory of named phases of a quantization run (LoRA-Inlaid Table 4 columns:
Forward + Hessian, Aggregation + Quantization, total, peak memory).

Host memory: torch allocates tensors outside Python's allocator, so `tracemalloc` does not see
them; the resident set size (`/proc/self/statm`) is sampled by a background thread instead and
the peak above the phase's starting RSS is reported (`resource.getrusage` only gives the
process-lifetime peak, which cannot be reset between phases; it is reported as well). On CUDA,
`torch.cuda.max_memory_allocated` is reset at each phase start.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


class ResourceMeter:
    """Collects `{phase: {seconds, peak_rss_mb, rss_growth_mb, cuda_peak_mb}}` for `with meter.phase(name)`."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.phases: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            cuda_start = torch.cuda.memory_allocated(self.device)
        start_rss = rss_bytes()
        sampler = _RssSampler(self.interval_s)
        sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            peak = sampler.stop()
            entry = self.phases.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0, "rss_growth_mb": 0.0})
            entry["seconds"] += seconds
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], peak / 2**20)
            entry["rss_growth_mb"] = max(entry["rss_growth_mb"], (peak - start_rss) / 2**20)
            if cuda:
                entry["cuda_peak_mb"] = max(entry.get("cuda_peak_mb", 0.0),
                                            torch.cuda.max_memory_allocated(self.device) / 2**20)
                entry["cuda_growth_mb"] = max(entry.get("cuda_growth_mb", 0.0),
                                              (torch.cuda.max_memory_allocated(self.device) - cuda_start) / 2**20)

    def summary(self) -> dict[str, Any]:
        """Per-phase numbers plus totals: seconds summed, peaks maxed, and the lifetime ru_maxrss."""
        total: dict[str, Any] = {
            "seconds": sum(p["seconds"] for p in self.phases.values()),
            "peak_rss_mb": max((p["peak_rss_mb"] for p in self.phases.values()), default=0.0),
            "rss_growth_mb": max((p["rss_growth_mb"] for p in self.phases.values()), default=0.0),
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        cuda = [p["cuda_peak_mb"] for p in self.phases.values() if "cuda_peak_mb" in p]
        if cuda:
            total["cuda_peak_mb"] = max(cuda)
        return {"phases": {k: dict(v) for k, v in self.phases.items()}, "total": total}
