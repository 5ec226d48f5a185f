"""Quantize a base for a set of tasks, computing only the statistics a `StatsStore` lacks
(LoRA-Inlaid section 3, docs/algorithms.md 6.3-6.4 "offline incremental").

`quantize_base` is the one entry point (CLI, load tests, onboarding job): with
activation_source="fp16" it (1) computes the per-task Hessians of tasks not yet in the store
(fp16 base + that task's adapter) and (2) folds them into the store's running aggregates (sum,
element-wise max, diagonal max: stats_store.py), (3) re-runs GPTQ for every Linear from the fp16
weights with the method's aggregate, and (4) writes a GPTQ v1 checkpoint. A full run is the same
call on an empty store, so "incremental == full" holds by construction for the max (associative,
commutative, idempotent) and, while the fp64 sum of fp32 terms stays exact, for the sum-based
aggregates (the conditions are in stats_store.py's docstring); `checkpoints_identical` checks
it bit for bit. `measure_incremental_vs_full` times both for
2..N tasks (the Table 4 analogue).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from inlaid_ray.progress import Progress

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.lora.peft_io import load_peft_adapter
from inlaid_ray.model.config import ModelConfig
from inlaid_ray.model.tokenizer import load_tokenizer
from inlaid_ray.model.transformer import Transformer
from inlaid_ray.quant.calibration import (
    CalibrationSet,
    CalibrationConfig,
    available_tokens,
    build_calibration_sets,
    load_calibration_file,
    resolve_budget,
)
from inlaid_ray.quantized_base.checkpoint import QuantizeConfig, save_gptq_checkpoint
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.quant.measure import ResourceMeter
from inlaid_ray.quant.mlgptq import (
    CalibrationTask,
    MLGPTQConfig,
    PackedLayers,
    aggregate_hessians,
    check_grid_fits,
    collect_task_hessians,
    hessian_weight,
    make_adapter_bank,
    quantize_from_hessians,
    sequential_quantize,
    statistics_hash,
    unquantized_tensors,
)
from inlaid_ray.quant.stats_store import (
    AGGREGATE_METHODS,
    StatsStore,
    TaskRecord,
    base_fingerprint,
    check_task_name,
)

log = logging.getLogger(__name__)
MLGPTQ_META_VERSION = 1


@dataclass(frozen=True)
class TaskSource:
    """A task as the CLI names it: `NAME=ADAPTER_DIR:CALIB.jsonl` (ADAPTER_DIR empty = no adapter)."""

    name: str
    adapter_dir: Path | None
    calibration: Path

    @classmethod
    def parse(cls, spec: str) -> "TaskSource":
        name, sep, rest = spec.partition("=")
        adapter, colon, calib = rest.rpartition(":")
        if not sep or not colon or not name or not calib:
            raise InvalidRequest(f"task spec {spec!r} must look like NAME=ADAPTER_DIR:CALIB.jsonl")
        check_task_name(name)
        return cls(name, Path(adapter) if adapter else None, Path(calib))


def load_tasks(
    sources: Sequence[TaskSource],
    tokenizer: Any,
    model_config: ModelConfig,
    calib_cfg: CalibrationConfig,
    budget: int | None,
    dtype: torch.dtype = torch.float32,
) -> list[CalibrationTask]:
    """Adapters (validated against the base: AdapterError on a shape mismatch) and calibration sets."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"task names must be unique, got {names}")
    adapters = {s.name: load_peft_adapter(s.adapter_dir, model_config, name=s.name, dtype=dtype)
                if s.adapter_dir is not None else None for s in sources}
    calib = build_calibration_sets({s.name: s.calibration for s in sources}, tokenizer, calib_cfg, budget)
    return [CalibrationTask(s.name, adapters[s.name], calib[s.name],
                            str(s.adapter_dir.resolve()) if s.adapter_dir is not None else "") for s in sources]


def resolve_task_budget(sources: Sequence[TaskSource], tokenizer: Any, calib_cfg: CalibrationConfig) -> int:
    """The equal per-task token budget for `sources` (the smallest task's total, or the configured one)."""
    if calib_cfg.tokens_per_task is not None:
        return calib_cfg.tokens_per_task
    avail = {s.name: available_tokens(load_calibration_file(s.calibration, tokenizer), calib_cfg) for s in sources}
    return resolve_budget(avail, calib_cfg)


