"""Dynamic task onboarding (docs/architecture.md "onboarding job"; LoRA-Inlaid's dynamic task
addition): `onboard_task` and `inlaid-ray onboard`, meant to run as `ray job submit -- inlaid-ray
onboard --task NAME --tenant T --adapter DIR --calib FILE`.

Steps, each timed in the report: validate the adapter and calibration file (nothing is written
before this passes) -> register the task `onboarding` -> copy the adapter + calibration into a
new versioned task directory -> MLGPTQ statistics of the task in a Ray task (GPU when present)
-> decide whether the base must be re-quantized (which layer groups' max-aggregated Hessians
changed) and if so run incremental MLGPTQ into a new base version -> the rollout gate: score every
live task's held-out examples on the current and the new base, and keep the current base when any
task would lose more than a margin (rollout_gate.py) -> join or create a cluster
and write its next compressed bank version -> stage everything in ONE registry transaction
(task still `onboarding`; the events are the rollout announcement) -> probe the endpoint with
the task on every running replica (probe.py) -> mark it `live` (`task_added`). The base-model
steps (statistics, decision, re-quantization) are in onboard_base.py.

`onboard_tasks` (`inlaid-ray onboard --batch FILE`) runs the same steps for many tasks in one
job: the statistics of all of them in one step, at most one re-quantization and one gate, and
the per-task steps (register, artifacts, cluster, stage, probe, activate) for each in turn.

Any failure, including an interrupt, rolls back in reverse: the registry transaction of
`rollback_onboarding` (task -> `failed`, cluster and base version restored), then the published
artifact directories and the task's statistics are removed. Users never saw the task (it was
not live), other tasks kept being served from the unchanged cluster/base records, and replicas
that already loaded a staged base keep serving correctly on it until the restored version
swaps back. The cluster keeps its serving format: a compressed cluster is served from its new
bank version, a raw one from the members' PEFT adapters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from inlaid_ray.config import Settings
from inlaid_ray.errors import InlaidError, InvalidRequest
from inlaid_ray.jobs.artifacts import ArtifactStore
from inlaid_ray.jobs.cluster_assign import choose_cluster
from inlaid_ray.jobs.onboard_args import OnboardOptions, Resolved, probe_endpoint, resolve
from inlaid_ray.jobs.onboard_base import (
    StatsUndo,
    decide_requantize,
    quant_method_for,
    quantize_new_base,
    task_statistics,
)
from inlaid_ray.jobs.probe import probe_task
from inlaid_ray.jobs.remote import run_step
from inlaid_ray.jobs.rollout_gate import EVAL_FILE, HeldOutTask, check_candidate, scorable_examples
from inlaid_ray.jobs.validate import validate_calibration
from inlaid_ray.jsonl import read_jsonl_objects
from inlaid_ray.lora.validation import validate_adapter
from inlaid_ray.lora import load_peft_adapter
from inlaid_ray.lora.cluster_bank import save_cluster_banks
from inlaid_ray.lora.peft_io import CONFIG_NAME, WEIGHTS_NAME
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.quant.stats_store import StatsStore
from inlaid_ray.registry import BaseVersion, ClusterRecord, Snapshot, TaskRecord, TaskRegistry, connect_redis
from inlaid_ray.registry.records import check_name, check_task_name
from inlaid_ray.registry.rollout import (
    Staged,
    activate_onboarding,
    fail_stale_onboarding,
    heartbeat_onboarding,
    rollback_onboarding,
    stage_onboarding,
)

log = logging.getLogger(__name__)

STEPS = ("validate", "register", "task_artifacts", "statistics", "decide", "quantize", "gate", "cluster", "stage",
         "probe", "activate")
FaultHook = Callable[[str], None]  # called after each step; raising there injects a crash


class OnboardingFailed(InlaidError):
    """Onboarding stopped at `step` and was rolled back; the cause is chained."""

    def __init__(self, message: str, step: str, report: "OnboardReport",
                 reports: "list[OnboardReport] | None" = None) -> None:
        super().__init__(message)
        self.step, self.report = step, report
        self.reports = reports or [report]  # every task of the job


@dataclass
class OnboardReport:
    """What one onboarding attempt did (also written to <artifacts>/reports/)."""

    task: str
    tenant: str
    status: str = "running"  # live | failed
    version: int | None = None
    step: str = ""
    steps: dict[str, float] = field(default_factory=dict)  # step -> wall seconds
    steps_cpu: dict[str, float] = field(default_factory=dict)  # step -> CPU seconds of this process (all threads)
    decision: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)  # the rollout gate's verdict on a re-quantized base
    cluster: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    rollback: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Attempt:
    record: TaskRecord | None = None  # set once begin_onboarding registered it
    heartbeat: "_Heartbeat | None" = None  # refreshes the record while the job runs
    staged: Staged | None = None


class _Heartbeat:
    """Refreshes the onboarding record every `interval_s` from a daemon thread while the job runs,
    so another job's `--reclaim-stale-s` fails only a job that died (its record stops aging)."""

    def __init__(self, registry: TaskRegistry, task: str, version: int, interval_s: float) -> None:
        self._args = (registry, task, version)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"onboard-heartbeat-{task}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not heartbeat_onboarding(*self._args):
                    return  # left onboarding (rolled back, reclaimed): nothing left to keep alive
            except Exception:  # noqa: BLE001 - a missed beat only ages the record; keep beating
                log.warning("onboard %s: heartbeat failed", self._args[1], exc_info=True)


