"""The control plane at scale (issue #18): what the HTTP path adds to a request, and what the
listings cost, with 10 and with 10,000 registered tasks.

The real app on CPU (local Ray, the embedded registry, SmolLM2 + the 4 demo adapters, one engine
replica) for each length predictor. Synthetic live tasks of the demo tenant are registered through
the registry API (each a copy of the sentiment adapter's record, 16 per cluster) until 10, then
10,000 tasks exist; the router learns of them from registry events, as of any onboarding. Requests
go to the 4 demo tasks only, so the engine's work is the same at both scales.

Per scale: `--requests` sequential greedy 1-token completions after a warm-up (enough finished
requests per task for the learned predictor to be in use). Each answer's `Server-Timing` header
splits the router's time into tokenization, length prediction, the engine's time and the rest
(the Ray handle hop to the replica and back, routing, the response); the client's time less the
router's is HTTP and Serve's proxy. "hop" = client time - engine time: what the control plane adds.
Also: GET /v1/models (user key), GET /v1/models/{id}, GET /v1/admin/tasks (admin key); the
registry's memory (Redis `used_memory`), the router process's RSS; registration rate and the
time until the router lists every task. At the first scale, `--clients` concurrent clients then
send `--concurrent-requests` more: requests per second and the parts' p50/p99 under concurrency,
where a blocking predictor queues; "minilm@1" is minilm predicting one request per call (the
router before PredictionBatcher), the baseline of "minilm" (up to 16 per call).

    python load_tests/control_plane.py                       # ~10 min on 2 cores
    python load_tests/control_plane.py --predictors task_quantile --requests 100
Writes load_tests/results/control_plane_cpu.json and control_plane_cpu.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from inlaid_ray.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results"
API_KEY, ADMIN_KEY = "control-plane-user-key", "control-plane-admin-key"
APP, NAMESPACE = "inlaid", "control-plane"
DEMO_TASKS = ("sentiment", "email", "extract", "rewrite")
TASKS_PER_CLUSTER = 16
PARTS = ("http_proxy", "tokenize", "predict", "router_other", "engine")  # a request's time, in order


def start_app(work: Path, predictor: str, max_batch: int) -> str:
    from inlaid_ray.config import Settings
    from inlaid_ray.demo.manifest import DEMO_MANIFEST
    from inlaid_ray.model.prepare import prepare_smollm2
    from inlaid_ray.serve.app import AppArgs
    from inlaid_ray.serve.launcher import free_port, run_serve

    settings = dataclasses.replace(Settings.from_env(), api_key=API_KEY, admin_key=ADMIN_KEY, redis_url=None)
    args = AppArgs.model_validate(dict(
        model_dir=str(prepare_smollm2(settings.cache_dir)), data_dir=str(work / "registry"), namespace=NAMESPACE,
        api_key=API_KEY, admin_key=ADMIN_KEY, seed_manifest=str(DEMO_MANIFEST), num_replicas=1,
        num_cpus_per_replica=1, torch_threads=1, dtype="float32", device="cpu", max_model_len=512,
        max_num_batched_tokens=1024, max_num_seqs=16, num_kv_blocks=256, predictor=predictor,
        predictor_max_batch=max_batch))
    return run_serve(args, host="127.0.0.1", port=free_port(), blocking=False, settings=settings,
                     ray_init_kwargs=dict(num_cpus=2, include_dashboard=False, log_to_driver=False))


class SyntheticTasks:
    """Registers live copies of a demo task's record, TASKS_PER_CLUSTER to a cluster."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.template = registry.require_task("sentiment")
        self.count = 0

    def add_until(self, total_tasks: int, bar: Progress) -> float:
        """Register synthetic tasks until `total_tasks` tasks exist; seconds it took."""
        from inlaid_ray.registry.records import ClusterRecord

        start = time.perf_counter()
        todo = total_tasks - len(DEMO_TASKS) - self.count
        bar.reset(total=todo)
        while todo > 0:
            cluster = f"syn-c{self.count // TASKS_PER_CLUSTER:05d}"
            batch = min(todo, TASKS_PER_CLUSTER - self.count % TASKS_PER_CLUSTER)
            names = [f"syn-{self.count + i:05d}" for i in range(batch)]
            for name in names:
                self.registry.upsert_task(dataclasses.replace(self.template, name=name, cluster=cluster,
                                                              status="live", extra={}))
            old = self.registry.get_cluster(cluster)
            self.registry.upsert_cluster(ClusterRecord(cluster, members=(old.members if old else ()) + tuple(names)))
            self.count += batch
            todo -= batch
            bar.update(batch)
        return time.perf_counter() - start


