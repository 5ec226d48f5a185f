"""Autoscaling of the engine replicas on CPU (issue #18): the real app (local Ray, the embedded
registry, SmolLM2 + the 4 demo adapters) with `autoscaling: {min_replicas: 1, max_replicas: 2}`
is idle, then serves closed-loop clients that keep more requests in flight than the per-replica
target, then is idle again. Ray Serve's autoscaler (driven by ongoing requests: queued at the
router plus running on a replica) should add the second replica under load and remove it after.

Recorded every 0.5 s from `serve.status()`: engine replicas RUNNING and in any other state
(starting, stopping); per request: status and latency. Reported: seconds from the start of the
load to the second replica RUNNING, seconds from the end of the load back to one, requests
sent / ok / failed per phase, latency mean and p99 per phase.

    python load_tests/autoscaling.py                    # ~3 min on 2 cores
    python load_tests/autoscaling.py --load-s 60 --clients 6
Writes load_tests/results/autoscaling_cpu.json and autoscaling_cpu.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from inlaid_ray.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results"
API_KEY, ADMIN_KEY = "autoscale-user-key", "autoscale-admin-key"
APP, DEPLOYMENT = "inlaid", "EngineReplica"
TASKS = ("sentiment", "email", "extract", "rewrite")


def start_app(work: Path, autoscaling: dict[str, Any]) -> str:
    from inlaid_ray.config import Settings
    from inlaid_ray.demo.manifest import DEMO_MANIFEST
    from inlaid_ray.model.prepare import prepare_smollm2
    from inlaid_ray.serve.app import AppArgs
    from inlaid_ray.serve.launcher import free_port, run_serve

    settings = dataclasses.replace(Settings.from_env(), api_key=API_KEY, admin_key=ADMIN_KEY, redis_url=None)
    args = AppArgs.model_validate(dict(
        model_dir=str(prepare_smollm2(settings.cache_dir)), data_dir=str(work / "registry"), namespace="autoscaling",
        api_key=API_KEY, admin_key=ADMIN_KEY, seed_manifest=str(DEMO_MANIFEST), autoscaling=autoscaling,
        num_cpus_per_replica=1, torch_threads=1, dtype="float32", device="cpu", max_model_len=512,
        max_num_batched_tokens=1024, max_num_seqs=16, num_kv_blocks=256, max_clusters_per_replica=2,
        max_adapters_per_replica=4, predictor="task_quantile"))
    return run_serve(args, host="127.0.0.1", port=free_port(), blocking=False, settings=settings,
                     ray_init_kwargs=dict(num_cpus=2, include_dashboard=False, log_to_driver=False))


def replica_counts() -> tuple[int, int]:
    """(engine replicas RUNNING, engine replicas in any other state) from Serve's public status."""
    from ray import serve

    states = serve.status().applications[APP].deployments[DEPLOYMENT].replica_states
    running = int(states.get("RUNNING", 0))
    return running, int(sum(states.values())) - running


