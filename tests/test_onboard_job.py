"""The onboarding job on a tiny random Llama, in-process (no Ray, no service to probe): the
registry's stage/activate/rollback transactions, atomic versioned artifacts, incremental MLGPTQ
through the job (only the new task's statistics are computed, the decision names the changed
layer groups, and the new base is bit-identical to a full MLGPTQ run over all tasks), joining a
compatible cluster, and failures - corrupt adapter, wrong-format calibration, a crash injected
after each step - leaving registry, artifacts and statistics as they were."""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inlaid_ray.config import Settings
from inlaid_ray.errors import AdapterError, InvalidRequest
from inlaid_ray.jobs.artifacts import ArtifactStore, list_versions
from inlaid_ray.jobs.onboard import STEPS, OnboardingFailed, onboard_task
from inlaid_ray.jobs.onboard_args import OnboardOptions
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.incremental import checkpoints_identical, quantize_base
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD, MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore
from inlaid_ray.registry import (
    BaseVersion,
    ClusterRecord,
    TaskRecord,
    TaskRegistry,
    activate_onboarding,
    connect_redis,
    fail_stale_onboarding,
    retire_task,
    rollback_onboarding,
    stage_onboarding,
)
from test_mlgptq_setup import GROUP_SIZE, TASKS, make_peft_adapter, make_task_sources, write_calibration, write_tiny_base

TOKENS = 120  # calibration tokens per task: tiny and fast, still several sequences


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("onboard-redis")
    client = connect_redis(None, data_dir)
    client.data_dir = data_dir  # the job connects to the same embedded server through it
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("onboard-tiny")
    base = write_tiny_base(root / "base")
    sources = {s.name: s for s in make_task_sources(root, base)}
    # A second all-module adapter: compatible with "all" for a cluster join.
    twin = make_peft_adapter(base, root / "adapter_all2", 8, 16, TASKS["all"][2], seed=321)
    return root, base, sources, twin


def _env(tmp_path: Path, redis_client, base: Path) -> tuple[OnboardOptions, Settings, TaskRegistry]:
    ns = "t" + uuid.uuid4().hex[:10]
    opts = OnboardOptions(base_dir=str(base), artifact_dir=str(tmp_path / "artifacts"), namespace=ns, endpoint=None,
                          use_ray=False, tokens_per_task=TOKENS, group_size=GROUP_SIZE, progress=False,
                          cluster_rank=16, error_budget=0.05, data_dir=str(redis_client.data_dir),
                          max_delta_ratio=100.0)  # the fixture's random adapters are 13x the random base
    registry = TaskRegistry(redis_client, ns)
    registry.add_tenant("acme")
    return opts, Settings(cache_dir=tmp_path / "cache"), registry


def _state(registry: TaskRegistry, artifacts: Path, skip: str | None = None) -> dict:
    """Everything a failed onboarding must leave as it was (records without bookkeeping fields)."""
    snap = registry.snapshot()
    strip = lambda rec: {k: v for k, v in asdict(rec).items() if k not in ("revision", "updated_at")}  # noqa: E731
    stats = artifacts / "stats" / "store.json"
    return {
        "tasks": {n: strip(t) for n, t in snap.tasks.items() if n != skip},
        "clusters": {c: strip(r) for c, r in snap.clusters.items()},
        "base": strip(snap.base_version) if snap.base_version else None,
        "bases": sorted((b.version, b.uri) for b in registry.list_base_versions()),
        "dirs": sorted(str(v) for kind in ("tasks", "clusters") for d in sorted((artifacts / kind).glob("*"))
                       for v in list_versions(artifacts, kind, d.name)) + [str(v) for v in list_versions(artifacts, "bases")],
        "stats": _stats_state(stats.parent) if stats.is_file() else None,
    }


def _stats_state(root: Path) -> dict:
    """The statistics store's whole manifest, after checking that every file it names is there and
    holds what its record says (the calibration sample's digest)."""
    from inlaid_ray.quant.calibration import sequences_digest

    store = StatsStore.open(root)
    for name, record in store.tasks.items():
        assert sequences_digest(store.calibration(name)) == record.calibration_hash, name
    for gid in store.manifest["generations"]:
        assert (root / "aggregates" / gid / "layer_000.safetensors").is_file(), gid
    return store.manifest


