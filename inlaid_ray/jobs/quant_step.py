"""Steps 2-3 of onboarding: the new task's MLGPTQ statistics and the re-quantization decision
(LoRA-Inlaid section 3; docs/algorithms.md 6.3; MLGPTQ-channel and GPTQ-mixed re-quantize from the
same stored statistics with their own aggregate). No Ray here: `onboard.py` runs these functions
as Ray tasks (on a GPU when the cluster has one).

`compute_statistics` adds the Hessians of the tasks the store lacks (the new one, plus live tasks
whose calibration data is known but whose statistics were never stored), drops those of retired
tasks (retired is terminal: the next base is quantized for the tasks still served), and says, per
decoder layer and Linear input group, whether the aggregate over all stored tasks differs from
the one the current base was quantized with. A group whose aggregate did not change quantizes to
the very same weights (GPTQ is a function of W and H), so "nothing changed" means the current
base already is the base for the new task set and no new base version is needed. `requantize`
runs incremental MLGPTQ from the stored statistics (GPTQ of every layer from the fp16 weights;
only the new task's forward passes were computed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inlaid_ray.devices import parse_dtype, resolve_device
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.quantized_base.loading import load_base
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.incremental import TaskSource, compute_missing_stats, load_tasks, quantize_base
from inlaid_ray.quant.incremental import hessian_settings
from inlaid_ray.quant.measure import ResourceMeter
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD, GROUPS, MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore, base_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantSettings:
    """Calibration and grid of the onboarding job. The calibration fields apply only when the
    statistics store is created; an existing store keeps the settings it was built with."""

    method: str = DEFAULT_SHARED_METHOD  # or "mlgptq" (element-wise max) or "mlgptq-channel" (channel max)
    bits: int = 4
    group_size: int | None = None  # None: the largest of 128, 64, 32 dividing every input dim (else -1)
    tokens_per_task: int = 512  # calibration tokens per task (equal for every task, fixed by the store)
    max_seq_len: int = 512
    seed: int = 0
    batch_tokens: int = 2048
    device: str = "auto"  # auto: cuda when the worker sees a GPU
    dtype: str = "float32"
    gptq_threads: int | None = 1
    # A layer group counts as changed (and a new base is made) only when an aggregate entry moves by
    # more than this fraction of the group's largest entry: the same data sampled in another order
    # differs in the last bits, and GPTQ's result does not move for that.
    min_change: float = 1e-4

    def grid(self, model_config: ModelConfig) -> QuantGrid:
        dims = [model_config.module_shape(m)[1] for m in ("q_proj", "o_proj", "down_proj")]
        group = self.group_size
        if group is None:
            group = next((g for g in (128, 64, 32) if all(d % g == 0 for d in dims)), -1)
        return QuantGrid(bits=self.bits, group_size=group)


@dataclass
class StatsResult:
    """What `compute_statistics` did and found."""

    created_store: bool
    computed: list[str]  # tasks whose statistics were stored now (computed, or copied from a twin)
    replaced: list[str]  # of those, tasks the store held before with another adapter / calibration
    store_tasks: list[str]  # every task in the store afterwards
    dropped: list[str]  # retired tasks whose statistics left the store now
    changed: dict[int, list[str]]  # layer -> input groups whose aggregate differs from the current base's
    num_groups: int  # layers x groups compared
    basis: str  # what the comparison was made against
    resources: dict[str, Any] = field(default_factory=dict)
    copied: dict[str, str] = field(default_factory=dict)  # of `computed`, task -> the stored twin it copied
    store_bytes: dict[str, Any] = field(default_factory=dict)  # the store's size afterwards (StatsStore.bytes_used)

    @property
    def num_changed(self) -> int:
        return sum(len(g) for g in self.changed.values())


def configs(settings: QuantSettings, model_config: ModelConfig,
            store: StatsStore | None) -> tuple[MLGPTQConfig, CalibrationConfig, int]:
    """(MLGPTQ config, calibration config, per-task token budget): the store's own if it exists."""
    grid = settings.grid(model_config)
    if store is None:
        cfg = MLGPTQConfig(method=settings.method, grid=grid, batch_tokens=settings.batch_tokens,  # type: ignore[arg-type]
                           device=str(resolve_device(settings.device)),
                           dtype=parse_dtype(settings.dtype), gptq_threads=settings.gptq_threads)
        calib = CalibrationConfig(tokens_per_task=settings.tokens_per_task, max_seq_len=settings.max_seq_len,
                                  seed=settings.seed)
        return cfg, calib, settings.tokens_per_task
    s, c = store.settings, store.settings["calibration"]
    device = str(resolve_device(settings.device))
    if torch.device(device).type != s["device_type"]:
        log.warning("statistics store %s was built on %s; computing on %s too (its Hessians depend on it)",
                    store.root, s["device_type"], s["device_type"])
        device = s["device_type"]
    cfg = MLGPTQConfig(method=settings.method, grid=grid,  # type: ignore[arg-type]
                       calibrate_with_adapter=s["calibrate_with_adapter"], batch_tokens=s["batch_tokens"],
                       block_size=s["block_size"], device=device, dtype=parse_dtype(s["dtype"]),
                       gptq_threads=settings.gptq_threads)
    calib = CalibrationConfig(tokens_per_task=c["tokens_per_task"], max_seq_len=c["max_seq_len"],
                              max_sequences=c["max_sequences"], seed=c["seed"])
    return cfg, calib, int(c["budget"])