class _Steps:
    """Times each step into the reports it concerns (every task's for the shared steps)."""

    def __init__(self, reports: list[OnboardReport], fault: FaultHook | None) -> None:
        self.reports, self.fault = reports, fault

    @contextlib.contextmanager
    def __call__(self, name: str, reports: list[OnboardReport] | None = None) -> Iterator[None]:
        assert name in STEPS, name
        reports = self.reports if reports is None else reports
        for r in self.reports:
            r.step = name
        start, cpu = time.perf_counter(), time.process_time()
        yield
        wall, used = round(time.perf_counter() - start, 3), round(time.process_time() - cpu, 3)
        for r in reports:
            r.steps[name], r.steps_cpu[name] = wall, used
        log.info("onboard %s: %s done in %.2fs", ",".join(r.task for r in reports), name, wall)
        if self.fault is not None:
            self.fault(name)


@dataclass(frozen=True)
class TaskSpec:
    """One task of an onboarding job: name, tenant, PEFT directory, calibration (and held-out) data."""

    task: str
    tenant: str
    adapter: Path
    calib: Path
    eval_data: Path | None = None


@dataclass
class _Item:
    """A task inside a running job: its validated inputs, report and undo state."""

    spec: TaskSpec
    lora: Any
    calib_path: Path
    report: OnboardReport
    attempt: _Attempt = field(default_factory=_Attempt)
    task_dir: Path | None = None


def onboard_task(task: str, tenant: str, adapter: str | Path, calib: str | Path,
                 options: OnboardOptions | None = None, *, settings: Settings | None = None,
                 fault: FaultHook | None = None) -> OnboardReport:
    """Onboard one task end to end (module docstring); returns the report of a live task or raises
    OnboardingFailed after rolling back. `fault(step)` runs after every step (crash injection)."""
    opts = options or OnboardOptions()
    spec = TaskSpec(task, tenant, Path(adapter), Path(calib), Path(opts.eval_data) if opts.eval_data else None)
    return onboard_tasks([spec], opts, settings=settings, fault=fault)[0]