def test_registry_stage_activate_and_rollback(redis_client):
    reg = TaskRegistry(redis_client, "t" + uuid.uuid4().hex[:10])
    reg.upsert_cluster(ClusterRecord("c0", bank_uri="/banks/c0/v1", version=1, members=("old",)))
    before = reg.snapshot()
    task = reg.begin_onboarding(TaskRecord(name="new", tenant="acme", adapter_uri="/src"))
    staged = stage_onboarding(reg, replace(task, adapter_uri="/art/new/v1"),
                              ClusterRecord("c0", bank_uri="/banks/c0/v2", version=2, members=("old",)),
                              BaseVersion(1, "/bases/v1"), previous_base=BaseVersion(0, "/fp16", quant_method="none"))
    snap = reg.snapshot()
    assert snap.tasks["new"].status == "onboarding" and snap.tasks["new"].cluster == "c0"
    assert snap.tasks["new"].adapter_uri == "/art/new/v1"
    assert snap.clusters["c0"].members == ("new", "old") and snap.clusters["c0"].bank_uri == "/banks/c0/v2"
    assert snap.base_version.uri == "/bases/v1" and [b.version for b in reg.list_base_versions()] == [0, 1]
    # Rolled back: the task failed, cluster and base exactly as before (no current base, no versions).
    failed = rollback_onboarding(reg, "new", task.version, "probe: boom", staged)
    assert failed.status == "failed" and failed.extra["error"] == "probe: boom" and failed.cluster is None
    after = reg.snapshot()
    assert after.clusters["c0"] == replace(before.clusters["c0"], updated_at=after.clusters["c0"].updated_at,
                                           revision=after.clusters["c0"].revision)
    assert after.base_version is None and reg.list_base_versions() == []
    # A second attempt stages and goes live; rollback of the stale first attempt cannot touch it.
    again = reg.begin_onboarding(TaskRecord(name="new", tenant="acme", adapter_uri="/src"))
    assert again.version == task.version + 1
    staged2 = stage_onboarding(reg, again, ClusterRecord("c0", bank_uri="/banks/c0/v2b", version=2, members=("old",)))
    assert activate_onboarding(reg, "new", task.version) is None  # the old attempt's version
    live = activate_onboarding(reg, "new", again.version)
    assert live.status == "live" and reg.snapshot().clusters["c0"].bank_uri == "/banks/c0/v2b"
    assert rollback_onboarding(reg, "new", task.version, "late", None) is None
    assert reg.get_task("new").status == "live"
    assert staged2.cluster.members == ("new", "old")


