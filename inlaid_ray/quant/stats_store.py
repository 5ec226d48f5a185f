"""On-disk store of MLGPTQ statistics whose size per task is the task's calibration sample, not its
Hessians (docs/algorithms.md 6.2), so that adding a task computes only that task's Hessians and
re-quantizes from the fp16 base (6.3), and a store of thousands of tasks stays small.

Layout (safetensors only):

    store.json                              manifest: base reference, settings, tasks, generations
    tasks/<task>.<id>/calibration.safetensors  the task's calibration sample (token ids + lengths)
    tasks/<task>.<id>/layer_000.safetensors    {group: H_t} fp32, only in a store created with
                                               keep_task_hessians (research tools read them)
    aggregates/<generation>/layer_000.safetensors
        per Linear input group g, over the DISTINCT tasks the generation covers (an exact copy of a
        task - same adapter, same calibration sample - counts once):
        sum.g  = sum_t w_t H_t   fp64  (w_t = the task's token weight; mix = sum / sum_t w_t)
        max.g  = max_t H_t       fp32  (MLGPTQ's element-wise max, 5.3)
        diag.g = max_t diag(H_t) fp32  (the channel max's diagonal, 5.4)

The max is exact in any order. Every fp32 H_t times an integer token count (no sink weighting)
is exact in fp64, and a sum of such terms is exact, so independent of the order tasks arrived
in, while the terms at one position span less than about 2^(29 - log2(tokens x tasks)) in
magnitude; beyond that another order can differ in the last fp64 bits, below fp32's resolution
and nearly always absorbed by the cast to fp32. tests/test_incremental.py and
tests/test_onboard_job.py check "incremental == full" bit for bit on their models.
A max cannot drop a task, so retiring or replacing one rebuilds the aggregates from every
remaining task: from the stored Hessians in a keep store, else by recomputing each task's
Hessians from its stored calibration sample and its adapter (`TaskRecord.adapter_path`, checked
against its hash). Nothing a manifest names is ever rewritten: an update writes a new generation
and new task directories, and the manifest, replaced last, names the current generation, the
previous one (what an interrupted onboarding restores) and the one the last quantized base was
made from (what the next onboarding compares against). Files no manifest can return to are
deleted when the job that might undo is over (`forget_previous`) or after an undo (`restore`). The manifest records the base's reference (path + sha256 of its weights and config) and
every setting the Hessians depend on, and a store refuses a base or settings that differ.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from inlaid_ray.atomic_files import write_json_atomic
from inlaid_ray.quant.hessian import channel_max_from_mix

STORE_FORMAT = "inlaid-ray-mlgptq-stats"
STORE_VERSION = 2
MANIFEST = "store.json"
CALIBRATION_FILE = "calibration.safetensors"
AGGREGATE_METHODS = ("mlgptq", "mlgptq-channel", "gptq-mixed")  # quantized from the aggregates alone
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class TaskRecord:
    """What a task's statistics were computed from."""

    name: str
    adapter_hash: str  # sha256 of the adapter's tensors ("" = no adapter)
    calibration_hash: str  # CalibrationSet.digest
    num_tokens: int
    num_sequences: int
    seed: int
    # The Hessians' normaliser, sum of token weights, when the first tokens of each sequence were
    # down-weighted (MLGPTQConfig.sink_weight); None = num_tokens. Aggregates weigh tasks by it.
    weight: float | None = None
    adapter_path: str = ""  # where the adapter is read again when the aggregates are rebuilt
    files: str = ""  # its directory under tasks/ (written once, never rewritten)

    @property
    def mix_weight(self) -> float:
        return self.num_tokens if self.weight is None else self.weight

    @property
    def content_key(self) -> tuple[str, str, int, float]:
        """What the task's Hessians are a function of besides the store's settings: two records with
        one key have the same statistics whatever their names (calibration samples are seeded by
        content, not by name)."""
        return self.adapter_hash, self.calibration_hash, self.seed, self.mix_weight

    def same_statistics(self, other: "TaskRecord") -> bool:
        return self.name == other.name and self.content_key == other.content_key


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