def onboard_tasks(specs: list[TaskSpec], options: OnboardOptions | None = None, *,
                  settings: Settings | None = None, fault: FaultHook | None = None) -> list[OnboardReport]:
    """Onboard several tasks in ONE job: each is validated, registered, given its artifacts and a
    cluster, staged, probed and activated on its own, but their statistics are computed together
    and the base is re-quantized (and gated) at most once for all of them. All or nothing: any
    failure rolls every task back. Returns one report per task (the shared steps in each)."""
    opts = options or OnboardOptions()
    res = resolve(opts, settings or Settings.from_env())
    reports = [OnboardReport(s.task, s.tenant) for s in specs]
    steps = _Steps(reports, fault)
    items: list[_Item] = []
    try:
        with steps("validate"):
            names = [s.task for s in specs]
            if not specs or len(set(names)) != len(names):
                raise InvalidRequest(f"an onboarding job needs distinct task names, got {names}")
            if opts.eval_data and len(specs) > 1:
                raise InvalidRequest("eval_data names one task's held-out examples; give each TaskSpec its own")
            if opts.endpoint and not res.admin_key:
                raise InvalidRequest(f"probing {opts.endpoint} needs an admin API key (--admin-key or "
                                     "INLAID_ADMIN_KEY); pass --endpoint none to go live without a probe")
            model_config = ModelConfig.from_dir(res.base_dir)
            tokenizer = load_tokenizer(res.base_dir)
            for spec, report in zip(specs, reports):
                items.append(_validate(spec, report, model_config, tokenizer, opts, res))
    except Exception as exc:
        for r in reports:
            r.status, r.error = "failed", f"{type(exc).__name__}: {exc}"
        raise OnboardingFailed(f"onboarding of {_names(specs)} failed validation, nothing was changed: {exc}",
                               "validate", reports[0], reports) from exc
    client = connect_redis(res.redis_url, res.data_dir)
    try:
        registry = TaskRegistry(client, opts.namespace)
        for spec in specs:
            if registry.get_tenant(spec.tenant) is None:
                missing = InvalidRequest(f"the tenant {spec.tenant!r} does not exist (create it: POST /v1/admin/tenants)")
                for r in reports:
                    r.status, r.error = "failed", f"InvalidRequest: {missing}"
                raise OnboardingFailed(f"onboarding of {_names(specs)} failed validation, nothing was changed: "
                                       f"{missing}", "validate", reports[0], reports) from missing
        store = ArtifactStore(res.artifact_dir)
        with store.lock():
            return _run(items, model_config, opts, res, registry, store, steps)
    finally:
        client.close()


def read_task_specs(path: str | Path) -> list[TaskSpec]:
    """The tasks of an `onboard --batch` file: JSONL, one {"task", "tenant", "adapter", "calib"
    [, "eval_data"]} a line; relative paths are taken from the file's directory."""
    path = Path(path)
    specs, keys, optional = [], ("task", "tenant", "adapter", "calib"), ("eval_data",)
    for lineno, rec in read_jsonl_objects(path, "--batch file"):
        if any(not isinstance(rec.get(k), str) or not rec[k] for k in keys) \
                or set(rec) - set(keys) - set(optional) or not isinstance(rec.get("eval_data", ""), str):
            raise InvalidRequest(f"{path}:{lineno}: expected {{\"task\", \"tenant\", \"adapter\", \"calib\"[, "
                                 f"\"eval_data\"]}} with string values, got {json.dumps(rec)[:200]}")
        where = lambda p: path.parent / p  # noqa: E731 - absolute paths stay as they are
        specs.append(TaskSpec(rec["task"], rec["tenant"], where(rec["adapter"]), where(rec["calib"]),
                              where(rec["eval_data"]) if rec.get("eval_data") else None))
    if not specs:
        raise InvalidRequest(f"--batch file {path} names no task")
    return specs


def _names(specs: list[TaskSpec]) -> str:
    return f"task {specs[0].task!r}" if len(specs) == 1 else f"tasks {[s.task for s in specs]}"


def _validate(spec: TaskSpec, report: OnboardReport, model_config: ModelConfig, tokenizer: Any,
              opts: OnboardOptions, res: Resolved) -> _Item:
    check_task_name(spec.task, reserved=(res.base_model_id, Path(res.base_dir).name))
    check_name("tenant", spec.tenant)
    lora = validate_adapter(spec.adapter, model_config, res.limits, name=spec.task, base_dir=res.base_dir)
    calib_check = validate_calibration(spec.calib, tokenizer, opts.min_calib_tokens)
    if spec.eval_data is not None:
        validate_calibration(spec.eval_data, tokenizer, 2, what="held-out examples file")
        if not scorable_examples(spec.eval_data, tokenizer, res.gate):
            raise InvalidRequest(f"held-out examples file {spec.eval_data}: no record has an answer token "
                                 f"within the first {res.gate.max_seq_len} tokens to score")
    return _Item(spec, lora, Path(calib_check.path), report)