def test_artifact_versions_appear_whole_or_not_at_all(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.building("tasks", "x", 3) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")
        assert list_versions(tmp_path, "tasks", "x") == []  # still hidden while being written
    final = store.published[-1]
    assert final.name.startswith("v0003-") and (final / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError):
        with store.building("tasks", "x", 4) as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("h")
            raise RuntimeError("crash while writing")
    assert list_versions(tmp_path, "tasks", "x") == [final]  # nothing of the failed version, no temp left
    assert sorted(p.name for p in (tmp_path / "tasks" / "x").iterdir()) == [final.name]
    assert store.discard_published() == [final] and list_versions(tmp_path, "tasks", "x") == []


def test_onboarding_is_incremental_and_equals_full_mlgptq(tiny, tmp_path, redis_client):
    root, base, sources, twin = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    artifacts = Path(opts.artifact_dir)
    first = onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts, settings=settings)
    assert first.status == "live" and first.decision["requantize"]
    assert first.statistics["computed"] == ["qv"] and first.statistics["created_store"]
    second = onboard_task("all", "acme", sources["all"].adapter_dir, sources["all"].calibration, opts, settings=settings)
    assert second.statistics["computed"] == ["all"]  # only the new task's forward passes
    assert second.decision["requantize"] and second.decision["num_changed"] >= 1
    assert second.decision["changed_layers"]  # e.g. {"attn_in": "0-1", ...}
    snap = reg.snapshot()
    assert snap.base_version.version == 2 and snap.tasks["all"].status == "live"
    # the store keeps one generation of aggregates after a finished job: the base's (no undo pending)
    store = StatsStore.open(artifacts / "stats")
    assert store.manifest["current"] == store.manifest["quantized_from"] and len(store.manifest["generations"]) == 1
    assert second.statistics["store_bytes"]["per_task_max"] < 4 * TOKENS + 1024  # a calibration sample, no Hessians
    # The job's base equals MLGPTQ over both tasks computed from scratch, bit for bit.
    cfg = MLGPTQConfig(method=DEFAULT_SHARED_METHOD, grid=QuantGrid(bits=4, group_size=GROUP_SIZE))  # the job's default
    full = quantize_base(base, [sources["qv"], sources["all"]], tmp_path / "full", cfg,
                         CalibrationConfig(tokens_per_task=TOKENS, max_seq_len=opts.calib_max_seq_len), progress=False)
    assert full["tasks"] == ["all", "qv"]
    same, diffs = checkpoints_identical(snap.base_version.uri, tmp_path / "full")
    assert same, diffs
    # Every task and cluster points at published, complete artifact versions.
    for t in snap.tasks.values():
        assert Path(t.adapter_uri).parent.parent == artifacts / "tasks" and (Path(t.adapter_uri) / "calibration.jsonl").is_file()
    assert all(Path(c.bank_uri, "index.json").is_file() for c in snap.clusters.values())
    # A compatible adapter joins the cluster of "all" (same modules, within the error budget after refit);
    # a cluster the deployment serves compressed stays compressed, now from the new bank version.
    joined = snap.clusters[snap.tasks["all"].cluster]
    reg.upsert_cluster(replace(joined, format="jd_bank"))
    third = onboard_task("all2", "acme", twin, sources["all"].calibration, opts, settings=settings)
    snap = reg.snapshot()
    assert third.cluster["cluster"] == snap.tasks["all"].cluster == snap.tasks["all2"].cluster
    assert not third.cluster["created"] and third.cluster["version"] == 2
    cluster = snap.clusters[snap.tasks["all"].cluster]
    assert set(cluster.members) == {"all", "all2"}
    assert cluster.format == "jd_bank" and cluster.bank_uri == third.artifacts["cluster_bank"] != joined.bank_uri
    # Re-onboarding a live task is refused without touching anything.
    state = _state(reg, artifacts)
    with pytest.raises(OnboardingFailed, match="is live"):
        onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts, settings=settings)
    assert _state(reg, artifacts) == state


@pytest.mark.parametrize("method", ["mlgptq-channel", "mlgptq"])
def test_unchanged_statistics_or_requantize_never_keep_the_base(tiny, tmp_path, redis_client, method):
    root, base, sources, _ = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    opts = opts.model_copy(update={"quant_method": method})
    small = write_calibration(tmp_path / "small.jsonl", list(TASKS["qv"][3]), 2, seed=5)  # < TOKENS: all of it is used
    onboard_task("qv", "acme", sources["qv"].adapter_dir, small, opts, settings=settings)
    assert reg.snapshot().base_version.version == 1
    # The same adapter on the same tokens under another name moves no aggregate entry: base kept.
    same = onboard_task("qv-copy", "acme", sources["qv"].adapter_dir, small, opts, settings=settings)
    assert same.statistics["computed"] == ["qv-copy"]
    assert not same.decision["requantize"] and same.decision["num_changed"] == 0, same.decision
    assert reg.snapshot().base_version.version == 1
    # A different task changes the aggregate, but requantize=never only stores its statistics.
    never = onboard_task("mlp", "acme", sources["mlp"].adapter_dir, sources["mlp"].calibration,
                         opts.model_copy(update={"requantize": "never"}), settings=settings)
    assert not never.decision["requantize"] and never.decision["num_changed"] > 0
    assert never.statistics["computed"] == ["mlp"] and reg.snapshot().base_version.version == 1
    assert sorted(StatsStore.open(Path(opts.artifact_dir) / "stats").tasks) == ["mlp", "qv", "qv-copy"]