def _save_calibration(path: Path, sequences: Sequence[Sequence[int]]) -> None:
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.int32)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
    save_file({"tokens": tokens, "lengths": lengths}, str(path))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class StatsStore:
    """A directory of per-task calibration samples and their running aggregates (module docstring)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    # ------------------------------------------------------------------ open / create
    @staticmethod
    def is_store(root: str | Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def create(cls, root: str | Path, base: Mapping[str, str], settings: Mapping[str, Any], num_layers: int,
               keep_task_hessians: bool = False, overwrite: bool = False) -> "StatsStore":
        """A new, empty store for `base` (a `base_fingerprint`) and the Hessian `settings`;
        `keep_task_hessians` also keeps every task's Hessians (~0.4 GB a task on SmolLM2)."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{root} already exists and is not empty (pass overwrite=True to replace it)")
            shutil.rmtree(root)
        (root / "tasks").mkdir(parents=True, exist_ok=True)
        (root / "aggregates").mkdir(exist_ok=True)
        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "base": dict(base),
                    "settings": json.loads(json.dumps(dict(settings))), "num_layers": num_layers,
                    "keep_task_hessians": keep_task_hessians, "tasks": {}, "generations": {},
                    "current": None, "previous": None, "quantized_from": None}
        write_json_atomic(root / MANIFEST, manifest)
        return cls(root, manifest)

    @staticmethod
    def set_aside_if_older(root: str | Path) -> Path | None:
        """Rename a store another version of this format wrote to `<root>.v<N>-<time>` and return
        the new path (None if `root` holds no such store): a job that can rebuild the statistics
        from its tasks' calibration data starts a new store instead of failing on the old one."""
        root = Path(root)
        try:
            version = json.loads((root / MANIFEST).read_text()).get("version")
        except (OSError, ValueError):
            return None
        if version == STORE_VERSION:
            return None
        aside = root.with_name(f"{root.name}.v{version}-{time.strftime('%Y%m%dT%H%M%S')}")
        root.rename(aside)
        return aside

    @classmethod
    def open(cls, root: str | Path) -> "StatsStore":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root} is not a statistics store (no {MANIFEST})")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
            raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                             f"expected {STORE_FORMAT!r} version {STORE_VERSION} (a store of an older inlaid-ray: "
                             "remove the directory and the next run rebuilds it)")
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
    def keep_task_hessians(self) -> bool:
        return bool(self.manifest["keep_task_hessians"])

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return {n: TaskRecord(**r) for n, r in sorted(self.manifest["tasks"].items())}

    def has_task(self, record: TaskRecord) -> bool:
        """True when `record.name` is stored with the same adapter and calibration tokens."""
        old = self.manifest["tasks"].get(record.name)
        return old is not None and TaskRecord(**old).same_statistics(record)

    def twin_of(self, record: TaskRecord) -> str | None:
        """A stored task (first by name) whose statistics `record` would reproduce exactly, if any."""
        return next((n for n, r in self.tasks.items() if n != record.name and r.content_key == record.content_key), None)

    def distinct(self, names: Sequence[str]) -> list[str]:
        """`names` without exact copies (the first by name of each content key)."""
        records, seen, out = self.tasks, set(), []
        for name in sorted(names):
            key = records[name].content_key
            if key not in seen:
                seen.add(key)
                out.append(name)
        return out

    def calibration(self, name: str) -> tuple[tuple[int, ...], ...]:
        """The calibration sample a task's Hessians were computed from."""
        data = load_file(str(self.task_dir(name) / CALIBRATION_FILE))
        tokens, out, start = data["tokens"].tolist(), [], 0
        for n in data["lengths"].tolist():
            out.append(tuple(tokens[start : start + n]))
            start += n
        return tuple(out)

    def task_layer(self, name: str, layer: int) -> dict[str, torch.Tensor]:
        """{group: H_t} of one task and layer (fp32, CPU); only a keep_task_hessians store has them."""
        if name not in self.manifest["tasks"]:
            raise KeyError(f"task {name!r} is not in the store {self.root} (stored: {sorted(self.manifest['tasks'])})")
        if not self.keep_task_hessians:
            raise ValueError(f"{self.root} keeps no per-task Hessians (create it with keep_task_hessians=True)")
        return load_file(str(self.task_dir(name) / _layer_file(layer)))

    def task_dir(self, name: str) -> Path:
        return self.root / "tasks" / self.manifest["tasks"][name]["files"]

    # ------------------------------------------------------------------ aggregates
    def _generation(self, gid: str | None = None) -> dict[str, Any]:
        gid = gid or self.manifest["current"]
        if gid is None:
            raise ValueError(f"{self.root}: no aggregate yet (no task was added)")
        return self.manifest["generations"][gid]

    @property
    def aggregate_tasks(self) -> list[str]:
        """The tasks the current aggregates cover."""
        return [] if self.manifest["current"] is None else list(self._generation()["tasks"])

    @property
    def aggregate_current(self) -> bool:
        """Whether the current aggregates cover exactly the stored tasks (else a rebuild is due)."""
        return sorted(self.aggregate_tasks) == sorted(self.manifest["tasks"])

    def generation_with_keys(self, keys: Iterable[tuple[str, str]]) -> str | None:
        """A kept generation over exactly these distinct (adapter hash, calibration hash) pairs."""
        want = sorted({tuple(k) for k in keys})
        return next((gid for gid, g in self.manifest["generations"].items()
                     if sorted(tuple(k) for k in g["keys"]) == want), None)

    def current_keys(self) -> list[tuple[str, str]]:
        return [] if self.manifest["current"] is None else [tuple(k) for k in self._generation()["keys"]]

    def aggregate_layer(self, layer: int, gid: str | None = None) -> dict[str, torch.Tensor]:
        """The raw aggregates of one layer: {"sum.g", "max.g", "diag.g"} (module docstring)."""
        return load_file(str(self.root / "aggregates" / (gid or self.manifest["current"]) / _layer_file(layer)))

    def method_hessians(self, method: str, layer: int, gid: str | None = None) -> dict[str, torch.Tensor]:
        """{group: H} that `method` quantizes layer `layer` with, from generation `gid` (default: current)."""
        if method not in AGGREGATE_METHODS:
            raise ValueError(f"method {method!r} needs per-task Hessians; the aggregates serve {AGGREGATE_METHODS}")
        data, weight = self.aggregate_layer(layer, gid), float(self._generation(gid)["weight"])
        out = {}
        for g in sorted({k.split(".", 1)[1] for k in data}):
            if method == "mlgptq":
                out[g] = data[f"max.{g}"]
            else:
                mix = (data[f"sum.{g}"] / weight).float()
                out[g] = mix if method == "gptq-mixed" else channel_max_from_mix(mix, data[f"diag.{g}"])
        return out

    def mark_quantized(self) -> None:
        """Record that a base was quantized from the current aggregates (they are kept for comparison)."""
        self.manifest["quantized_from"] = self.manifest["current"]
        write_json_atomic(self.root / MANIFEST, self.manifest)


    def update(self, drop: Sequence[str] = (), rebuild: bool = False) -> "StoreUpdate":
        """A transaction adding tasks (and dropping `drop`); see StoreUpdate."""
        return StoreUpdate(self, drop, rebuild)

    def forget_previous(self) -> None:
        """Nothing rolls back any more: drop the previous generation and every file only an older
        manifest named."""
        self.manifest["previous"] = None
        self._write(collect_tasks=True)

    def restore(self, before: Mapping[str, Any]) -> None:
        """Put back a manifest captured earlier (an interrupted onboarding's undo). A task or a
        generation whose files are gone since is forgotten (the aggregates are then rebuilt)."""
        manifest = json.loads(json.dumps(dict(before)))
        manifest["tasks"] = {n: r for n, r in manifest["tasks"].items()
                             if (self.root / "tasks" / r["files"] / CALIBRATION_FILE).is_file()}
        manifest["generations"] = {g: v for g, v in manifest["generations"].items()
                                   if (self.root / "aggregates" / g).is_dir()}
        for key in ("current", "previous", "quantized_from"):
            if manifest[key] not in manifest["generations"]:
                manifest[key] = None
        self.manifest = manifest
        self._write(collect_tasks=True)

    def _write(self, collect_tasks: bool = False) -> None:
        """Keep the current, previous and last-quantized generations, replace the manifest, then
        delete the generations (and with `collect_tasks` the task directories) it does not name.
        Task directories stay until then: the previous manifest, an undo's target, names them."""
        keep = {self.manifest[k] for k in ("current", "previous", "quantized_from")} - {None}
        self.manifest["generations"] = {g: v for g, v in self.manifest["generations"].items() if g in keep}
        write_json_atomic(self.root / MANIFEST, self.manifest)
        for d in (self.root / "aggregates").iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
        if collect_tasks:
            named = {r["files"] for r in self.manifest["tasks"].values()}
            for d in (self.root / "tasks").iterdir():
                if d.name not in named:
                    shutil.rmtree(d, ignore_errors=True)

    def bytes_used(self) -> dict[str, Any]:
        """Bytes on disk: per task (mean, max), aggregates (every kept generation), total."""
        per_task = [_dir_bytes(self.task_dir(n)) for n in self.manifest["tasks"]]
        aggregates = _dir_bytes(self.root / "aggregates")
        manifest = (self.root / MANIFEST).stat().st_size
        return {"tasks": len(per_task), "per_task_mean": sum(per_task) / max(len(per_task), 1),
                "per_task_max": max(per_task, default=0), "manifest": manifest,
                "manifest_per_task": manifest / max(len(per_task), 1),
                "aggregates": aggregates, "generations": len(self.manifest["generations"]),
                "total": sum(per_task) + aggregates + manifest}


