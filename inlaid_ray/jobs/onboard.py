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

    def __init__(self, message: str, step: str, report: "OnboardReport") -> None:
        super().__init__(message)
        self.step, self.report = step, report


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
    heartbeat: _Heartbeat | None = None  # refreshes the record while the job runs
    staged: Staged | None = None
    stats_undo: StatsUndo | None = None  # set once the statistics step starts


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
    def __init__(self, report: OnboardReport, fault: FaultHook | None) -> None:
        self.report, self.fault = report, fault

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        assert name in STEPS, name
        self.report.step = name
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.report.steps[name] = round(time.perf_counter() - start, 3)
        self.report.steps_cpu[name] = round(time.process_time() - cpu, 3)
        log.info("onboard %s: %s done in %.2fs", self.report.task, name, self.report.steps[name])
        if self.fault is not None:
            self.fault(name)


def onboard_task(task: str, tenant: str, adapter: str | Path, calib: str | Path,
                 options: OnboardOptions | None = None, *, settings: Settings | None = None,
                 fault: FaultHook | None = None) -> OnboardReport:
    """Onboard one task end to end (module docstring); returns the report of a live task or raises
    OnboardingFailed after rolling back. `fault(step)` runs after every step (crash injection)."""
    opts = options or OnboardOptions()
    res = resolve(opts, settings or Settings.from_env())
    report = OnboardReport(task, tenant)
    steps = _Steps(report, fault)
    try:
        with steps("validate"):
            check_task_name(task, reserved=(res.base_model_id, Path(res.base_dir).name))
            check_name("tenant", tenant)
            if opts.endpoint and not res.admin_key:
                raise InvalidRequest(f"probing {opts.endpoint} needs an admin API key (--admin-key or "
                                     "INLAID_ADMIN_KEY); pass --endpoint none to go live without a probe")
            model_config = ModelConfig.from_dir(res.base_dir)
            lora = validate_adapter(adapter, model_config, res.limits, name=task, base_dir=res.base_dir)
            tokenizer = load_tokenizer(res.base_dir)
            calib_check = validate_calibration(calib, tokenizer, opts.min_calib_tokens)
            if opts.eval_data:
                validate_calibration(opts.eval_data, tokenizer, 2, what="held-out examples file")
                if not scorable_examples(Path(opts.eval_data), tokenizer, res.gate):
                    raise InvalidRequest(f"held-out examples file {opts.eval_data}: no record has an answer token "
                                         f"within the first {res.gate.max_seq_len} tokens to score")
    except Exception as exc:
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
        raise OnboardingFailed(f"onboarding of task {task!r} failed validation, nothing was changed: {exc}",
                               "validate", report) from exc
    client = connect_redis(res.redis_url, res.data_dir)
    try:
        registry = TaskRegistry(client, opts.namespace)
        if registry.get_tenant(tenant) is None:
            missing = InvalidRequest(f"the tenant {tenant!r} does not exist (create it: POST /v1/admin/tenants)")
            report.status, report.error = "failed", f"InvalidRequest: {missing}"
            raise OnboardingFailed(f"onboarding of task {task!r} failed validation, nothing was changed: {missing}",
                                   "validate", report) from missing
        store = ArtifactStore(res.artifact_dir)
        with store.lock():
            return _run(task, tenant, Path(adapter), Path(calib_check.path), lora, model_config, opts, res,
                        registry, store, report, steps)
    finally:
        client.close()