@pytest.mark.parametrize("method", ["mlgptq-channel", "gptq-mixed"])
def test_an_identical_task_never_changes_the_base(tiny, tmp_path, redis_client, method):
    """A copy of a live task (same adapter, same calibration file, under another name) reuses its
    statistics without a forward pass and moves no aggregate, even for the token-weighted methods
    where a second copy would otherwise double the task's weight; the base stays, and a full run
    over all three tasks gives that same base."""
    root, base, sources, _ = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    opts = opts.model_copy(update={"quant_method": method})
    for name in ("qv", "mlp"):
        onboard_task(name, "acme", sources[name].adapter_dir, sources[name].calibration, opts, settings=settings)
    base_v2 = reg.snapshot().base_version
    assert base_v2.version == 2
    copy = onboard_task("qv-copy", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts,
                        settings=settings)
    assert copy.statistics["computed"] == ["qv-copy"] and copy.statistics["copied"] == {"qv-copy": "qv"}
    assert not copy.decision["requantize"] and copy.decision["num_changed"] == 0, copy.decision
    assert reg.snapshot().base_version == base_v2 and reg.snapshot().tasks["qv-copy"].status == "live"
    cfg = MLGPTQConfig(method=method, grid=QuantGrid(bits=4, group_size=GROUP_SIZE))
    copy_source = replace(sources["qv"], name="qv-copy")
    full = quantize_base(base, [copy_source, sources["mlp"], sources["qv"]], tmp_path / "full", cfg,
                         CalibrationConfig(tokens_per_task=TOKENS, max_seq_len=opts.calib_max_seq_len), progress=False)
    assert full["copied_tasks"] == {"qv": "qv-copy"}  # here the copy was computed and qv copied it
    weights = lambda d: {k: v for k, v in load_file(str(Path(d) / "model.safetensors")).items()}  # noqa: E731
    got, want = weights(base_v2.uri), weights(tmp_path / "full")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_undo_of_a_failed_re_onboarding_keeps_the_store_consistent(tiny, tmp_path, redis_client):
    """Re-onboarding a retired task under its name with other data, crashing after the statistics
    step: the undo brings back the manifest, whose files were never overwritten; the next job
    drops the failed task's old statistics (it is not served) and re-quantizes for the live ones."""
    root, base, sources = tiny[:3]
    opts, settings, reg = _env(tmp_path, redis_client, base)
    artifacts = Path(opts.artifact_dir)
    for name in ("qv", "mlp"):
        onboard_task(name, "acme", sources[name].adapter_dir, sources[name].calibration, opts, settings=settings)
    retire_task(reg, "qv")
    before = _stats_state(artifacts / "stats")

    def crash(step: str) -> None:
        if step == "statistics":
            raise RuntimeError("injected crash")

    with pytest.raises(OnboardingFailed):
        onboard_task("qv", "acme", sources["all"].adapter_dir, sources["all"].calibration, opts, settings=settings,
                     fault=crash)
    assert _stats_state(artifacts / "stats") == before
    third = onboard_task("all", "acme", sources["all"].adapter_dir, sources["all"].calibration, opts,
                         settings=settings)
    assert third.statistics["dropped"] == ["qv"] and third.statistics["store_tasks"] == ["all", "mlp"]
    assert third.decision["requantize"] and _stats_state(artifacts / "stats")["tasks"].keys() == {"all", "mlp"}


def test_unscorable_held_out_data_is_refused_before_anything_is_written(tiny, tmp_path, redis_client):
    root, base, sources = tiny[:3]
    opts, settings, reg = _env(tmp_path, redis_client, base)
    held = tmp_path / "eval.jsonl"  # the answer starts after the first 8 tokens, where records are cut
    held.write_text(json.dumps({"messages": [{"role": "user", "content": "the task is a good sample word"},
                                             {"role": "assistant", "content": "good"}]}) + "\n")
    with pytest.raises(OnboardingFailed, match="no record has an answer token within the first 8") as info:
        onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration,
                     opts.model_copy(update={"eval_data": str(held), "calib_max_seq_len": 8}), settings=settings)
    assert info.value.step == "validate" and reg.get_task("qv") is None


def test_a_batch_job_quantizes_once_and_equals_a_full_run(tiny, tmp_path, redis_client):
    """`onboard_tasks`: three tasks in one job share one statistics step and ONE new base (equal,
    bit for bit, to a full MLGPTQ run over them), and each gets its own cluster, record and report."""
    from inlaid_ray.jobs.onboard import TaskSpec, onboard_tasks

    root, base, sources = tiny[:3]
    opts, settings, reg = _env(tmp_path, redis_client, base)
    specs = [TaskSpec(n, "acme", sources[n].adapter_dir, sources[n].calibration) for n in ("qv", "all", "mlp")]
    reports = onboard_tasks(specs, opts, settings=settings)
    assert [r.task for r in reports] == ["qv", "all", "mlp"] and all(r.status == "live" for r in reports)
    assert reports[0].statistics["computed"] == ["all", "mlp", "qv"] and reports[0].quantization["version"] == 1
    snap = reg.snapshot()
    assert snap.base_version.version == 1 and [b.version for b in reg.list_base_versions()] == [0, 1]  # 0: fp16
    assert all(snap.tasks[n].status == "live" and snap.tasks[n].cluster for n in ("qv", "all", "mlp"))
    assert {"register", "cluster", "stage", "statistics", "quantize"} <= set(reports[2].steps)
    cfg = MLGPTQConfig(method=DEFAULT_SHARED_METHOD, grid=QuantGrid(bits=4, group_size=GROUP_SIZE))
    quantize_base(base, [sources[n] for n in ("qv", "all", "mlp")], tmp_path / "full", cfg,
                  CalibrationConfig(tokens_per_task=TOKENS, max_seq_len=opts.calib_max_seq_len), progress=False)
    same, diffs = checkpoints_identical(snap.base_version.uri, tmp_path / "full")
    assert same, diffs