def _run(items: list[_Item], model_config: ModelConfig, opts: OnboardOptions, res: Resolved,
         registry: TaskRegistry, store: ArtifactStore, steps: _Steps) -> list[OnboardReport]:
    reports = [it.report for it in items]
    stats_undo: list[StatsUndo] = []  # set once the statistics step starts
    try:
        for it in items:
            with steps("register", [it.report]):
                it.attempt.record = _register(it.spec.task, it.spec.tenant, it.spec.adapter, it.lora, opts, res,
                                              registry)
                it.report.version = it.attempt.record.version
                it.attempt.heartbeat = _Heartbeat(registry, it.spec.task, it.attempt.record.version, opts.heartbeat_s)
        for it in items:
            with steps("task_artifacts", [it.report]):
                with store.building("tasks", it.spec.task, it.attempt.record.version) as tmp:
                    tmp.mkdir()
                    for name in (CONFIG_NAME, WEIGHTS_NAME):
                        shutil.copy2(it.spec.adapter / name, tmp / name)
                    shutil.copy2(it.calib_path, tmp / "calibration.jsonl")
                    if it.spec.eval_data is not None:
                        shutil.copy2(it.spec.eval_data, tmp / EVAL_FILE)
                it.task_dir = store.published[-1]
                it.report.artifacts["task"] = str(it.task_dir)
        new = {it.spec.task: it.task_dir for it in items}
        label = items[0].spec.task if len(items) == 1 else f"{items[0].spec.task}+{len(items) - 1}"
        snapshot = registry.snapshot()
        res = replace(res, quant=replace(res.quant, method=quant_method_for(opts.quant_method, snapshot)))
        with steps("statistics"):
            stats_undo.append(StatsUndo.capture(store.stats_dir))
            stats = task_statistics(new, snapshot, res, store.stats_dir, stats_undo[0], opts.progress,
                                    catch_up=opts.requantize != "never")
            statistics = {k: v for k, v in asdict(stats).items() if k != "changed"}
        with steps("decide"):
            decision = decide_requantize(opts.requantize, set(new), stats, snapshot)
            log.info("onboard %s: re-quantize=%s (%s)", label, decision["requantize"], decision["reason"])
        quantization: dict[str, Any] = {"method": res.quant.method}
        gate: dict[str, Any] = {}
        base = None
        for r in reports:
            r.statistics, r.decision, r.quantization, r.gate = statistics, decision, quantization, gate
        if decision["requantize"]:
            with steps("quantize"):
                version_number = max([b.version for b in registry.list_base_versions()] + [0]) + 1
                base, qreport = quantize_new_base(label, version_number, res, store)
                for r in reports:
                    r.artifacts["base"] = base.uri
                quantization.update(version=base.version, tasks=qreport.get("tasks"),
                                    resources=qreport.get("resources"))
            with steps("gate"):
                gate.update(_gate(label, new, snapshot, base, res))
                if gate["passed"]:
                    StatsStore.open(store.stats_dir).mark_quantized()  # what the next job compares with
                else:
                    log.warning("onboard %s: base version %d refused: %s", label, base.version, gate["reason"])
                    store.discard(Path(base.uri))
                    for r in reports:
                        r.artifacts.pop("base")
                    base = None
        previous = None if snapshot.base_version else BaseVersion(0, str(res.base_dir), quant_method="none")
        for it in items:  # one at a time: each task's cluster choice sees the ones staged before it
            task, version = it.spec.task, it.attempt.record.version
            with steps("cluster", [it.report]):
                cluster = _cluster(task, it.lora, registry.snapshot(), model_config, res, store, it.report)
            with steps("stage", [it.report]):
                record = TaskRecord(
                    name=task, tenant=it.spec.tenant, adapter_uri=str(it.task_dir), base_model=res.base_model_id,
                    rank=it.lora.max_rank, target_modules=tuple(sorted(it.lora.modules)), version=version,
                    adapter_sha256=it.lora.content_hash, extra=_extra(it.attempt.record, it.task_dir, it.spec, opts),
                )
                it.attempt.staged = stage_onboarding(registry, record, cluster, base, previous_base=previous)
                if it.attempt.staged is None:
                    raise RuntimeError(f"task {task!r} left onboarding (version {version}) before it was staged")
        for it in items:
            with steps("probe", [it.report]):
                if opts.endpoint:
                    endpoint = probe_endpoint(opts.endpoint, registry)
                    result = probe_task(endpoint, res.admin_key, it.spec.task, base.version if base else None,
                                        res.probe)
                    it.report.probe = asdict(result) | {"endpoint": endpoint}
                else:
                    log.warning("onboard %s: no endpoint given; going live without a probe", it.spec.task)
        for it in items:
            with steps("activate", [it.report]):
                it.attempt.heartbeat.stop()
                if activate_onboarding(registry, it.spec.task, it.attempt.record.version) is None:
                    raise RuntimeError(f"task {it.spec.task!r} left onboarding (version "
                                       f"{it.attempt.record.version}) before it went live")
        for r in reports:
            r.status, r.step = "live", "done"
        _forget_undo(store.stats_dir)
        for r in reports:
            _write_report(store, r)
        return reports
    except BaseException as exc:
        for it in items:
            if it.attempt.heartbeat is not None:
                it.attempt.heartbeat.stop()
        step = reports[0].step
        for r in reports:
            r.status, r.error = "failed", f"{step}: {type(exc).__name__}: {exc}"
        _rollback(items, stats_undo[0] if stats_undo else None, registry, store)
        for r in reports:
            _write_report(store, r)
        names = _names([it.spec for it in items])
        if isinstance(exc, InvalidRequest) and all(it.attempt.record is None for it in items):
            raise OnboardingFailed(f"onboarding of {names} refused: {exc}", step, reports[0], reports) from exc
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt / SystemExit: rolled back, now let it through
        raise OnboardingFailed(f"onboarding of {names} failed at step {step!r} and was rolled back: "
                               f"{type(exc).__name__}: {exc}", step, reports[0], reports) from exc