def wait_listed(http: httpx.Client, total_tasks: int, timeout_s: float = 600.0) -> float:
    """Seconds until GET /v1/models lists the base and `total_tasks` tasks."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if len(http.get("/v1/models").json()["data"]) == total_tasks + 1:
            return time.perf_counter() - start
        time.sleep(0.2)
    raise TimeoutError(f"the router did not list {total_tasks} tasks within {timeout_s} s")


def completion(http: httpx.Client, task: str, i: int) -> dict[str, float]:
    """One greedy 1-token completion: the client's time and the Server-Timing parts, in ms."""
    body = {"model": task, "prompt": f"Request {i}: answer in one word.", "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    response = http.post("/v1/completions", json=body)
    client_ms = (time.perf_counter() - started) * 1e3
    response.raise_for_status()
    timing = {k: float(v) for k, v in (p.split(";dur=") for p in response.headers["server-timing"].split(", "))}
    return {
        "client": client_ms, "hop": client_ms - timing["engine"], "http_proxy": client_ms - timing["router"],
        "tokenize": timing["tokenize"], "predict": timing["predict"], "engine": timing["engine"],
        "router_other": timing["router"] - timing["tokenize"] - timing["predict"] - timing["engine"],
    }


def timed_gets(http: httpx.Client, path: str, n: int, headers: dict[str, str] | None = None) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        http.get(path, headers=headers).raise_for_status()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def stats_ms(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 2), "p50": round(float(np.percentile(v, 50)), 2),
            "p90": round(float(np.percentile(v, 90)), 2), "p99": round(float(np.percentile(v, 99)), 2),
            "max": round(float(v.max()), 2)}


def router_rss_mb() -> float:
    """RSS of the router's Ray worker (its process title names the deployment)."""
    import psutil

    title = f"ServeReplica:{APP}:Router"
    procs = [p for p in psutil.process_iter(["cmdline"]) if any(title in part for part in p.info["cmdline"] or ())]
    return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)


def measure(http: httpx.Client, registry: Any, requests: int, bar: Progress) -> dict[str, Any]:
    bar.reset(total=requests)
    samples = []
    for i in range(requests):
        samples.append(completion(http, DEMO_TASKS[i % len(DEMO_TASKS)], i))
        bar.update()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return {
        "requests": requests,
        "ms": {part: stats_ms([s[part] for s in samples]) for part in ("client", "hop", *PARTS)},
        "list_models_ms": stats_ms(timed_gets(http, "/v1/models", 20)),
        "retrieve_model_ms": stats_ms(timed_gets(http, "/v1/models/sentiment", 20)),
        "admin_list_tasks_ms": stats_ms(timed_gets(http, "/v1/admin/tasks", 5, admin)),
        "registry_used_memory_mb": round(registry.client.info("memory")["used_memory"] / 2**20, 2),
        "router_rss_mb": router_rss_mb(),
    }