def test_cli_batch_prints_one_report_per_task(tiny, tmp_path, redis_client, capsys, monkeypatch):
    from inlaid_ray.cli import main

    root, base, sources = tiny[:3]
    opts, settings, reg = _env(tmp_path, redis_client, base)
    batch = tmp_path / "tasks.jsonl"
    batch.write_text("".join(json.dumps({"task": n, "tenant": "acme", "adapter": str(sources[n].adapter_dir),
                                         "calib": str(sources[n].calibration)}) + "\n" for n in ("qv", "mlp")))
    monkeypatch.setenv("INLAID_CACHE_DIR", str(tmp_path / "cache"))
    sigterm = signal.getsignal(signal.SIGTERM)  # the command installs its own (a job stop rolls back)
    try:
        rc = main(["onboard", "--batch", str(batch), "--base-dir", str(base), "--artifact-dir", opts.artifact_dir,
                   "--data-dir", opts.data_dir, "--namespace", opts.namespace, "--endpoint", "none", "--no-ray",
                   "--no-progress", "--tokens-per-task", str(TOKENS), "--max-delta-ratio", str(opts.max_delta_ratio)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(out[out.index("["):])
    assert [r["task"] for r in data] == ["qv", "mlp"] and all(r["status"] == "live" for r in data)
    assert data[0]["quantization"]["version"] == data[1]["quantization"]["version"] == 1


def test_a_failed_batch_job_rolls_every_task_back(tiny, tmp_path, redis_client):
    from inlaid_ray.jobs.onboard import TaskSpec, onboard_tasks

    root, base, sources, twin = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    onboard_task("mlp", "acme", sources["mlp"].adapter_dir, sources["mlp"].calibration, opts, settings=settings)
    artifacts = Path(opts.artifact_dir)
    before = _state(reg, artifacts)
    staged = []

    def crash(step: str) -> None:  # after the first of the two tasks was staged
        if step == "stage":
            staged.append(step)
            raise RuntimeError("injected crash")

    specs = [TaskSpec("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration),
             TaskSpec("all", "acme", sources["all"].adapter_dir, sources["all"].calibration)]
    with pytest.raises(OnboardingFailed, match="tasks \\['qv', 'all'\\] failed at step 'stage'") as info:
        onboard_tasks(specs, opts, settings=settings, fault=crash)
    assert staged == ["stage"] and len(info.value.reports) == 2
    assert all(r.rollback and all(x.endswith(": ok") for x in r.rollback) for r in info.value.reports)
    after = _state(reg, artifacts)
    assert {n: t["status"] for n, t in after.pop("tasks").items()} == {"mlp": "live", "qv": "failed", "all": "failed"}
    before.pop("tasks")
    assert after == before


def test_a_statistics_store_of_an_older_format_is_set_aside(tiny, tmp_path, redis_client):
    """A store an older inlaid-ray wrote (format 1) does not stop onboarding: it is moved aside and
    the job starts a new store."""
    root, base, sources = tiny[:3]
    opts, settings, reg = _env(tmp_path, redis_client, base)
    old = Path(opts.artifact_dir) / "stats"
    old.mkdir(parents=True)
    (old / "store.json").write_text(json.dumps({"format": "inlaid-ray-mlgptq-stats", "version": 1, "tasks": {}}))
    report = onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts, settings=settings)
    assert report.status == "live" and report.statistics["created_store"]
    assert StatsStore.open(old).tasks.keys() == {"qv"}
    assert [p.name.startswith("stats.v1-") for p in old.parent.iterdir() if p.name.startswith("stats.")] == [True]


def _greedy_examples(base: Path, adapter: Path, words: list[str], out: Path, seed: int) -> Path:
    """Held-out text the unquantized base with `adapter` continues greedily (transformers + PEFT):
    every target is that model's own top choice, which a coarser base scores worse."""
    import random

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    rng = random.Random(seed)
    with out.open("w") as f:
        for _ in range(6):
            ids = tok(rng.choice(words), return_tensors="pt")["input_ids"]  # one word: the rest is the model's
            with torch.no_grad():
                gen = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False, pad_token_id=2,
                                     bad_words_ids=[[i] for i in (0, 1, 2, *range(len(tok), model.config.vocab_size))])
            f.write(json.dumps({"text": tok.decode(gen[0], skip_special_tokens=True)}) + "\n")
    return out


def test_rollout_gate_keeps_the_base_when_a_live_task_would_lose(tmp_path, redis_client):
    """A candidate base is scored on every live task's held-out examples: refused (the task still
    goes live, on the current base; the candidate's directory is removed) when a task's loss rises
    by more than the margin, accepted otherwise. The losses it reports are transformers + PEFT's."""
    from test_heldout import reference_loss

    # A base with confident predictions (the shared tiny one is near-uniform: on it quantization
    # noise may as well lower a loss), its own adapters and calibration files.
    base = write_tiny_base(tmp_path / "sharp", seed=7, initializer_range=0.3)
    sources = {s.name: s for s in make_task_sources(tmp_path, base)}
    opts, settings, reg = _env(tmp_path, redis_client, base)
    artifacts = Path(opts.artifact_dir)
    held = {n: _greedy_examples(base, sources[n].adapter_dir, list(TASKS[n][3]), tmp_path / f"eval_{n}.jsonl", seed=i)
            for i, n in enumerate(("qv", "mlp"))}
    # qv goes live on the unquantized base, with held-out examples
    onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration,
                 opts.model_copy(update={"requantize": "never", "eval_data": str(held["qv"])}), settings=settings)
    assert reg.snapshot().tasks["qv"].extra["eval_uri"].endswith("eval.jsonl")
    # A 2-bit candidate with no margin at all: qv's held-out loss rises, so the base stays.
    strict = opts.model_copy(update={"bits": 2, "gate_max_loss_increase": 0.0, "eval_data": str(held["mlp"])})
    refused = onboard_task("mlp", "acme", sources["mlp"].adapter_dir, sources["mlp"].calibration, strict,
                           settings=settings)
    gate = refused.gate
    assert refused.status == "live" and refused.decision["requantize"] and not gate["passed"], gate
    assert gate["tasks"]["qv"]["gated"] and gate["tasks"]["qv"]["increase"] > 0 and "qv" in gate["reason"]
    assert not gate["tasks"]["mlp"]["gated"] and gate["unchecked"] == []
    assert "base" not in refused.artifacts and list_versions(artifacts, "bases") == []
    snap = reg.snapshot()
    assert snap.tasks["mlp"].status == "live" and (snap.base_version is None or snap.base_version.quant_method == "none")
    assert "mlp" in StatsStore.open(artifacts / "stats").tasks  # the next re-quantization includes it
    # the gate's numbers for the current (unquantized) base are transformers + PEFT's
    want = reference_loss(base, sources["qv"].adapter_dir, held["qv"])[0]
    assert gate["tasks"]["qv"]["current"] == pytest.approx(want, rel=1e-5)
    # A wide margin accepts the next candidate; both live tasks are scored ("all" brought no held-out data).
    accepted = onboard_task("all", "acme", sources["all"].adapter_dir, sources["all"].calibration,
                            opts.model_copy(update={"gate_max_loss_increase": 100.0}), settings=settings)
    assert accepted.gate["passed"] and set(accepted.gate["tasks"]) == {"qv", "mlp"}, accepted.gate
    assert accepted.gate["unchecked"] == [] and reg.snapshot().base_version.version == 1
    assert reg.snapshot().base_version.uri == accepted.artifacts["base"]
    assert not any(t["current_cached"] for t in accepted.gate["tasks"].values())
    # The live base's losses were kept beside it: the next gate reads them instead of scoring it again.
    again = onboard_task("all-again", "acme", sources["all"].adapter_dir, sources["all"].calibration,
                         opts.model_copy(update={"gate_max_loss_increase": 100.0, "requantize": "always"}),
                         settings=settings)
    for name in ("qv", "mlp"):
        assert again.gate["tasks"][name]["current_cached"], again.gate
        assert again.gate["tasks"][name]["current"] == accepted.gate["tasks"][name]["candidate"]