def _register(task: str, tenant: str, adapter_dir: Path, lora: Any, opts: OnboardOptions, res: Resolved,
              registry: TaskRegistry) -> TaskRecord:
    if opts.reclaim_stale_s is not None:
        if fail_stale_onboarding(registry, task, opts.reclaim_stale_s, "onboarding job vanished (reclaimed)"):
            log.warning("onboard %s: reclaimed an onboarding record older than %.0fs", task, opts.reclaim_stale_s)
    record = registry.begin_onboarding(TaskRecord(
        name=task, tenant=tenant, adapter_uri=str(adapter_dir.resolve()), base_model=res.base_model_id,
        rank=lora.max_rank, target_modules=tuple(sorted(lora.modules)), adapter_sha256=lora.content_hash,
    ))
    if record is None:
        old = registry.get_task(task)
        status = old.status if old else "unknown"
        hint = "retire it first" if status == "live" else "another onboarding job owns it (see --reclaim-stale-s)"
        raise InvalidRequest(f"task {task!r} is {status}: {hint}")
    return record


def _gate(label: str, new: dict[str, Path], snapshot: Snapshot, candidate: BaseVersion,
          res: Resolved) -> dict[str, Any]:
    """The rollout gate's report on `candidate`: every live task with held-out examples scored on
    the base serving now and on the candidate (the new tasks too, reported but not gating)."""
    live = sorted((t for t in snapshot.tasks.values() if t.status == "live" and t.name not in new),
                  key=lambda t: t.name)
    held = [HeldOutTask(t.name, Path(t.adapter_uri), Path(t.extra["eval_uri"])) for t in live if t.extra.get("eval_uri")]
    held += [HeldOutTask(name, task_dir, task_dir / EVAL_FILE, gated=False) for name, task_dir in sorted(new.items())
             if (task_dir / EVAL_FILE).is_file()]
    current = snapshot.base_version.uri if snapshot.base_version else str(res.base_dir)
    return run_step(f"onboard-{label}-gate", check_candidate, res.base_dir, current, candidate.uri, held,
                    [t.name for t in live if not t.extra.get("eval_uri")], res.gate, remote=res.remote)