def _run(task: str, tenant: str, adapter_dir: Path, calib_path: Path, lora: Any, model_config: ModelConfig,
         opts: OnboardOptions, res: Resolved, registry: TaskRegistry, store: ArtifactStore, report: OnboardReport,
         steps: _Steps) -> OnboardReport:
    attempt = _Attempt()
    try:
        with steps("register"):
            attempt.record = _register(task, tenant, adapter_dir, lora, opts, res, registry)
            report.version = attempt.record.version
            attempt.heartbeat = _Heartbeat(registry, task, attempt.record.version, opts.heartbeat_s)
        version = attempt.record.version
        with steps("task_artifacts"):
            with store.building("tasks", task, version) as tmp:
                tmp.mkdir()
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    shutil.copy2(adapter_dir / name, tmp / name)
                shutil.copy2(calib_path, tmp / "calibration.jsonl")
                if opts.eval_data:
                    shutil.copy2(opts.eval_data, tmp / EVAL_FILE)
            task_dir = store.published[-1]
            report.artifacts["task"] = str(task_dir)
        snapshot = registry.snapshot()
        res = replace(res, quant=replace(res.quant, method=quant_method_for(opts.quant_method, snapshot)))
        report.quantization["method"] = res.quant.method
        with steps("statistics"):
            attempt.stats_undo = StatsUndo.capture(store.stats_dir)
            stats = task_statistics(task, task_dir, snapshot, res, store.stats_dir, attempt.stats_undo, opts.progress,
                                    catch_up=opts.requantize != "never")
            report.statistics = {k: v for k, v in asdict(stats).items() if k != "changed"}
        with steps("decide"):
            report.decision = decide_requantize(opts.requantize, task, stats, snapshot)
            log.info("onboard %s: re-quantize=%s (%s)", task, report.decision["requantize"], report.decision["reason"])
        base = None
        if report.decision["requantize"]:
            with steps("quantize"):
                version_number = max([b.version for b in registry.list_base_versions()] + [0]) + 1
                base, qreport = quantize_new_base(task, version_number, res, store)
                report.artifacts["base"] = base.uri
                report.quantization.update(version=base.version, tasks=qreport.get("tasks"),
                                           resources=qreport.get("resources"))
            with steps("gate"):
                report.gate = _gate(task, task_dir, snapshot, base, res)
                if report.gate["passed"]:
                    StatsStore.open(store.stats_dir).mark_quantized()  # what the next job compares with
                else:
                    log.warning("onboard %s: base version %d refused: %s", task, base.version, report.gate["reason"])
                    store.discard(Path(base.uri))
                    report.artifacts.pop("base")
                    base = None
        with steps("cluster"):
            cluster = _cluster(task, lora, snapshot, model_config, res, store, report)
        with steps("stage"):
            record = TaskRecord(
                name=task, tenant=tenant, adapter_uri=str(task_dir), base_model=res.base_model_id,
                rank=lora.max_rank, target_modules=tuple(sorted(lora.modules)), version=version,
                adapter_sha256=lora.content_hash, extra=_extra(attempt.record, task_dir, opts),
            )
            previous = None if snapshot.base_version else BaseVersion(0, str(res.base_dir), quant_method="none")
            attempt.staged = stage_onboarding(registry, record, cluster, base, previous_base=previous)
            if attempt.staged is None:
                raise RuntimeError(f"task {task!r} left onboarding (version {version}) before it was staged")
        with steps("probe"):
            if opts.endpoint:
                endpoint = probe_endpoint(opts.endpoint, registry)
                result = probe_task(endpoint, res.admin_key, task, base.version if base else None, res.probe)
                report.probe = asdict(result) | {"endpoint": endpoint}
            else:
                log.warning("onboard %s: no endpoint given; going live without a probe", task)
        with steps("activate"):
            attempt.heartbeat.stop()
            if activate_onboarding(registry, task, version) is None:
                raise RuntimeError(f"task {task!r} left onboarding (version {version}) before it went live")
        report.status, report.step = "live", "done"
        _forget_undo(store.stats_dir)
        _write_report(store, report)
        return report
    except BaseException as exc:
        if attempt.heartbeat is not None:
            attempt.heartbeat.stop()
        step = report.step
        report.status, report.error = "failed", f"{step}: {type(exc).__name__}: {exc}"
        _rollback(task, attempt, registry, store, res, report)
        _write_report(store, report)
        if isinstance(exc, InvalidRequest) and attempt.record is None:
            raise OnboardingFailed(f"onboarding of task {task!r} refused: {exc}", step, report) from exc
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt / SystemExit: rolled back, now let it through
        raise OnboardingFailed(f"onboarding of task {task!r} failed at step {step!r} and was rolled back: "
                               f"{type(exc).__name__}: {exc}", step, report) from exc


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


def _gate(task: str, task_dir: Path, snapshot: Snapshot, candidate: BaseVersion, res: Resolved) -> dict[str, Any]:
    """The rollout gate's report on `candidate`: every live task with held-out examples scored on
    the base serving now and on the candidate (the new task too, reported but not gating)."""
    live = sorted((t for t in snapshot.tasks.values() if t.status == "live" and t.name != task), key=lambda t: t.name)
    held = [HeldOutTask(t.name, Path(t.adapter_uri), Path(t.extra["eval_uri"])) for t in live if t.extra.get("eval_uri")]
    if (task_dir / EVAL_FILE).is_file():
        held.append(HeldOutTask(task, task_dir, task_dir / EVAL_FILE, gated=False))
    current = snapshot.base_version.uri if snapshot.base_version else str(res.base_dir)
    return run_step(f"onboard-{task}-gate", check_candidate, res.base_dir, current, candidate.uri, held,
                    [t.name for t in live if not t.extra.get("eval_uri")], res.gate, remote=res.remote)


def _extra(record: TaskRecord, task_dir: Path, opts: OnboardOptions) -> dict[str, Any]:
    extra = {k: v for k, v in record.extra.items() if k != "error"}
    extra["calibration_uri"] = str(task_dir / "calibration.jsonl")
    if opts.eval_data:
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


def _rollback(task: str, attempt: _Attempt, registry: TaskRegistry, store: ArtifactStore, res: Resolved,
              report: OnboardReport) -> None:
    """Undo in reverse order; every part is attempted even if an earlier one fails."""
    parts: list[tuple[str, Callable[[], Any]]] = []
    record = attempt.record
    if record is not None:
        parts.append(("registry", lambda: rollback_onboarding(registry, task, record.version,
                                                              report.error or "failed", attempt.staged)))
    parts.append(("artifacts", store.discard_published))
    if attempt.stats_undo is not None:
        parts.append(("statistics", lambda: attempt.stats_undo.restore(store.stats_dir)))
    for name, undo in parts:
        try:
            undo()
            report.rollback.append(f"{name}: ok")
        except Exception as exc:  # noqa: BLE001 - keep undoing the rest, report what failed
            log.exception("onboard %s: rollback of %s failed", task, name)
            report.rollback.append(f"{name}: FAILED {type(exc).__name__}: {exc}")


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