def test_auto_method_follows_the_current_base(tiny, tmp_path, redis_client):
    root, base, sources, _ = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    other = "mlgptq-channel"
    assert other != DEFAULT_SHARED_METHOD
    onboard_task("mlp", "acme", sources["mlp"].adapter_dir, sources["mlp"].calibration,
                 opts.model_copy(update={"quant_method": other}), settings=settings)
    second = onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts, settings=settings)
    assert second.quantization["method"] == other and second.decision["requantize"]
    base_v2 = reg.snapshot().base_version
    assert base_v2.version == 2 and base_v2.quant_method == other
    cfg = MLGPTQConfig(method=other, grid=QuantGrid(bits=4, group_size=GROUP_SIZE))
    quantize_base(base, [sources["mlp"], sources["qv"]], tmp_path / "full", cfg,
                  CalibrationConfig(tokens_per_task=TOKENS, max_seq_len=opts.calib_max_seq_len), progress=False)
    same, diffs = checkpoints_identical(base_v2.uri, tmp_path / "full")
    assert same, diffs


def test_retired_task_statistics_leave_the_store_and_the_next_base(tiny, tmp_path, redis_client):
    """A retired task no longer shapes the shared base: the next onboarding drops its statistics
    and re-quantizes for the tasks still served, equal to a full run over exactly those."""
    root, base, sources, _ = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    for name in ("qv", "all"):
        onboard_task(name, "acme", sources[name].adapter_dir, sources[name].calibration, opts, settings=settings)
    assert retire_task(reg, "all")["changed"]
    third = onboard_task("mlp", "acme", sources["mlp"].adapter_dir, sources["mlp"].calibration, opts, settings=settings)
    assert third.statistics["dropped"] == ["all"] and third.statistics["store_tasks"] == ["mlp", "qv"]
    assert third.decision["requantize"]
    snap = reg.snapshot()
    assert snap.base_version.version == 3 and snap.tasks["all"].status == "retired"
    cfg = MLGPTQConfig(method=DEFAULT_SHARED_METHOD, grid=QuantGrid(bits=4, group_size=GROUP_SIZE))
    quantize_base(base, [sources["mlp"], sources["qv"]], tmp_path / "full", cfg,
                  CalibrationConfig(tokens_per_task=TOKENS, max_seq_len=opts.calib_max_seq_len), progress=False)
    same, diffs = checkpoints_identical(snap.base_version.uri, tmp_path / "full")
    assert same, diffs