def _extra(record: TaskRecord, task_dir: Path, spec: TaskSpec, opts: OnboardOptions) -> dict[str, Any]:
    extra = {k: v for k, v in record.extra.items() if k != "error"}
    extra["calibration_uri"] = str(task_dir / "calibration.jsonl")
    if spec.eval_data is not None:
        extra["eval_uri"] = str(task_dir / EVAL_FILE)
    if opts.expected_output_tokens is not None:
        extra["expected_output_tokens"] = opts.expected_output_tokens
    if opts.slo_s is not None:
        extra["slo_s"] = opts.slo_s
    return extra


def _cluster(task: str, lora: Any, snapshot: Snapshot, model_config: ModelConfig, res: Resolved,
             store: ArtifactStore, report: OnboardReport) -> ClusterRecord:
    def load_member(t: TaskRecord) -> Any:
        return load_peft_adapter(t.adapter_uri, model_config, name=t.name)

    choice = choose_cluster(task, lora, snapshot.clusters, snapshot.tasks, load_member, model_config, res.cluster,
                            res.artifact_dir)
    version = (choice.previous.version + 1) if choice.previous else 1
    with store.building("clusters", choice.cluster_id, version) as tmp:
        save_cluster_banks(choice.bank, tmp)
    report.artifacts["cluster_bank"] = str(store.published[-1])
    report.cluster = {"cluster": choice.cluster_id, "created": choice.created, "how": choice.how,
                      "error": choice.error, "version": version, "candidates": choice.candidates}
    log.info("onboard %s: cluster %s (%s, error %.4g; candidates %s)", task, choice.cluster_id, choice.how,
             choice.error, choice.candidates)
    members = choice.previous.members if choice.previous else ()
    return ClusterRecord(choice.cluster_id, bank_uri=str(store.published[-1]), version=version,
                         members=tuple(m for m in members if m != task),
                         format=_cluster_format(choice.previous, snapshot.clusters))


def _cluster_format(joined: ClusterRecord | None, clusters: Mapping[str, ClusterRecord]) -> str:
    """How replicas serve the cluster after this onboarding: a joined cluster keeps its format (a
    compressed cluster stays compressed, served from its new bank version); a new cluster takes
    the format every populated cluster shares (the deployment's choice), else raw PEFT."""
    if joined is not None:
        return joined.format
    formats = {c.format for c in clusters.values() if c.members}
    return formats.pop() if len(formats) == 1 else "peft"


def _rollback(items: list[_Item], stats_undo: StatsUndo | None, registry: TaskRegistry,
              store: ArtifactStore) -> None:
    """Undo in reverse order (tasks last staged first); every part is attempted even if an earlier
    one fails, and each task's report lists what was undone."""
    parts: list[tuple[str, Callable[[], Any], list[OnboardReport]]] = []
    for it in reversed(items):
        record = it.attempt.record
        if record is not None:
            parts.append(("registry", lambda it=it, record=record: rollback_onboarding(
                registry, it.spec.task, record.version, it.report.error or "failed", it.attempt.staged), [it.report]))
    everyone = [it.report for it in items]
    parts.append(("artifacts", store.discard_published, everyone))
    if stats_undo is not None:
        parts.append(("statistics", lambda: stats_undo.restore(store.stats_dir), everyone))
    for name, undo, reports in parts:
        try:
            undo()
            for r in reports:
                r.rollback.append(f"{name}: ok")
        except Exception as exc:  # noqa: BLE001 - keep undoing the rest, report what failed
            log.exception("onboard: rollback of %s failed", name)
            for r in reports:
                r.rollback.append(f"{name}: FAILED {type(exc).__name__}: {exc}")


def _forget_undo(stats_dir: Path) -> None:
    """The job is done: the statistics' previous generation (its undo) is no longer needed."""
    try:
        if StatsStore.is_store(stats_dir):
            StatsStore.open(stats_dir).forget_previous()
    except (OSError, ValueError):
        log.warning("could not drop the previous statistics generation in %s", stats_dir, exc_info=True)


def _write_report(store: ArtifactStore, report: OnboardReport) -> None:
    try:
        path = store.write_report(f"onboard-{report.task}-v{report.version or 0:04d}-{int(time.time())}",
                                  report.to_dict())
        log.info("onboard %s: report %s", report.task, path)
    except OSError:
        log.exception("onboard %s: could not write the report", report.task)