class Sampler(threading.Thread):
    """Samples the replica counts every `period_s` until stopped."""

    def __init__(self, t0: float, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.t0, self.period_s = t0, period_s
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            running, other = replica_counts()
            self.samples.append({"t": round(time.monotonic() - self.t0, 2), "running": running, "other": other})
            self._stop_event.wait(self.period_s)

    def latest(self) -> dict[str, float]:
        return self.samples[-1] if self.samples else {"t": 0.0, "running": 0, "other": 0}

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


async def closed_loop(url: str, clients: int, until: float, max_tokens: int, t0: float,
                      tick: Any) -> list[dict[str, Any]]:
    """`clients` loops each sending one greedy completion after another until `until` (monotonic);
    `tick()` is called every 0.5 s meanwhile (the progress bar)."""
    records: list[dict[str, Any]] = []

    async def ticker() -> None:
        while time.monotonic() < until:
            tick()
            await asyncio.sleep(0.5)

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            n = 0
            while time.monotonic() < until:
                task = TASKS[(i + n) % len(TASKS)]
                start = time.monotonic()
                body = {"model": task, "prompt": f"Request {i}-{n}: write a long answer.", "max_tokens": max_tokens,
                        "ignore_eos": True, "temperature": 0}
                try:
                    status = (await http.post("/v1/completions", json=body)).status_code
                except httpx.HTTPError:
                    status = 0
                records.append({"sent_s": round(start - t0, 2), "latency_s": round(time.monotonic() - start, 3),
                                "status": status})
                n += 1

    await asyncio.gather(ticker(), *(client(i) for i in range(clients)))
    return records


def show(sampler: Sampler, bar: Progress) -> None:
    """Advance the bar by one 0.5 s tick, with the replica counts."""
    s = sampler.latest()
    bar.set_postfix(replicas=f"{s['running']} running, {s['other']} starting/stopping")
    bar.update(0.5)


def wait_for(sampler: Sampler, running: int, timeout_s: float, bar: Progress) -> float | None:
    """Seconds until exactly `running` replicas run and none is starting or stopping (None: timed out)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        show(sampler, bar)
        s = sampler.latest()
        if s["running"] == running and s["other"] == 0:
            return round(time.monotonic() - start, 1)
        time.sleep(0.5)
    return None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(r["latency_s"] for r in records if r["status"] == 200)
    return {
        "sent": len(records),
        "ok": sum(r["status"] == 200 for r in records),
        "failed": sum(r["status"] != 200 for r in records),
        "latency_mean_s": round(statistics.fmean(lat), 3) if lat else None,
        "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step([s["t"] for s in samples], [s["running"] for s in samples], where="post", label="engine replicas RUNNING")
    ax.step([s["t"] for s in samples], [s["other"] for s in samples], where="post", label="starting / stopping",
            linestyle="--")
    load = result["phases"]["load"]
    ax.axvspan(load["start_s"], load["end_s"], alpha=0.15, color="tab:orange",
               label=f"load: {result['config']['clients']} closed-loop clients")
    ax.set_xlabel("seconds")
    ax.set_ylabel("replicas")
    ax.set_yticks(range(0, result["config"]["autoscaling"]["max_replicas"] + 2))
    up, down = result["scale_up_s"], result["scale_down_s"]
    ax.set_title(f"Serve autoscaling on CPU: second replica {up} s after the load began, "
                 f"back to one {down} s after it ended", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6, help="closed-loop clients during the load")
    parser.add_argument("--load-s", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--target", type=float, default=2.0, help="target ongoing requests per replica")
    parser.add_argument("--downscale-delay-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    a = parser.parse_args()
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": a.target,
                   "upscale_delay_s": 2.0, "downscale_delay_s": a.downscale_delay_s}
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="inlaid-autoscaling-") as work:
        url = start_app(Path(work), autoscaling)
        t0 = time.monotonic()
        sampler = Sampler(t0)
        sampler.start()
        try:
            with Progress(desc="autoscaling", unit="s", total=None) as bar:
                bar.set_description("idle, waiting for one replica")
                settle_s = wait_for(sampler, 1, 120, bar)
                load_start = time.monotonic()
                bar.set_description(f"load: {a.clients} clients")
                records = asyncio.run(closed_loop(url, a.clients, load_start + a.load_s, a.max_tokens, t0,
                                                  lambda: show(sampler, bar)))
                load_end = time.monotonic()
                up = next((s["t"] - (load_start - t0) for s in sampler.samples
                           if s["t"] >= load_start - t0 and s["running"] >= 2), None)
                bar.set_description("idle, waiting for one replica")
                down = wait_for(sampler, 1, 240, bar)
        finally:
            sampler.stop()
            serve.shutdown()
            ray.shutdown()
    result = {
        "config": {"clients": a.clients, "load_s": a.load_s, "max_tokens": a.max_tokens, "autoscaling": autoscaling,
                   "machine": {"cpus": 2, "platform": platform.platform()}},
        "settle_s": settle_s,
        "scale_up_s": None if up is None else round(up, 1),
        "scale_down_s": down,
        "phases": {"load": {"start_s": round(load_start - t0, 1), "end_s": round(load_end - t0, 1)}},
        "requests": summarize(records),
        "requests_while_one_replica": summarize([r for r in records if up is None or r["sent_s"] < load_start - t0 + up]),
        "requests_after_scale_up": summarize([r for r in records if up is not None and r["sent_s"] >= load_start - t0 + up]),
        "max_replicas_running": max(s["running"] for s in sampler.samples),
        "samples": sampler.samples,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "autoscaling_cpu.json").write_text(json.dumps(result, indent=1))
    plot(result, a.out / "autoscaling_cpu.png")
    req = result["requests"]
    print(f"second replica running {result['scale_up_s']} s after the load began; back to one {down} s after it ended; "
          f"requests {req['sent']} sent, {req['failed']} failed; latency mean {req['latency_mean_s']} s, "
          f"p99 {req['latency_p99_s']} s")
    print(f"wrote {a.out / 'autoscaling_cpu.json'} and {a.out / 'autoscaling_cpu.png'}")


if __name__ == "__main__":
    main()