@pytest.mark.parametrize("heartbeat_s, reclaimed", [(0.05, False), (5.0, True)])
def test_heartbeat_keeps_a_running_job_from_being_reclaimed(tiny, tmp_path, redis_client, heartbeat_s, reclaimed):
    """A second job reclaims records older than 0.6 s while the first is still computing statistics
    (1.2 s): with a 0.05 s heartbeat the running job's record stays fresh (12 beats of margin, for a
    loaded CI box) and it goes live; with beats too rare to help (5 s) the reclaim fails it and it
    rolls back."""
    root, base, sources, _ = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    opts = opts.model_copy(update={"heartbeat_s": heartbeat_s})
    seen = {}

    def slow_statistics(step: str) -> None:
        if step == "statistics":
            time.sleep(1.2)
            seen["reclaim"] = fail_stale_onboarding(reg, "qv", 0.6, "onboarding job vanished (reclaimed)")

    if reclaimed:
        with pytest.raises(OnboardingFailed, match="left onboarding"):
            onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts, settings=settings,
                         fault=slow_statistics)
        assert seen["reclaim"] is not None and reg.get_task("qv").status == "failed"
    else:
        report = onboard_task("qv", "acme", sources["qv"].adapter_dir, sources["qv"].calibration, opts,
                              settings=settings, fault=slow_statistics)
        assert seen["reclaim"] is None and report.status == "live" and reg.get_task("qv").status == "live"
    with pytest.raises(ValueError, match="reclaim_stale_s=10.0 must be >= 2 x heartbeat_s=30.0"):
        OnboardOptions(reclaim_stale_s=10.0)


