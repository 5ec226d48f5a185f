"""`inlaid-ray demo`: the whole path on one machine. Prepare SmolLM2, quantize it once for the
four demo tasks (4-bit, shared base), serve it over the OpenAI API (Ray Serve, embedded Redis)
with the demo adapters compressed per cluster (shared U, V and a small Sigma per adapter, built
by the app's registry seeding from the demo manifest: `adapter_format="jd_bank"`), send each task a few eval prompts over
HTTP, score the answers and write a JSON summary.

Each artifact is reused when present, so a second run only serves and sends requests.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from inlaid_ray.config import Settings
from inlaid_ray.demo.data import load_examples
from inlaid_ray.demo.manifest import DEMO_API_KEY, DEMO_MANIFEST
from inlaid_ray.demo.paths import demo_adapter_dir, demo_data_path
from inlaid_ray.demo.tasks import DEMO_TASKS, get_task
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD


@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds and how it serves; paths default under the cache directory."""

    work_dir: Path | None = None
    quant_method: str = DEFAULT_SHARED_METHOD  # load_tests/results/quant_quality.md decides it
    bits: int = 4
    group_size: int = 64  # SmolLM2's 576-wide projections: 128 does not divide them
    num_replicas: int = 2
    policy: str | None = None  # None: the serving default (AppArgs.policy)
    host: str = "127.0.0.1"
    port: int = 8000
    examples_per_task: int = 3
    device: str = "cpu"
    calib_tokens_per_task: int | None = None  # None = the smallest task's whole file (equal budgets)

    @classmethod
    def smoke(cls, **overrides: Any) -> "DemoConfig":
        """The whole path at a fraction of the cost (CI): 256 calibration tokens per task, one
        replica, one request per task, artifacts apart from the full demo's."""
        return cls(**{"calib_tokens_per_task": 256, "num_replicas": 1, "examples_per_task": 1} | overrides)


class _Steps:
    """Prints each step's title and records its wall time (closed by the next step or `done`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, title: str) -> None:
        self.done()
        print(f"\n== {title}", flush=True)
        self._current = (title, time.perf_counter())

    def done(self) -> None:
        if self._current is not None:
            title, t0 = self._current
            self.seconds[title] = round(time.perf_counter() - t0, 1)
            print(f"-- {self.seconds[title]:.0f} s", flush=True)
            self._current = None


def quantize_demo_base(base_dir: Path, out_dir: Path, cfg: DemoConfig) -> Path:
    """Quantize the base once for all demo tasks (per-task statistics kept for later onboarding)."""
    from inlaid_ray.quant.calibration import CalibrationConfig
    from inlaid_ray.quant.incremental import TaskSource, quantize_base
    from inlaid_ray.quant.mlgptq import MLGPTQConfig
    from inlaid_ray.quant.quantizer import QuantGrid
    from inlaid_ray.quant.stats_store import StatsStore

    if (out_dir / "config.json").exists():
        print(f"reusing {out_dir}")
        return out_dir
    sources = [TaskSource(t, demo_adapter_dir(t), demo_data_path(t, "calib")) for t in DEMO_TASKS]
    mlgptq = MLGPTQConfig(method=cfg.quant_method, grid=QuantGrid(bits=cfg.bits, group_size=cfg.group_size),
                          device=cfg.device)
    calib = CalibrationConfig(tokens_per_task=cfg.calib_tokens_per_task)
    stats_dir = out_dir.parent / "task-stats"
    StatsStore.set_aside_if_older(stats_dir)  # a demo run of an older version left it: start again
    report = quantize_base(base_dir, sources, out_dir, mlgptq, calib, stats_dir=stats_dir)
    print(f"{cfg.quant_method} {cfg.bits}-bit g{cfg.group_size} for {report['tasks']}: "
          f"{report['resources']['total']['seconds']:.0f} s -> {out_dir}")
    return out_dir


def send_demo_requests(url: str, api_key: str, examples_per_task: int) -> dict[str, Any]:
    """Each demo task answers `examples_per_task` eval prompts over HTTP; returns scored results."""
    headers = {"Authorization": f"Bearer {api_key}"}
    results: dict[str, Any] = {}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        for name in DEMO_TASKS:
            task = get_task(name)
            rows = []
            for example in load_examples(name, "eval")[:examples_per_task]:
                start = time.perf_counter()
                response = client.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": example["prompt"]}],
                    "max_tokens": task.max_new_tokens, "temperature": 0})
                response.raise_for_status()
                answer = response.json()["choices"][0]["message"]["content"]
                score = task.score(answer, example["completion"])[task.primary_metric]
                rows.append({"prompt": example["prompt"], "answer": answer, "reference": example["completion"],
                             task.primary_metric: score, "seconds": time.perf_counter() - start})
                print(f"[{name}] {example['prompt'][:60]!r} -> {answer[:70]!r} ({task.primary_metric} {score:.2f})")
            results[name] = {"metric": task.primary_metric,
                             "mean": sum(r[task.primary_metric] for r in rows) / len(rows), "requests": rows}
    return results


def run_demo(cfg: DemoConfig, settings: Settings) -> dict[str, Any]:
    """Run every step and return (and write) the summary; the server is shut down at the end."""
    from ray import serve

    from inlaid_ray.model.prepare import prepare_smollm2
    from inlaid_ray.serve.app import AppArgs
    from inlaid_ray.serve.launcher import run_serve

    work = Path(cfg.work_dir or settings.cache_dir / "demo")
    work.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    steps.start("1/4 prepare SmolLM2-135M-Instruct (bundled GGUF -> HF directory)")
    base_dir = prepare_smollm2(settings.cache_dir)
    print(base_dir)
    steps.start(f"2/4 quantize the base once for all tasks ({cfg.quant_method}, {cfg.bits}-bit)")
    quantized = quantize_demo_base(base_dir, work / f"smollm2-{cfg.quant_method}-{cfg.bits}bit", cfg)
    steps.start("3/4 compress the demo adapters per cluster and serve them on the quantized base (Ray Serve)")
    settings = replace(settings, api_key=settings.api_key or DEMO_API_KEY)
    chosen_policy = {"policy": cfg.policy} if cfg.policy is not None else {}
    args = AppArgs(model_dir=str(quantized), base_model_id=f"smollm2-{cfg.quant_method}", num_replicas=cfg.num_replicas,
                   data_dir=str(work / "registry"), artifact_dir=str(work / "artifacts"),
                   adapter_format="jd_bank", seed_manifest=str(DEMO_MANIFEST), **chosen_policy)
    url = run_serve(args, host=cfg.host, port=cfg.port, blocking=False, settings=settings)
    try:
        steps.start("4/4 send each task a few eval prompts over HTTP")
        results = send_demo_requests(url, settings.api_key, cfg.examples_per_task)
        steps.done()
    finally:
        serve.shutdown()
    summary = {"config": {k: str(v) for k, v in asdict(cfg).items()} | {"policy": args.policy},
               "quantized_base": str(quantized),
               "compressed_banks": str(work / "artifacts" / "seed-banks"),
               "step_seconds": steps.seconds, "tasks": results}
    out = work / "demo_summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "\n".join(f"{name:10s} {r['metric']} {r['mean']:.2f}" for name, r in results.items()))
    print(f"summary: {out}")
    return summary
