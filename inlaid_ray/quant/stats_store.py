"""On-disk store of MLGPTQ per-task statistics (docs/algorithms.md 6.2), so that adding a task
computes only that task's Hessians and re-quantizes from the fp16 base (6.3).

Layout (safetensors only, one file per block, fp32 so that nothing is lost):

    store.json                         manifest: base reference, settings, tasks, aggregate
    tasks/<task>/layer_000.safetensors {attn_in, attn_out, mlp_in, mlp_out}: H_t [d_in, d_in]
    aggregate/layer_000.safetensors    the running element-wise max over `aggregate.tasks`

The manifest records, per task, the adapter's sha256, the sha256 of the calibration token ids,
the token/sequence counts and the seed; globally the base model's reference (path + sha256 of its
weights and config: re-quantization always starts from those fp16 weights, never from a
dequantized checkpoint, 11 item 5) and every setting the Hessians depend on. A store refuses a
base or settings that differ from the ones it was built with. Every write goes to a temporary
name first and is renamed into place, and the manifest is replaced last, so an interrupted run
leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from inlaid_ray.atomic_files import write_json_atomic
from inlaid_ray.quant.hessian import max_aggregate_hessians

STORE_FORMAT = "inlaid-ray-mlgptq-stats"
STORE_VERSION = 1
MANIFEST = "store.json"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class TaskRecord:
    """What a task's stored Hessians were computed from."""

    name: str
    adapter_hash: str  # sha256 of adapter_model.safetensors ("" = no adapter)
    calibration_hash: str  # CalibrationSet.digest
    num_tokens: int
    num_sequences: int
    seed: int
    # The Hessians' normaliser, sum of token weights, when the first tokens of each sequence were
    # down-weighted (MLGPTQConfig.sink_weight); None = num_tokens. Aggregates weigh tasks by it.
    weight: float | None = None

    @property
    def mix_weight(self) -> float:
        return self.num_tokens if self.weight is None else self.weight

    @property
    def content_key(self) -> tuple[str, str, int, float]:
        """What the stored Hessians are a function of besides the store's settings: two records with
        one key hold the same statistics whatever the task names (calibration samples are seeded by
        content, not by name)."""
        return self.adapter_hash, self.calibration_hash, self.seed, self.mix_weight


def check_task_name(name: str) -> str:
    """Task names become directory names: letters, digits, '_', '.', '-' (no leading dot)."""
    if not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r} must match {_TASK_NAME.pattern}")
    return name


def base_fingerprint(base_dir: str | Path) -> dict[str, str]:
    """Reference to an fp16 base model directory: its path and the sha256 of its weights and config."""
    base_dir = Path(base_dir).resolve()
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{base_dir} holds no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    config = hashlib.sha256((base_dir / "config.json").read_bytes()).hexdigest()
    return {"path": str(base_dir), "weights_sha256": h.hexdigest(), "config_sha256": config}


def _layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def _save_hessians(path: Path, hs: Mapping[str, torch.Tensor]) -> None:
    save_file({g: h.detach().to("cpu", torch.float32).contiguous() for g, h in hs.items()}, str(path))