def hessian_settings(cfg: MLGPTQConfig, calib_cfg: CalibrationConfig, budget: int) -> dict[str, Any]:
    """Everything a stored Hessian depends on besides the base, the adapter and the tokens."""
    return {"calibration": {**calib_cfg.to_dict(), "budget": budget},
            "calibrate_with_adapter": cfg.calibrate_with_adapter, "batch_tokens": cfg.batch_tokens,
            **({"sink_weight": cfg.sink_weight, "sink_tokens": cfg.sink_tokens} if cfg.sink_weight != 1.0 else {}),
            "block_size": cfg.block_size, "dtype": str(cfg.dtype).removeprefix("torch."),
            "device_type": torch.device(cfg.device).type}


def _record(task: CalibrationTask, seed: int, cfg: MLGPTQConfig) -> TaskRecord:
    c = task.calibration
    return TaskRecord(task.name, task.adapter_hash, c.digest, c.num_tokens, c.num_sequences, seed,
                      hessian_weight(c, cfg), task.adapter_path)


def _stored_task(model: Transformer, store: StatsStore, name: str, cfg: MLGPTQConfig) -> CalibrationTask:
    """A stored task as it was calibrated: its sample from the store, its adapter read again from
    where it was recorded (and checked against the recorded hash)."""
    record = store.tasks[name]
    adapter = None
    if record.adapter_hash:
        if not record.adapter_path or not Path(record.adapter_path).is_dir():
            raise FileNotFoundError(f"statistics store {store.root}: rebuilding the aggregates needs task {name!r}'s "
                                    f"adapter, recorded at {record.adapter_path or '(nowhere)'}, which is gone")
        adapter = load_peft_adapter(record.adapter_path, model.config, name=name, dtype=cfg.dtype)
        if statistics_hash(adapter) != record.adapter_hash:
            raise ValueError(f"statistics store {store.root}: the adapter of task {name!r} at {record.adapter_path} "
                             "changed since its statistics were computed")
    calibration = CalibrationSet(name, store.calibration(name))
    if calibration.digest != record.calibration_hash:
        raise ValueError(f"statistics store {store.root}: the stored calibration sample of task {name!r} does not "
                         "match its record")
    return CalibrationTask(name, adapter, calibration, record.adapter_path)


def compute_missing_stats(
    model: Transformer, store: StatsStore, tasks: Sequence[CalibrationTask], cfg: MLGPTQConfig, progress: bool = True,
    drop: Sequence[str] = (),
) -> dict[str, str | None]:
    """Bring the store up to date in one transaction: drop `drop`, add every task of `tasks` it
    lacks (or holds for another adapter / other calibration tokens), and fold them into the
    aggregates. Returns {task added: None, or the covered twin whose statistics it copied}: an
    exact copy (same adapter, same calibration sample) costs no forward pass. Dropping or
    replacing a task rebuilds the aggregates from every remaining one (their stored Hessians, or
    recomputed from their stored calibration and adapters). One adapter in the bank at a time,
    so a task's numbers never depend on which other tasks are present."""
    seed = int(store.settings["calibration"]["seed"])
    todo = [t for t in tasks if not store.has_task(_record(t, seed, cfg))]
    update = store.update(drop=drop, rebuild=any(t.name in store.tasks for t in todo))
    again = [n for n in update.readd if n not in {t.name for t in todo}]
    done: dict[str, str | None] = {}
    recompute = [] if store.keep_task_hessians else store.distinct(again)
    bar = Progress(total=(len(todo) + len(recompute)) * model.config.num_layers, desc="hessians", unit="layer",
                   disable=not progress)
    try:
        for name in again:  # a rebuild: the remaining tasks, from their stored Hessians or recomputed
            record = store.tasks[name]
            fold = update.begin(record, (), readd=True)
            if update.twin_of(record) is not None:
                fold.copy_layers_from(update.twin_of(record))  # a copy: nothing to fold again
            elif store.keep_task_hessians:
                for layer in range(store.num_layers):
                    fold.layer(layer, store.task_layer(name, layer))
            else:
                _collect(model, _stored_task(model, store, name, cfg), cfg, fold, bar)
            fold.done()
        for task in todo:
            record = _record(task, seed, cfg)
            fold = update.begin(record, task.calibration.sequences)
            twin = update.twin_of(record)
            if twin is not None:
                fold.copy_layers_from(twin)
                log.info("task %s: same adapter and calibration sample as %s; its statistics are copied",
                         task.name, twin)
                bar.update(model.config.num_layers)
            else:
                _collect(model, task, cfg, fold, bar)
            fold.done()
            done[task.name] = twin
        update.commit()
    except BaseException:
        update.abort()
        raise
    finally:
        bar.close()
    return dict(sorted(done.items()))