class StoreUpdate:
    """Adds tasks (and drops `drop`) in one transaction. Each task's Hessians are folded, layer by
    layer, into a new generation of the aggregates (an exact copy of a task already covered is
    not folded again); new tasks' files go to new directories; `commit` replaces the manifest
    last, so an interrupted update changes nothing the manifest names. Dropping or replacing a
    task needs `rebuild`: the new generation starts empty and the caller folds every remaining
    task in again (`readd`, `begin(..., readd=True)`: its files stay where they are)."""

    def __init__(self, store: StatsStore, drop: Sequence[str], rebuild: bool) -> None:
        self.store, self.drop = store, set(drop)
        self.rebuild = rebuild or bool(self.drop) or not store.aggregate_current
        current = store.manifest["current"]
        self.gid = uuid.uuid4().hex[:12]
        self.partial = store.root / "aggregates" / f".{self.gid}.partial"
        self.partial.mkdir(parents=True)
        self.start = None if self.rebuild or current is None else store.root / "aggregates" / current
        self.covered = [] if self.start is None else list(store.aggregate_tasks)
        self.weight = 0.0 if self.start is None else float(store._generation()["weight"])
        records = store.tasks
        self.keys = {} if self.start is None else {records[n].content_key: n for n in self.covered}
        self.new: dict[str, tuple[TaskRecord, Path | None]] = {}  # task -> (record, its new directory)
        self.folded = False

    @property
    def readd(self) -> list[str]:
        """Stored tasks a rebuild must fold in again (every one not dropped)."""
        return [n for n in self.store.tasks if n not in self.drop] if self.rebuild else []

    def twin_of(self, record: TaskRecord) -> str | None:
        """A task covered by this update with the statistics `record` would have."""
        return self.keys.get(record.content_key)

    def files_of(self, name: str) -> Path:
        """Where a task covered by this update keeps its files."""
        if name in self.new and self.new[name][1] is not None:
            return self.new[name][1]
        return self.store.task_dir(name)

    def begin(self, record: TaskRecord, sequences: Sequence[Sequence[int]], readd: bool = False) -> "TaskFold":
        return TaskFold(self, record, sequences, readd)

    def _fold(self, layer: int, hs: Mapping[str, torch.Tensor], weight: float) -> None:
        path = self.partial / _layer_file(layer)
        old = (load_file(str(path)) if path.is_file()
               else load_file(str(self.start / _layer_file(layer))) if self.start is not None else None)
        out = {}
        for g, h in hs.items():
            h = h.detach().to("cpu", torch.float32)
            term = h.double() * weight
            if old is None:
                out.update({f"sum.{g}": term, f"max.{g}": h.clone(), f"diag.{g}": h.diagonal().clone()})
            else:
                out.update({f"sum.{g}": old[f"sum.{g}"] + term, f"max.{g}": torch.maximum(old[f"max.{g}"], h),
                            f"diag.{g}": torch.maximum(old[f"diag.{g}"], h.diagonal())})
        save_file({k: v.contiguous() for k, v in out.items()}, str(path))
        self.folded = True

    def commit(self) -> None:
        store = self.store
        if self.folded:
            missing = [i for i in range(store.num_layers) if not (self.partial / _layer_file(i)).is_file()]
            if missing:
                raise ValueError(f"aggregate update of {store.root}: layers {missing} were never folded")
        m = json.loads(json.dumps(store.manifest))
        for name in self.drop:
            m["tasks"].pop(name, None)
        for name, (record, files) in self.new.items():
            if files is not None:  # a new or replaced task: its files under a new name, never over old ones
                final = store.root / "tasks" / f"{name}.{self.gid}"
                files.rename(final)
                record = replace(record, files=final.name)
            m["tasks"][name] = asdict(record)
        keys = sorted({(m["tasks"][n]["adapter_hash"], m["tasks"][n]["calibration_hash"]) for n in self.covered})
        if self.folded:
            self.partial.rename(store.root / "aggregates" / self.gid)
            m["generations"][self.gid] = {"tasks": sorted(self.covered), "keys": keys, "weight": self.weight}
            m["previous"], m["current"] = m["current"], self.gid
        elif self.start is not None:  # only copies of covered tasks: the same aggregates cover them too
            m["generations"][m["current"]]["tasks"] = sorted(self.covered)
            shutil.rmtree(self.partial, ignore_errors=True)
        else:  # a rebuild over no task
            m["previous"], m["current"] = m["current"], None
            shutil.rmtree(self.partial, ignore_errors=True)
        store.manifest = m
        store._write()

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        for _, files in self.new.values():
            if files is not None:
                shutil.rmtree(files, ignore_errors=True)