def compute_statistics(base_dir: str | Path, stats_dir: str | Path, sources: Sequence[TaskSource],
                       base_tasks: Sequence[Mapping[str, Any]] | None, settings: QuantSettings = QuantSettings(),
                       progress: bool = False, retired: Sequence[str] = ()) -> StatsResult:
    """Drop the statistics of `retired` tasks, store those of `sources` the store lacks (creating
    the store if absent) and compare the new aggregate with the one of `base_tasks` (the current
    base's MLGPTQ meta "tasks" entries; None = no quantized base is current). A base task dropped
    here makes every layer count as changed: the next base no longer serves it."""
    base_dir, stats_dir = Path(base_dir), Path(stats_dir)
    meter = ResourceMeter(resolve_device(settings.device))
    model_config = ModelConfig.from_dir(base_dir)
    existing = StatsStore.open(stats_dir) if StatsStore.is_store(stats_dir) else None
    cfg, calib_cfg, budget = configs(settings, model_config, existing)
    before = dict(existing.tasks) if existing is not None else {}
    with meter.phase("load"):
        tokenizer = load_tokenizer(base_dir)
        tasks = load_tasks(sources, tokenizer, model_config, calib_cfg, budget, cfg.dtype)
        model = load_base(base_dir, cfg.dtype, cfg.device)
    store = existing
    if store is None:
        store = StatsStore.create(stats_dir, base_fingerprint(base_dir), hessian_settings(cfg, calib_cfg, budget),
                                  model_config.num_layers)
    else:
        store.check_compatible(base_fingerprint(base_dir), hessian_settings(cfg, calib_cfg, budget))
    dropped = sorted(t for t in set(retired) if t in store.tasks)
    with meter.phase("forward_hessian"):
        stored = compute_missing_stats(model, store, tasks, cfg, progress, drop=dropped)
    del model
    with meter.phase("compare_aggregate"):
        changed, basis = aggregate_changes(store, base_tasks, settings.method, settings.min_change)
    return StatsResult(
        created_store=existing is None, computed=sorted(stored), replaced=sorted(t for t in stored if t in before),
        store_tasks=sorted(store.tasks), dropped=dropped, changed=changed,
        num_groups=store.num_layers * len(GROUPS), basis=basis, resources=meter.summary(),
        copied={t: twin for t, twin in stored.items() if twin is not None}, store_bytes=store.bytes_used(),
    )


def aggregate_changes(store: StatsStore, base_tasks: Sequence[Mapping[str, Any]] | None, method: str,
                      rtol: float = 1e-4) -> tuple[dict[int, list[str]], str]:
    """({layer: [groups]} where `method`'s aggregate over all stored tasks differs from the one the
    current base was quantized with (`base_tasks`: its meta "tasks"), what was compared. Both are
    generations of the store's aggregates, matched by their distinct (adapter, calibration)
    pairs, so exact copies of a task count once and adding one changes nothing. An entry counts
    only if it moves by more than `rtol` x the group's largest entry (QuantSettings.min_change)."""
    everything = {layer: list(GROUPS) for layer in range(store.num_layers)}
    if base_tasks is None:
        return everything, "no quantized base is current: every layer is new"
    stored = store.tasks
    stale = [t["name"] for t in base_tasks if t["name"] not in stored
             or stored[t["name"]].adapter_hash != t.get("adapter_sha256")
             or stored[t["name"]].calibration_hash != t.get("calibration_sha256")]
    if stale:
        return everything, f"statistics of base tasks {sorted(stale)} are missing or were replaced: every layer"
    names = sorted(str(t["name"]) for t in base_tasks)
    keys = {(t["adapter_sha256"], t["calibration_sha256"]) for t in base_tasks}
    if set(store.current_keys()) == keys:
        return {}, f"the stored tasks {sorted(stored)} have the statistics of the current base's {names}"
    old = store.generation_with_keys(keys)
    if old is None:
        return everything, f"the aggregates the current base was quantized from ({names}) are no longer kept: every layer"
    changed: dict[int, list[str]] = {}
    for layer in range(store.num_layers):
        before, after = store.method_hessians(method, layer, old), store.method_hessians(method, layer)
        groups = [g for g in GROUPS if float((after[g] - before[g]).abs().max()) > rtol * float(before[g].abs().max())]
        if groups:
            changed[layer] = groups
    return changed, f"{method} over {sorted(stored)} vs over {names}"


def requantize(base_dir: str | Path, stats_dir: str | Path, out_dir: str | Path,
               settings: QuantSettings = QuantSettings(), progress: bool = False) -> dict[str, Any]:
    """Incremental MLGPTQ: a GPTQ v1 checkpoint at `out_dir` for every task in the store, from the
    stored statistics (none are computed here); returns quantize_base's report."""
    store = StatsStore.open(stats_dir)
    model_config = ModelConfig.from_dir(base_dir)
    cfg, calib_cfg, _ = configs(settings, model_config, store)
    return quantize_base(base_dir, [], out_dir, cfg, calib_cfg, stats_dir, progress=progress,
                         meter=ResourceMeter(cfg.device), mark_quantized=False)  # marked once the gate passes