def _collect(model: Transformer, task: CalibrationTask, cfg: MLGPTQConfig, fold: Any, bar: Progress) -> None:
    bar.set_postfix_str(task.name)
    bank, slots = make_adapter_bank(model, [task])
    collect_task_hessians(model, bank, slots.get(task.name, -1), task, cfg, fold.layer, bar)


PER_TASK_METHODS = ("gptq-per-task", "mlgptq-eigenbasis", "mlgptq-normalized")  # need every H_t kept


def _hessians_source(store: StatsStore, method: str, tasks: Sequence[str]) -> Callable[[int], dict[str, torch.Tensor]]:
    if method not in PER_TASK_METHODS:
        if not store.aggregate_current:
            raise ValueError(f"{store.root}: the aggregates do not cover the stored tasks; add or drop tasks first")
        return lambda layer: store.method_hessians(method, layer)
    if not store.keep_task_hessians:
        raise ValueError(f"method {method!r} needs every task's Hessians: use a store created with "
                         "keep_task_hessians=True")
    tasks = store.distinct(tasks)  # a copied task counts once
    counts = [store.tasks[t].mix_weight for t in tasks]

    def per_layer(layer: int) -> dict[str, torch.Tensor]:
        parts = [store.task_layer(t, layer) for t in tasks]  # sorted names: a fixed summation order
        return {g: aggregate_hessians(method, [p[g] for p in parts], counts) for g in parts[0]}

    return per_layer