class TaskFold:
    """One task of a StoreUpdate: each layer's Hessians given to `layer` are folded into the
    aggregates; a new task's calibration sample (and in a keep store its Hessians) is saved to a
    new directory, a re-added one keeps its files."""

    def __init__(self, update: StoreUpdate, record: TaskRecord, sequences: Sequence[Sequence[int]],
                 readd: bool) -> None:
        self.update, self.record = update, record
        self.counted = record.content_key not in update.keys  # a copy of a covered task counts once
        self.dir: Path | None = None
        if not readd:
            self.dir = update.store.root / "tasks" / f".{check_task_name(record.name)}.{update.gid}.partial"
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            _save_calibration(self.dir / CALIBRATION_FILE, sequences)
        self.layers: set[int] = set()

    def layer(self, layer: int, hs: Mapping[str, torch.Tensor]) -> None:
        if self.dir is not None and self.update.store.keep_task_hessians:
            _save_hessians(self.dir / _layer_file(layer), hs)
        if self.counted:
            self.update._fold(layer, hs, self.record.mix_weight)
        self.layers.add(layer)

    def copy_layers_from(self, twin: str) -> None:
        """A copy's statistics without a forward pass: in a keep store, its twin's Hessian files."""
        if self.dir is not None and self.update.store.keep_task_hessians:
            source = self.update.files_of(twin)
            for layer in range(self.update.store.num_layers):
                shutil.copyfile(source / _layer_file(layer), self.dir / _layer_file(layer))
        self.layers = set(range(self.update.store.num_layers))

    def done(self) -> None:
        u = self.update
        if self.layers != set(range(u.store.num_layers)):
            raise ValueError(f"task {self.record.name!r}: layers {sorted(set(range(u.store.num_layers)) - self.layers)} "
                             "were never given")
        u.covered = [n for n in u.covered if n != self.record.name] + [self.record.name]
        if self.counted:
            u.keys[self.record.content_key] = self.record.name
            u.weight += self.record.mix_weight
        u.new[self.record.name] = (self.record, self.dir)

    def abort(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
