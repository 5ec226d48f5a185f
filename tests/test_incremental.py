"""Incremental MLGPTQ (docs/algorithms.md 6.3): adding tasks to a statistics store computes only the new
tasks' Hessians and gives a checkpoint bit-identical to a full run over all tasks; the store keeps
per task only its calibration sample (its aggregates are checked against the max and the
token-weighted mean of Hessians computed by hooks), refuses another base or other settings, and
a changed adapter or a dropped task rebuilds the aggregates from the remaining tasks."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.incremental import (
    checkpoints_identical,
    compute_missing_stats,
    measure_incremental_vs_full,
    quantize_base,
)
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.quant.mlgptq import MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore
from test_mlgptq_setup import GROUP_SIZE, make_peft_adapter, make_task_sources, write_tiny_base

CFG = MLGPTQConfig(grid=QuantGrid(bits=4, group_size=GROUP_SIZE), batch_tokens=96)
CALIB = CalibrationConfig(tokens_per_task=150)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    base = write_tiny_base(root / "base")
    sources = make_task_sources(root, base)
    quantize_base(base, sources, root / "full", CFG, CALIB, root / "full_stats", progress=False)
    return root, base, sources


def test_adding_one_task_equals_full_run(setup):
    root, base, sources = setup
    first = quantize_base(base, sources[:2], root / "inc_a", CFG, CALIB, root / "inc_stats", progress=False)
    assert first["computed_tasks"] == sorted(s.name for s in sources[:2])
    added = quantize_base(base, sources[2:], root / "inc_b", CFG, CALIB, root / "inc_stats", progress=False)
    assert added["computed_tasks"] == [sources[2].name]  # only the new task's statistics
    assert added["tasks"] == sorted(s.name for s in sources)
    same, diffs = checkpoints_identical(root / "full", root / "inc_b")
    assert same, diffs
    store = StatsStore.open(root / "inc_stats")
    full = StatsStore.open(root / "full_stats")
    for layer in range(store.num_layers):  # the running aggregates equal those over all tasks at once
        for g, h in full.aggregate_layer(layer).items():
            assert torch.equal(store.aggregate_layer(layer)[g], h), (layer, g)
    # The intermediate checkpoint (2 tasks) is a different base: the new task changed the aggregate.
    assert not checkpoints_identical(root / "inc_a", root / "inc_b")[0]


def test_adding_tasks_in_another_order_and_re_adding_is_a_no_op(setup):
    root, base, sources = setup
    stats = root / "order_stats"
    quantize_base(base, [sources[2]], root / "o1", CFG, CALIB, stats, progress=False)
    rep = quantize_base(base, [sources[0], sources[1], sources[2]], root / "o2", CFG, CALIB, stats, progress=False)
    assert rep["computed_tasks"] == sorted(s.name for s in sources[:2])
    assert checkpoints_identical(root / "full", root / "o2")[0]
    again = quantize_base(base, sources, root / "o3", CFG, CALIB, stats, progress=False)
    assert again["computed_tasks"] == []
    assert checkpoints_identical(root / "full", root / "o3")[0]


def test_changed_adapter_replaces_its_statistics_and_rebuilds_the_max(setup):
    root, base, sources = setup
    stats = root / "chg_stats"
    shutil.copytree(root / "full_stats", stats)
    new_adapter = make_peft_adapter(base, root / "adapter_qv_v2", 4, 8, ["q_proj", "v_proj"], seed=7)
    changed = [s if s.name != "qv" else type(s)("qv", new_adapter, s.calibration) for s in sources]
    rep = quantize_base(base, changed[:1], root / "chg", CFG, CALIB, stats, progress=False)
    assert rep["computed_tasks"] == ["qv"] and rep["tasks"] == sorted(s.name for s in sources)
    fresh = quantize_base(base, changed, root / "chg_full", CFG, CALIB, progress=False)
    assert fresh["computed_tasks"] == sorted(s.name for s in sources)
    same, diffs = checkpoints_identical(root / "chg", root / "chg_full")
    assert same, diffs
    assert not checkpoints_identical(root / "chg", root / "full")[0]


def test_store_refuses_other_base_or_settings(setup, tmp_path):
    root, base, sources = setup
    stats = tmp_path / "stats"
    shutil.copytree(root / "full_stats", stats)
    other = write_tiny_base(tmp_path / "other_base", seed=1)
    with pytest.raises(ValueError, match="weights_sha256"):
        quantize_base(other, sources[:1], tmp_path / "x", CFG, CALIB, stats, progress=False)
    with pytest.raises(ValueError, match="batch_tokens"):
        quantize_base(base, sources[:1], tmp_path / "y", MLGPTQConfig(grid=CFG.grid, batch_tokens=64), CALIB, stats,
                      progress=False)
    with pytest.raises(ValueError, match="calibrate_with_adapter"):
        quantize_base(base, sources[:1], tmp_path / "z", MLGPTQConfig(grid=CFG.grid, batch_tokens=96,
                                                                     calibrate_with_adapter=False), CALIB, stats,
                      progress=False)
    manifest = json.loads((stats / "store.json").read_text())
    assert manifest["tasks"].keys() == {s.name for s in sources}
    rec = manifest["tasks"]["qv"]
    assert rec["num_tokens"] == 150 and len(rec["adapter_hash"]) == 64 and len(rec["calibration_hash"]) == 64
    assert manifest["base"]["path"] == str(base.resolve())


@pytest.mark.parametrize("method,keep", [("mlgptq", False), ("mlgptq-channel", False), ("mlgptq-channel", True)])
def test_dropped_task_leaves_aggregates_rebuilt_from_stored_calibration(setup, tmp_path, method, keep):
    """Dropping a task rebuilds the aggregates from the others: a compact store recomputes their
    Hessians from the stored calibration samples and adapters, a keep store reads them. Dropping
    the original of a copied pair leaves the copy (its own sample and adapter path) in. The base
    equals a full run over the remaining tasks."""
    root, base, sources = setup
    cfg = dataclasses.replace(CFG, method=method)
    copy = dataclasses.replace(sources[0], name="qv2")
    quantize_base(base, [*sources, copy], tmp_path / "four", cfg, CALIB, tmp_path / "stats", progress=False,
                  keep_task_hessians=keep)
    store = StatsStore.open(tmp_path / "stats")
    assert store.keep_task_hessians == keep and store.aggregate_tasks == sorted(s.name for s in [*sources, copy])
    before = {n: store.task_dir(n) for n in store.tasks}
    stored = compute_missing_stats(load_base(base), store, [], CFG, progress=False, drop=["mlp", "qv"])
    assert stored == {} and store.aggregate_tasks == sorted(store.tasks) == ["all", "qv2"]
    assert all(store.task_dir(n) == before[n] and before[n].is_dir() for n in store.tasks)  # files kept in place
    quantize_base(base, [], tmp_path / "two", cfg, CALIB, tmp_path / "stats", progress=False)
    quantize_base(base, [sources[1], copy], tmp_path / "two_full", cfg, CALIB, progress=False)
    same, diffs = checkpoints_identical(tmp_path / "two", tmp_path / "two_full")
    assert same, diffs
    store.forget_previous()  # nothing rolls back: the dropped tasks' files go
    assert sorted(d.name.split(".")[0] for d in (tmp_path / "stats" / "tasks").iterdir()) == ["all", "qv2"]


def test_aggregates_match_hook_hessians_and_bytes_per_task(setup, tmp_path):
    """The running aggregates against each task's own Hessians (a keep store holds them; their
    collection is checked against PEFT + hooks in test_mlgptq.py): the element-wise max, the
    token-weighted mean (an fp64 reference sum) and the max diagonal; a compact store over the
    same tasks has the same aggregates. Its bytes per task are the calibration sample: 4 bytes a
    token plus a small header."""
    root, base, sources = setup
    quantize_base(base, sources, tmp_path / "k", CFG, CALIB, tmp_path / "keep", progress=False,
                  keep_task_hessians=True)
    keep = StatsStore.open(tmp_path / "keep")
    names = sorted(keep.tasks)
    weights = {n: keep.tasks[n].num_tokens for n in names}
    for layer in range(keep.num_layers):
        own = {n: keep.task_layer(n, layer) for n in names}
        for g, h in keep.method_hessians("mlgptq", layer).items():
            assert torch.equal(h, torch.stack([own[n][g] for n in names]).amax(0))
            mix = sum(weights[n] * own[n][g].double() for n in names) / sum(weights.values())
            torch.testing.assert_close(keep.method_hessians("gptq-mixed", layer)[g].double(), mix, rtol=1e-6, atol=1e-9)
            top = torch.stack([own[n][g].diagonal() for n in names]).amax(0)
            torch.testing.assert_close(keep.method_hessians("mlgptq-channel", layer)[g].diagonal(), top, rtol=1e-5,
                                       atol=1e-9)
    full = StatsStore.open(root / "full_stats")  # compact, the same tasks and settings
    for layer in range(keep.num_layers):
        for g, h in keep.aggregate_layer(layer).items():
            assert torch.equal(full.aggregate_layer(layer)[g], h)
    used = full.bytes_used()
    assert used["tasks"] == 3 and used["per_task_max"] < 4 * 150 + 1024  # 150 tokens per task
    on_disk = sum(f.stat().st_size for f in (root / "full_stats").rglob("*") if f.is_file())
    assert used["total"] == on_disk  # every byte the store holds, counted from the directory itself


def test_measure_reports_exactness_time_and_memory(setup, tmp_path):
    root, base, sources = setup
    out = measure_incremental_vs_full(base, sources, tmp_path / "work", CFG, CALIB, progress=False)
    assert [r["num_tasks"] for r in out["rows"]] == [2, 3]
    for row in out["rows"]:
        assert row["bit_exact"], row["differences"]
        assert row["incremental"]["computed_tasks"] == [row["new_task"]]
        assert len(row["full"]["computed_tasks"]) == row["num_tasks"]
        for side in ("full", "incremental"):
            phases = row[side]["phases"]
            assert {"load", "forward_hessian", "aggregate_quantize", "save"} <= set(phases)
            assert row[side]["total"]["peak_rss_mb"] > 0
    assert not any((tmp_path / "work").iterdir())  # intermediate stores and checkpoints cleaned up


def test_resource_meter_sees_torch_allocations():
    """tracemalloc misses torch's allocator; the RSS sampler must see a 256 MiB tensor.

    Run in a fresh process: inside the suite the allocator can serve the tensor from pages an
    earlier test left resident, and RSS then does not grow at all. The tensor lives for 100
    sampling intervals before it is freed: a sampler only sees peaks that last while its thread
    gets scheduled, and quantization phases hold their buffers for seconds.
    """
    code = (
        "import json, time, torch\n"
        "from inlaid_ray.quant.measure import ResourceMeter\n"
        "meter = ResourceMeter('cpu', interval_s=0.002)\n"
        "with meter.phase('alloc'):\n"
        "    x = torch.ones(64 * 2**20)  # 256 MiB, every page written\n"
        "    time.sleep(0.2)\n"
        "    del x\n"
        "with meter.phase('idle'):\n"
        "    pass\n"
        "print(json.dumps(meter.summary()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["phases"]["alloc"]["rss_growth_mb"] > 200
    assert s["phases"]["idle"]["rss_growth_mb"] < 100
    assert s["total"]["rss_growth_mb"] == s["phases"]["alloc"]["rss_growth_mb"]


def test_cli_adds_a_task_to_a_compact_store_and_keeps_one_generation(setup, tmp_path, capsys):
    """`inlaid-ray quantize --stats-dir` then `--add-task`: the same base as the full run, a store
    holding one generation of aggregates (nothing rolls back to the previous one), and a missing
    store for --add-task is a one-line user error (exit 2)."""
    from inlaid_ray.cli import main

    root, base, sources = setup
    spec = lambda s: f"{s.name}={s.adapter_dir}:{s.calibration}"  # noqa: E731
    common = ["quantize", "--base", str(base), "--method", "mlgptq", "--bits", "4", "--group-size", "32",
              "--batch-tokens", "96", "--tokens-per-task", "150", "--stats-dir", str(tmp_path / "stats")]
    assert main([*common, "--out", str(tmp_path / "a"), *[a for s in sources[:2] for a in ("--task", spec(s))]]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--add-task", spec(sources[2])]) == 0
    assert checkpoints_identical(root / "full", tmp_path / "b")[0]
    store = StatsStore.open(tmp_path / "stats")
    assert len(store.manifest["generations"]) == 1 and len(list((tmp_path / "stats" / "aggregates").iterdir())) == 1
    capsys.readouterr()
    assert main(["quantize", "--base", str(base), "--out", str(tmp_path / "c"), "--stats-dir", str(tmp_path / "none"),
                 "--add-task", spec(sources[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--add-task needs an existing statistics store" in err[0]