class StatsStore:
    """A directory of per-task Hessians plus their running max (see module docstring)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    # ------------------------------------------------------------------ open / create
    @staticmethod
    def is_store(root: str | Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def create(cls, root: str | Path, base: Mapping[str, str], settings: Mapping[str, Any], num_layers: int,
               overwrite: bool = False) -> "StatsStore":
        """A new, empty store for `base` (a `base_fingerprint`) and the Hessian `settings`."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{root} already exists and is not empty (pass overwrite=True to replace it)")
            shutil.rmtree(root)
        (root / "tasks").mkdir(parents=True, exist_ok=True)
        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "base": dict(base),
                    "settings": json.loads(json.dumps(dict(settings))), "num_layers": num_layers,
                    "tasks": {}, "aggregate": {"method": "max", "tasks": []}}
        write_json_atomic(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path) -> "StatsStore":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root} is not a statistics store (no {MANIFEST})")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
            raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                             f"expected {STORE_FORMAT!r} version {STORE_VERSION}")
        return cls(root, manifest)

    def check_compatible(self, base: Mapping[str, str], settings: Mapping[str, Any]) -> None:
        """Raise ValueError unless `base` and `settings` are those the stored Hessians came from."""
        mine = self.manifest["base"]
        for key in ("weights_sha256", "config_sha256"):
            if mine[key] != base[key]:
                raise ValueError(f"{self.root}: built for the base at {mine['path']} ({key} {mine[key][:12]}), "
                                 f"but the base at {base['path']} has {key} {base[key][:12]}")
        stored = self.manifest["settings"]
        given = json.loads(json.dumps(dict(settings)))
        diff = {k: (stored.get(k), given.get(k)) for k in sorted(set(stored) | set(given)) if stored.get(k) != given.get(k)}
        if diff:
            raise ValueError(f"{self.root}: statistics were computed with other settings "
                             f"(setting: (stored, given)) {diff}; use a new stats directory")

    # ------------------------------------------------------------------ tasks
    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return {n: TaskRecord(**r) for n, r in sorted(self.manifest["tasks"].items())}

    def has_task(self, record: TaskRecord) -> bool:
        """True when `record.name` is stored with the same adapter and calibration tokens."""
        old = self.manifest["tasks"].get(record.name)
        return old is not None and TaskRecord(**old) == record

    def twin_of(self, record: TaskRecord) -> str | None:
        """A stored task (first by name) whose statistics `record` would reproduce exactly, if any."""
        return next((n for n, r in self.tasks.items() if n != record.name and r.content_key == record.content_key), None)

    def distinct(self, names: Sequence[str]) -> list[str]:
        """`names` without exact copies (first by name of each content key): an aggregate that
        weighs tasks (the mix, the channel max) counts a copied task once, so that an identical
        task never changes the base."""
        records, seen, out = self.tasks, set(), []
        for name in sorted(names):
            key = records[name].content_key
            if key not in seen:
                seen.add(key)
                out.append(name)
        return out

    def copy_task(self, source: str, record: TaskRecord) -> None:
        """Store `record` with the Hessians of `source` (its twin: same content key)."""
        if self.tasks[source].content_key != record.content_key:
            raise ValueError(f"task {record.name!r} is not a copy of {source!r}: their statistics differ")
        writer = self.task_writer(record.name)
        try:
            for layer in range(self.num_layers):
                shutil.copyfile(self.root / "tasks" / source / _layer_file(layer), writer.partial / _layer_file(layer))
                writer.layers.add(layer)
            writer.commit(record)
        except BaseException:
            writer.abort()
            raise

    def task_writer(self, name: str) -> "TaskWriter":
        return TaskWriter(self, check_task_name(name))

    def task_layer(self, name: str, layer: int) -> dict[str, torch.Tensor]:
        """{group: H_t} of one task and layer (fp32, CPU)."""
        if name not in self.manifest["tasks"]:
            raise KeyError(f"task {name!r} is not in the store {self.root} (stored: {sorted(self.manifest['tasks'])})")
        return load_file(str(self.root / "tasks" / name / _layer_file(layer)))

    def remove_task(self, name: str) -> None:
        """Forget a task; the running max cannot drop it (max is not invertible), so it is rebuilt later."""
        if self.manifest["tasks"].pop(name, None) is None:
            raise KeyError(f"task {name!r} is not in the store {self.root}")
        self.manifest["aggregate"]["tasks"] = []  # stale: recomputed from the per-task files
        write_json_atomic(self.root / MANIFEST, self.manifest)
        shutil.rmtree(self.root / "tasks" / name, ignore_errors=True)

    def _commit_task(self, record: TaskRecord, partial: Path) -> None:
        final = self.root / "tasks" / record.name
        replaced = record.name in self.manifest["tasks"]
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        self.manifest["tasks"][record.name] = asdict(record)
        if replaced:  # the old H_t may be inside the running max: rebuild it from the task files
            self.manifest["aggregate"]["tasks"] = []
        write_json_atomic(self.root / MANIFEST, self.manifest)

    # ------------------------------------------------------------------ running max
    @property
    def aggregate_tasks(self) -> list[str]:
        return list(self.manifest["aggregate"]["tasks"])

    def aggregate_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """{group: max_t H_t} over `aggregate_tasks` for one layer."""
        if not self.aggregate_tasks:
            raise ValueError(f"{self.root}: the aggregate is empty or stale; call update_max_aggregate() first")
        return load_file(str(self.root / "aggregate" / _layer_file(layer)))

    def update_max_aggregate(self, tasks: Sequence[str] | None = None) -> list[str]:
        """Make the running max cover `tasks` (default: every stored task). Only tasks not yet in
        it are read (6.3: `H_agg_new = max(H_agg_old, H_new)`, exact because max is associative
        and idempotent); a stale aggregate is rebuilt from all of them. Returns the tasks read."""
        tasks = sorted(self.manifest["tasks"] if tasks is None else tasks)
        missing = [t for t in tasks if t not in self.manifest["tasks"]]
        if missing:
            raise KeyError(f"tasks {missing} are not in the store {self.root}")
        have = self.aggregate_tasks
        if have and not set(have) <= set(tasks):
            raise ValueError(f"the aggregate covers {have}, which is not a subset of {tasks}; a max cannot drop tasks")
        new = [t for t in tasks if t not in have]
        if not new:
            return []
        partial = self.root / "aggregate.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for layer in range(self.num_layers):
            parts = [self.aggregate_layer(layer)] if have else []
            parts += [self.task_layer(t, layer) for t in new]
            agg = {g: max_aggregate_hessians([p[g] for p in parts]) for g in parts[0]}
            _save_hessians(partial / _layer_file(layer), agg)
        final = self.root / "aggregate"
        old = self.root / "aggregate.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        partial.rename(final)
        self.manifest["aggregate"]["tasks"] = tasks
        write_json_atomic(self.root / MANIFEST, self.manifest)
        shutil.rmtree(old, ignore_errors=True)
        return new


class TaskWriter:
    """Streams one task's per-layer Hessians into `tasks/<name>.partial/`, then commits them."""

    def __init__(self, store: StatsStore, name: str) -> None:
        self.store, self.name = store, name
        self.partial = store.root / "tasks" / f"{name}.partial"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.layers: set[int] = set()

    def write_layer(self, layer: int, hs: Mapping[str, torch.Tensor]) -> None:
        _save_hessians(self.partial / _layer_file(layer), hs)
        self.layers.add(layer)

    def commit(self, record: TaskRecord) -> None:
        if record.name != self.name:
            raise ValueError(f"record for {record.name!r} committed to the writer of {self.name!r}")
        expected = set(range(self.store.num_layers))
        if self.layers != expected:
            raise ValueError(f"task {self.name!r}: layers {sorted(expected - self.layers)} were never written")
        self.store._commit_task(record, self.partial)

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