def _huge_adapter(src: Path, out: Path) -> Path:
    """Finite but absurd: every lora_B entry 60000.0."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: v.fill_(60000.0) if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out


VALIDATION_FAULTS = ["corrupt", "calib", "huge", "role", "tenant", "reserved", "name"]


def _corrupt_adapter(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated file
    return out


@pytest.mark.parametrize("fault_at", [s for s in STEPS if s not in ("validate", "activate")] + VALIDATION_FAULTS)
def test_failed_onboarding_leaves_everything_as_it_was(tiny, tmp_path, redis_client, fault_at):
    root, base, sources, twin = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    onboard_task("all", "acme", sources["all"].adapter_dir, sources["all"].calibration,
                 opts.model_copy(update={"requantize": "never"}), settings=settings)  # a live task, its stats, no GPTQ
    artifacts = Path(opts.artifact_dir)
    before = _state(reg, artifacts)
    adapter, calib, name, tenant = twin, sources["all"].calibration, "all2", "acme"
    fault = None
    if fault_at == "corrupt":
        adapter = _corrupt_adapter(twin, tmp_path / "corrupt")
    elif fault_at == "calib":
        calib = write_calibration(tmp_path / "calib.jsonl", ["a", "b"], 3, seed=0, shape="prompt")
        calib.write_text(calib.read_text().replace('"completion"', '"answer"'))  # unknown record shape
    elif fault_at == "huge":
        adapter = _huge_adapter(twin, tmp_path / "huge")
    elif fault_at == "role":
        calib = write_calibration(tmp_path / "calib.jsonl", ["a", "b"], 3, seed=0, shape="messages")
        calib.write_text(calib.read_text().replace('"user"', '"hacker"'))  # not a role the template knows
    elif fault_at == "tenant":
        tenant = "nobody"
    elif fault_at == "reserved":
        name = base.name.upper()  # the served base model id, in any case
    elif fault_at == "name":
        name = "../../etc/passwd"
    else:
        def fault(step: str) -> None:
            if step == fault_at:
                raise RuntimeError(f"injected crash after {step}")
    with pytest.raises(OnboardingFailed) as info:
        onboard_task(name, tenant, adapter, calib, opts.model_copy(update={"requantize": "always"}),
                     settings=settings, fault=fault)
    if fault_at in VALIDATION_FAULTS:
        assert info.value.step == "validate" and info.value.report.status == "failed"
        if fault_at != "tenant":
            cause = AdapterError if fault_at in ("corrupt", "huge") else InvalidRequest
            assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
        assert reg.get_task(name) is None  # never registered
    else:
        assert info.value.step == fault_at and "injected crash" in str(info.value)
        failed = reg.get_task("all2")
        assert failed.status == "failed" and "injected crash" in failed.extra["error"] and failed.cluster is None
        assert all(r.endswith(": ok") for r in info.value.report.rollback), info.value.report.rollback
    assert _state(reg, artifacts, skip="all2") == before
    store = StatsStore.open(artifacts / "stats")
    assert "all2" not in store.tasks and store.tasks.keys() == {"all"}


@pytest.mark.slow  # a CLI process per case
@pytest.mark.parametrize("task,tenant,why", [("acme;rm", "acme", "invalid task name"),
                                             ("ok-task", "nobody", "tenant 'nobody' does not exist")])
def test_cli_user_error_is_one_line_exit_2_and_a_report_file(tiny, tmp_path, redis_client, task, tenant, why):
    import subprocess
    import sys

    root, base, sources, twin = tiny
    opts, settings, reg = _env(tmp_path, redis_client, base)
    proc = subprocess.run(
        [sys.executable, "-m", "inlaid_ray.cli", "onboard", "--task", task, "--tenant", tenant,
         "--adapter", str(twin), "--calib", str(sources["all"].calibration), "--base-dir", str(base),
         "--artifact-dir", opts.artifact_dir, "--data-dir", opts.data_dir, "--namespace", opts.namespace,
         "--endpoint", "none", "--no-ray", "--no-progress", "--tokens-per-task", str(TOKENS),
         "--max-delta-ratio", str(opts.max_delta_ratio)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "INLAID_CACHE_DIR": str(tmp_path)})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and why in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout == ""
    report = Path(errors[0].rsplit("(report: ", 1)[1].rstrip(")"))
    assert report.parent == tmp_path / "reports"
    data = json.loads(report.read_text())
    assert data["status"] == "failed" and data["step"] == "validate" and why in data["error"]
    assert reg.get_task(task) is None