def checkpoint_meta(cfg: MLGPTQConfig, calib: dict[str, Any] | None, records: Sequence[TaskRecord],
                    info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """MLGPTQ provenance for quantize_config.json["meta"] (deterministic: no paths, no times)."""
    return {
        "method": cfg.method,
        "mlgptq_version": MLGPTQ_META_VERSION,
        "task_ids": [r.name for r in records],
        "aggregation": cfg.aggregation,
        "normalization": "per-task mean of 2 x x^T over real (non-pad) tokens"
                         + (f", first {cfg.sink_tokens} of each sequence weighted {cfg.sink_weight}" if cfg.sink_weight != 1.0 else ""),
        "activation_source": cfg.activation_source,
        "calibrate_with_adapter": cfg.calibrate_with_adapter,
        "tasks": [{"name": r.name, "adapter_sha256": r.adapter_hash, "calibration_sha256": r.calibration_hash,
                   "num_tokens": r.num_tokens, "num_sequences": r.num_sequences} for r in records],
        "calibration": calib,
        "damping": {p: i["damp_used"] for p, i in sorted(info.items()) if i["damp_used"] > cfg.grid.damp_percent},
        "eig_clipped": sorted(p for p, i in info.items() if i["eig_clipped"]),
    }


def save_checkpoint(out: Path, base_dir: Path, model: Transformer, packed: PackedLayers, cfg: MLGPTQConfig,
                    meta: dict[str, Any], overwrite: bool) -> Path:
    """Write `packed` layers plus the model's unquantized tensors as a GPTQ v1 checkpoint of `base_dir`."""
    hf_config = json.loads((base_dir / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    qc = QuantizeConfig(cfg.grid, model_name_or_path=base_dir.name)
    return save_gptq_checkpoint(out, packed, unquantized_tensors(model), hf_config, qc, meta,
                                tokenizer_dir=base_dir, overwrite=overwrite)


def quantize_base(
    base_dir: str | Path,
    sources: Sequence[TaskSource],
    out_dir: str | Path,
    cfg: MLGPTQConfig = MLGPTQConfig(),
    calib_cfg: CalibrationConfig = CalibrationConfig(),
    stats_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    meter: ResourceMeter | None = None,
    keep_task_hessians: bool = False,
    mark_quantized: bool = True,
) -> dict[str, Any]:
    """Quantize the base in `base_dir` for `sources` (plus every task already in `stats_dir`) and
    write the checkpoint to `out_dir` (gptq-per-task: one per task in `out_dir/<task>`). A new
    store keeps every task's Hessians when `keep_task_hessians` or the method needs them;
    `mark_quantized` records the store's aggregates as the current base's (an onboarding job
    does that itself, once its rollout gate passed).
    Returns a report: output dirs, served / computed tasks, layer info, resources per phase."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    meter = meter or ResourceMeter(cfg.device)
    if cfg.activation_source == "quantized" and stats_dir is not None:
        raise ValueError("stored statistics need activation_source='fp16': Hessians taken on a partially quantized "
                         "model depend on the other tasks, so incremental updates would not be exact (6.3)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    check_grid_fits(ModelConfig.from_dir(base_dir), cfg.grid)
    with meter.phase("load"):
        model = load_base(base_dir, cfg.dtype, cfg.device)
        tokenizer = load_tokenizer(base_dir) if sources else None
    report: dict[str, Any] = {"method": cfg.method, "out_dirs": {}, "computed_tasks": [], "layers": {}}
    if cfg.method == "rtn":
        with meter.phase("aggregate_quantize"):
            packed, info = quantize_from_hessians(model, None, cfg.grid, progress, threads=cfg.gptq_threads)
        with meter.phase("save"):
            meta = checkpoint_meta(cfg, None, [], info)
            report["out_dirs"]["shared"] = str(save_checkpoint(out_dir, base_dir, model, packed, cfg, meta, overwrite))
        report.update(tasks=[], layers=info, resources=meter.summary())
        return report
    if cfg.activation_source == "quantized":
        return _quantize_sequential(base_dir, model, tokenizer, sources, out_dir, cfg, calib_cfg, overwrite,
                                    progress, meter, report)

    with tempfile.TemporaryDirectory(prefix=".mlgptq-stats-", dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        with meter.phase("forward_hessian"):
            base = base_fingerprint(base_dir)
            existing = stats_dir is not None and StatsStore.is_store(stats_dir)
            store = StatsStore.open(stats_dir) if existing else None
            budget = (int(store.settings["calibration"]["budget"]) if store is not None
                      else resolve_task_budget(sources, tokenizer, calib_cfg))
            settings = hessian_settings(cfg, calib_cfg, budget)
            if store is not None:
                store.check_compatible(base, settings)
                if keep_task_hessians and not store.keep_task_hessians:
                    raise ValueError(f"{stats_dir} keeps no per-task Hessians; keep_task_hessians needs a new store")
            tasks = load_tasks(sources, tokenizer, model.config, calib_cfg, budget, cfg.dtype)  # fails before writing
            if store is None:
                store = StatsStore.create(stats_dir or tmp, base, settings, model.config.num_layers,
                                          keep_task_hessians=keep_task_hessians or cfg.method in PER_TASK_METHODS)
            stored = compute_missing_stats(model, store, tasks, cfg, progress)
            report["computed_tasks"] = sorted(stored)
            report["copied_tasks"] = {t: twin for t, twin in stored.items() if twin is not None}
        served = sorted(store.tasks)
        if not served:
            raise InvalidRequest(f"method {cfg.method!r} needs at least one task with calibration data")
        records = [store.tasks[t] for t in served]
        calib = store.settings["calibration"]
        groups = [[t] for t in served] if cfg.method == "gptq-per-task" else [served]
        for names in groups:
            with meter.phase("aggregate_quantize"):
                hessians_for = _hessians_source(store, cfg.method, names)
                packed, info = quantize_from_hessians(model, hessians_for, cfg.grid, progress,
                                                      desc=f"quantize {names[0] if len(names) == 1 else 'shared'}",
                                                      threads=cfg.gptq_threads)
            key = names[0] if cfg.method == "gptq-per-task" else "shared"
            out = out_dir / key if cfg.method == "gptq-per-task" else out_dir
            with meter.phase("save"):
                recs = [r for r in records if r.name in names]
                meta = checkpoint_meta(cfg, calib, recs, info)
                report["out_dirs"][key] = str(save_checkpoint(out, base_dir, model, packed, cfg, meta, overwrite))
            report["layers"][key] = info
        if cfg.method in AGGREGATE_METHODS and mark_quantized:
            store.mark_quantized()
        report["statistics_bytes"] = store.bytes_used()
    report.update(tasks=served, budget=budget, resources=meter.summary())
    return report


def _quantize_sequential(base_dir: Path, model: Transformer, tokenizer: Any, sources: Sequence[TaskSource],
                         out_dir: Path, cfg: MLGPTQConfig, calib_cfg: CalibrationConfig, overwrite: bool,
                         progress: bool, meter: ResourceMeter, report: dict[str, Any]) -> dict[str, Any]:
    """activation_source="quantized": GPTQ's sequential scheme, no stored statistics."""
    budget = resolve_task_budget(sources, tokenizer, calib_cfg)
    tasks = load_tasks(sources, tokenizer, model.config, calib_cfg, budget, cfg.dtype)
    calib = {**calib_cfg.to_dict(), "budget": budget}
    groups = [[t] for t in tasks] if cfg.method == "gptq-per-task" else [list(tasks)]
    for group in groups:
        if model is None:  # the sequential pass overwrote the weights: start again from the fp16 base
            model = load_base(base_dir, cfg.dtype, cfg.device)
        with meter.phase("forward_hessian_quantize"):
            packed, info = sequential_quantize(model, sorted(group, key=lambda t: t.name), cfg, progress)
        key = group[0].name if cfg.method == "gptq-per-task" else "shared"
        out = out_dir / key if cfg.method == "gptq-per-task" else out_dir
        records = sorted((_record(t, calib_cfg.seed, cfg) for t in group), key=lambda r: r.name)
        with meter.phase("save"):
            meta = checkpoint_meta(cfg, calib, records, info)
            report["out_dirs"][key] = str(save_checkpoint(out, base_dir, model, packed, cfg, meta, overwrite))
        report["layers"][key] = info
        model = None
    report.update(tasks=sorted(t.name for t in tasks), computed_tasks=sorted(t.name for t in tasks), budget=budget,
                  resources=meter.summary())
    return report


def checkpoints_identical(a: str | Path, b: str | Path) -> tuple[bool, list[str]]:
    """(equal?, differences): every tensor bit for bit and quantize_config.json / config.json equal."""
    a, b = Path(a), Path(b)
    diffs = []
    for name in ("quantize_config.json", "config.json"):
        if json.loads((a / name).read_text()) != json.loads((b / name).read_text()):
            diffs.append(name)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diffs += [f"missing {n}" for n in sorted(set(ta) ^ set(tb))]
    diffs += [n for n in sorted(set(ta) & set(tb)) if ta[n].dtype != tb[n].dtype or not torch.equal(ta[n], tb[n])]
    return not diffs, diffs


def measure_incremental_vs_full(
    base_dir: str | Path,
    sources: Sequence[TaskSource],
    work_dir: str | Path,
    cfg: MLGPTQConfig = MLGPTQConfig(),
    calib_cfg: CalibrationConfig = CalibrationConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """For k = 2..N: full MLGPTQ over the first k tasks vs adding task k to a store holding the
    first k-1; time and peak memory per phase of each, and whether the checkpoints are identical."""
    if cfg.method != "mlgptq" or cfg.activation_source != "fp16":
        raise ValueError("the incremental comparison is defined for method='mlgptq' with activation_source='fp16'")
    if len(sources) < 2:
        raise ValueError(f"need at least 2 tasks, got {len(sources)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # One budget for every k, or a full run over fewer tasks would calibrate on other token sets.
    budget = resolve_task_budget(sources, load_tokenizer(base_dir), calib_cfg)
    calib_cfg = replace(calib_cfg, tokens_per_task=budget)
    rows = []
    prev_store: Path | None = None
    for k in range(1, len(sources) + 1):
        full_stats, full_out = work_dir / f"full{k}" / "stats", work_dir / f"full{k}" / "ckpt"
        shutil.rmtree(work_dir / f"full{k}", ignore_errors=True)
        meter_full = ResourceMeter(cfg.device)
        full = quantize_base(base_dir, sources[:k], full_out, cfg, calib_cfg, full_stats, progress=progress,
                             meter=meter_full)
        if prev_store is not None:
            inc_stats, inc_out = work_dir / f"inc{k}" / "stats", work_dir / f"inc{k}" / "ckpt"
            shutil.rmtree(work_dir / f"inc{k}", ignore_errors=True)
            shutil.copytree(prev_store, inc_stats)
            meter_inc = ResourceMeter(cfg.device)
            inc = quantize_base(base_dir, sources[:k], inc_out, cfg, calib_cfg, inc_stats, progress=progress,
                                meter=meter_inc)
            same, diffs = checkpoints_identical(full_out, inc_out)
            rows.append({"num_tasks": k, "new_task": sources[k - 1].name, "bit_exact": same, "differences": diffs[:10],
                         "full": {"computed_tasks": full["computed_tasks"], **full["resources"]},
                         "incremental": {"computed_tasks": inc["computed_tasks"], **inc["resources"]}})
            shutil.rmtree(work_dir / f"inc{k}", ignore_errors=True)
            shutil.rmtree(prev_store.parent, ignore_errors=True)
        prev_store = full_stats
    if prev_store is not None:
        shutil.rmtree(prev_store.parent, ignore_errors=True)
    return {"budget_tokens_per_task": budget, "method": cfg.method, "device": cfg.device,
            "grid": {"bits": cfg.grid.bits, "group_size": cfg.grid.group_size}, "rows": rows}