async def concurrent(url: str, clients: int, requests: int) -> dict[str, Any]:
    """`clients` closed-loop clients sending `requests` 1-token completions in all."""
    import asyncio

    samples: list[dict[str, float]] = []
    counter = iter(range(requests))

    def one(http: httpx.Client, i: int) -> dict[str, float]:
        return completion(http, DEMO_TASKS[i % len(DEMO_TASKS)], 10_000 + i)

    async def client() -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            for i in counter:
                samples.append(await asyncio.to_thread(one, http, i))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "requests_per_s": round(requests / wall, 2),
            "ms": {part: stats_ms([x[part] for x in samples]) for part in ("client", "hop", *PARTS)}}


def run_predictor(label: str, scales: list[int], requests: int, warmup: int, clients: int,
                  concurrent_requests: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from inlaid_ray.registry.embedded import connect_redis
    from inlaid_ray.registry.store import TaskRegistry

    predictor, _, batch = label.partition("@")
    with tempfile.TemporaryDirectory(prefix="inlaid-control-plane-") as work:
        url = start_app(Path(work), predictor, int(batch or 16))
        client = connect_redis(None, Path(work) / "registry")
        try:
            registry = TaskRegistry(client, NAMESPACE)
            synthetic = SyntheticTasks(registry)
            out: dict[str, Any] = {"scales": {}}
            with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as http, \
                    Progress(desc=label, unit="req", total=warmup) as bar:
                bar.set_description(f"{label}: warm-up")
                for i in range(warmup):
                    completion(http, DEMO_TASKS[i % len(DEMO_TASKS)], -i)
                    bar.update()
                for total in scales:
                    bar.set_description(f"{label}: registering {total} tasks")
                    register_s = synthetic.add_until(total, bar)
                    listed_s = wait_listed(http, total)
                    bar.set_description(f"{label}: {total} tasks")
                    result = measure(http, registry, requests, bar)
                    if total == scales[0] and clients > 0:
                        bar.set_description(f"{label}: {clients} concurrent clients")
                        import asyncio

                        result["concurrent"] = asyncio.run(concurrent(url, clients, concurrent_requests))
                    added = total - len(DEMO_TASKS) - sum(s["synthetic_added"] for s in out["scales"].values())
                    result |= {"synthetic_added": added, "register_s": round(register_s, 2),
                               "registered_per_s": round(added / register_s, 1) if added else None,
                               "router_listed_all_after_s": round(listed_s, 2)}
                    out["scales"][str(total)] = result
            return out
        finally:
            client.close()
            serve.shutdown()
            ray.shutdown()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(p, s, r) for p, runs in result["predictors"].items() for s, r in runs["scales"].items()]
    labels = [f"{p}\n{int(s):,} tasks" for p, s, _ in rows]
    concurrent = {p: runs["scales"][min(runs["scales"], key=int)].get("concurrent")
                  for p, runs in result["predictors"].items()}
    concurrent = {p: c for p, c in concurrent.items() if c}
    fig, axes = plt.subplots(1, 3 if concurrent else 2, figsize=(19 if concurrent else 13, 4.5))
    ax, bx = axes[0], axes[1]
    bottom = np.zeros(len(rows))
    for part in PARTS:
        values = np.array([max(r["ms"][part]["p50"], 0.0) for _, _, r in rows])
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom += values
    for x, (_, _, r) in enumerate(rows):
        ax.text(x, bottom[x], f"hop p50 {r['ms']['hop']['p50']:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms (p50 of each part)")
    ax.set_title("A 1-token completion, sequential: where the time goes", fontsize=10)
    ax.legend(fontsize=8)
    width = 0.25
    for k, key in enumerate(("list_models_ms", "retrieve_model_ms", "admin_list_tasks_ms")):
        bx.bar(np.arange(len(rows)) + (k - 1) * width, [r[key]["p50"] for _, _, r in rows], width,
               label=key.removesuffix("_ms").replace("_", " "))
    bx.axhline(100, color="grey", linestyle="--", linewidth=1, label="100 ms goal")
    bx.set_xticks(np.arange(len(rows)), labels)
    bx.set_ylabel("ms (p50)")
    bx.set_title("Listings", fontsize=10)
    bx.legend(fontsize=8)
    if concurrent:
        cx = axes[2]
        names = list(concurrent)
        x = np.arange(len(names))
        cx.bar(x - 0.2, [concurrent[n]["ms"]["predict"]["p50"] for n in names], 0.4, label="predict p50")
        cx.bar(x + 0.2, [concurrent[n]["ms"]["predict"]["p99"] for n in names], 0.4, label="predict p99")
        for i, n in enumerate(names):
            cx.text(i, concurrent[n]["ms"]["predict"]["p99"], f"{concurrent[n]['requests_per_s']} req/s",
                    ha="center", va="bottom", fontsize=8)
        cx.set_xticks(x, names)
        cx.set_ylabel("ms")
        c0 = next(iter(concurrent.values()))
        cx.set_title(f"{c0['clients']} concurrent clients: length prediction, with queueing", fontsize=10)
        cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictors", default="task_quantile,minilm,minilm@1",
                        help="comma-separated length predictors, NAME or NAME@MAX_BATCH")
    parser.add_argument("--scales", default="10,10000", help="comma-separated registered task counts")
    parser.add_argument("--requests", type=int, default=200, help="sequential 1-token completions per scale")
    parser.add_argument("--warmup", type=int, default=48, help="requests before the first scale (>= 8 per task "
                        "for the learned predictor to be in use)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients at the first scale (0: none)")
    parser.add_argument("--concurrent-requests", type=int, default=96)
    parser.add_argument("--out", type=Path, default=RESULTS)
    a = parser.parse_args()
    scales = sorted(int(s) for s in a.scales.split(","))
    if scales[0] < len(DEMO_TASKS):
        parser.error(f"--scales: each must be at least the {len(DEMO_TASKS)} demo tasks")
    result = {
        "config": {"scales": scales, "requests": a.requests, "warmup": a.warmup, "tasks_per_cluster": TASKS_PER_CLUSTER,
                   "concurrent_clients": a.clients, "concurrent_requests": a.concurrent_requests,
                   "engine_replicas": 1, "machine": {"cpus": 2, "platform": platform.platform()}},
        "predictors": {p: run_predictor(p, scales, a.requests, a.warmup, a.clients, a.concurrent_requests)
                       for p in a.predictors.split(",")},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "control_plane_cpu.json").write_text(json.dumps(result, indent=1))
    plot(result, a.out / "control_plane_cpu.png")
    for p, runs in result["predictors"].items():
        for s, r in runs["scales"].items():
            ms = r["ms"]
            print(f"{p:14s} {int(s):6d} tasks: hop p50 {ms['hop']['p50']:.1f} / p99 {ms['hop']['p99']:.1f} ms "
                  f"(http+proxy {ms['http_proxy']['p50']:.1f}, tokenize {ms['tokenize']['p50']:.1f}, predict "
                  f"{ms['predict']['p50']:.1f}, router other {ms['router_other']['p50']:.1f}); engine "
                  f"{ms['engine']['p50']:.1f} ms; /v1/models p50 {r['list_models_ms']['p50']:.1f} ms, admin tasks "
                  f"{r['admin_list_tasks_ms']['p50']:.1f} ms; registry {r['registry_used_memory_mb']} MB, router RSS "
                  f"{r['router_rss_mb']} MB")
        c = runs["scales"][str(scales[0])].get("concurrent")
        if c:
            print(f"{p:14s} {c['clients']} clients: {c['requests_per_s']} req/s; predict p50 {c['ms']['predict']['p50']:.1f} "
                  f"/ p99 {c['ms']['predict']['p99']:.1f} ms, hop p50 {c['ms']['hop']['p50']:.1f} ms")
    print(f"wrote {a.out / 'control_plane_cpu.json'} and {a.out / 'control_plane_cpu.png'}")


if __name__ == "__main__":
    main()
