"""On-disk cluster banks of jointly compressed adapters (Compress then Serve; docs/algorithms.md 9.9, 10).

A bank directory holds one safetensors file per cluster and an `index.json`:

    bank/
      index.json                  format name + version, kind, rank, transform, scaling_folded,
                                  modules {"layers.{l}.{module}": [d_out, d_in]},
                                  clusters [{id, file, sha256, members (row order), ranks per module}],
                                  adapters {name: cluster, row, error, max_module_error, raw_params}
      cluster_00000.safetensors   per module "layers.{l}.{module}.{U,V,sigma,errors}":
                                  U [d_out, k_c], V [d_in, k_c], sigma [n_c, k_c, k_c] (full) or
                                  [n_c, k_c] (diag), errors float32 [n_c] (9.7, per module)

Adapter `name` at (cluster c, row i) has update U_c Sigma_i V_c^T with the PEFT scaling and any
normalization already folded into Sigma_i, which is what a serving kernel computes as
y += U_c (Sigma_i (V_c^T x)). A cluster's k_c (per module) is the configured rank unless the
cluster is too small to fill it (k_c = its stacked LoRA rank, fitted exactly) or the module is
narrower. Writes are atomic (build a temporary directory, then rename it into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from inlaid_ray.atomic_files import replacing_dir
from inlaid_ray.errors import AdapterError
from inlaid_ray.lora.adapter import Kind, ModuleKey
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig

FORMAT_NAME = "inlaid-ray-cluster-bank"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
_KEY_RE = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")
_PARTS = ("U", "V", "sigma", "errors")


def module_key_name(key: ModuleKey) -> str:
    """(3, "q_proj") -> "layers.3.q_proj"."""
    return f"layers.{key[0]}.{key[1]}"


def parse_module_key(name: str) -> ModuleKey:
    """"layers.3.q_proj" -> (3, "q_proj"); ValueError on anything else."""
    m = _KEY_RE.match(name)
    if m is None or m.group(2) not in LINEAR_MODULES:
        raise ValueError(f"bad module name {name!r}; expected 'layers.<int>.<one of {LINEAR_MODULES}>'")
    return int(m.group(1)), m.group(2)


@dataclass
class ClusterBank:
    """One cluster: member names in row order and, per module, U, V, sigma and fit errors."""

    cluster_id: int
    members: list[str]
    U: dict[ModuleKey, Tensor]
    V: dict[ModuleKey, Tensor]
    sigma: dict[ModuleKey, Tensor]
    errors: dict[ModuleKey, Tensor]  # float32 [n_c]

    @property
    def ranks(self) -> dict[ModuleKey, int]:
        """k per module (the configured rank unless the cluster or the module is too small)."""
        return {key: U.shape[1] for key, U in self.U.items()}

    def core(self, key: ModuleKey, row: int) -> Tensor:
        """Sigma of one member as a k x k matrix (diagonal kinds expanded)."""
        s = self.sigma[key][row]
        return s if s.dim() == 2 else torch.diag(s)

    def delta(self, key: ModuleKey, row: int) -> Tensor:
        """Dense U Sigma_row V^T [d_out, d_in] (tests and evaluation only)."""
        return self.U[key] @ self.core(key, row) @ self.V[key].T


@dataclass(frozen=True)
class AdapterEntry:
    """Where one adapter lives in the bank and how well it was fitted."""

    cluster: int
    row: int
    error: float  # mean over modules of the relative squared error (9.7)
    max_module_error: float
    raw_params: int  # LoRA parameters of the original adapter (for size reports); 0 if unknown


@dataclass
class ClusterBanks:
    """All clusters of one compressed adapter set plus the name index."""

    clusters: list[ClusterBank]
    adapters: dict[str, AdapterEntry]
    kind: Kind
    rank: int  # configured rank; a cluster's own may be lower (see module doc)
    transform: str
    module_shapes: dict[ModuleKey, tuple[int, int]]  # (d_out, d_in)
    extra: dict[str, Any] = field(default_factory=dict)  # fit settings, stored verbatim

    @property
    def module_keys(self) -> list[ModuleKey]:
        return sorted(self.module_shapes)

    def locate(self, name: str) -> tuple[int, int]:
        """(cluster, row) of an adapter name; AdapterError names unknown adapters."""
        if name not in self.adapters:
            raise AdapterError(f"adapter {name!r} is not in this cluster bank ({len(self.adapters)} adapters)")
        entry = self.adapters[name]
        return entry.cluster, entry.row

    def delta(self, name: str, key: ModuleKey) -> Tensor:
        """Dense reconstructed update of one adapter and module (tests and evaluation only)."""
        c, row = self.locate(name)
        return self.clusters[c].delta(key, row)


def to_peft_factors(cluster: ClusterBank, row: int) -> dict[ModuleKey, tuple[Tensor, Tensor]]:
    """An equivalent rank-k_c LoRA of one member: A = V^T [k, d_in], B = U Sigma_row [d_out, k].

    Scaling is 1: when written as PEFT, set r = lora_alpha = k (docs/algorithms.md 4 and 11.10).
    """
    if not 0 <= row < len(cluster.members):
        raise ValueError(f"row {row} outside cluster {cluster.cluster_id} of {len(cluster.members)} members")
    out = {}
    for key in cluster.U:
        s = cluster.sigma[key][row]
        B = cluster.U[key] * s if s.dim() == 1 else cluster.U[key] @ s
        out[key] = (cluster.V[key].T.contiguous(), B.contiguous())
    return out


def stack_for_serving(
    banks: ClusterBanks, key: ModuleKey, *, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One module of every cluster as the dense stacks a batched kernel takes (kernels/compressed_lora):
    V [C, d_in, k], U [C, d_out, k], sigma [C, n_max, k, k] (full) or [C, n_max, k] (diag).

    Clusters with a smaller k_c or fewer members are zero-padded, which leaves every
    U_c Sigma_i V_c^T unchanged; k is the largest k_c of this module.
    """
    d_out, d_in = banks.module_shapes[key]
    k = max(cl.ranks[key] for cl in banks.clusters)
    n_max = max(len(cl.members) for cl in banks.clusters)
    ref = banks.clusters[0].U[key]
    device, dtype = device or ref.device, dtype or ref.dtype
    C, full = len(banks.clusters), banks.kind == "full"
    V = torch.zeros(C, d_in, k, device=device, dtype=dtype)
    U = torch.zeros(C, d_out, k, device=device, dtype=dtype)
    sig = torch.zeros((C, n_max, k, k) if full else (C, n_max, k), device=device, dtype=dtype)
    for c, cl in enumerate(banks.clusters):
        kc, n_c = cl.ranks[key], len(cl.members)
        V[c, :, :kc] = cl.V[key]
        U[c, :, :kc] = cl.U[key]
        if full:
            sig[c, :n_c, :kc, :kc] = cl.sigma[key]
        else:
            sig[c, :n_c, :kc] = cl.sigma[key]
    return V, U, sig


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _index(banks: ClusterBanks, files: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": banks.kind,
        "rank": banks.rank,
        "transform": banks.transform,
        "scaling_folded": True,
        "modules": {module_key_name(k): list(banks.module_shapes[k]) for k in banks.module_keys},
        "clusters": [
            {"id": cl.cluster_id, "file": fname, "sha256": digest, "members": cl.members,
             "ranks": {module_key_name(k): r for k, r in sorted(cl.ranks.items())}}
            for cl, (fname, digest) in zip(banks.clusters, files)
        ],
        "adapters": {
            name: {"cluster": e.cluster, "row": e.row, "error": e.error,
                   "max_module_error": e.max_module_error, "raw_params": e.raw_params}
            for name, e in sorted(banks.adapters.items())
        },
        "extra": banks.extra,
    }


def save_cluster_banks(banks: ClusterBanks, path: str | Path, overwrite: bool = False) -> Path:
    """Write banks to directory `path` atomically (build in a sibling temp dir, then rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with replacing_dir(path) as tmp:
        files = []
        for cl in banks.clusters:
            fname = f"cluster_{cl.cluster_id:05d}.safetensors"
            tensors = {}
            for key in banks.module_keys:
                base = module_key_name(key)
                for part in _PARTS:
                    tensors[f"{base}.{part}"] = getattr(cl, part)[key].detach().cpu().contiguous()
            save_file(tensors, str(tmp / fname), metadata={"format": FORMAT_NAME, "cluster": str(cl.cluster_id)})
            files.append((fname, _sha256(tmp / fname)))
        with open(tmp / INDEX_FILE, "w") as f:
            json.dump(_index(banks, files), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return path


def _read_index(path: Path) -> dict[str, Any]:
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise AdapterError(f"{path} is not a cluster bank: no {INDEX_FILE}")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{index_path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise AdapterError(f"{index_path}: format is {index.get('format') if isinstance(index, dict) else None!r}, expected {FORMAT_NAME!r}")
    version = index.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterError(f"{index_path}: format_version {version!r} not supported (this reader: 1..{FORMAT_VERSION})")
    missing = [k for k in ("kind", "rank", "transform", "scaling_folded", "modules", "clusters", "adapters") if k not in index]
    if missing:
        raise AdapterError(f"{index_path}: missing keys {missing}")
    if index["kind"] not in ("full", "diag"):
        raise AdapterError(f"{index_path}: kind {index['kind']!r} is not 'full' or 'diag'")
    if index["scaling_folded"] is not True:
        raise AdapterError(f"{index_path}: scaling_folded is {index['scaling_folded']!r}; only folded banks are supported")
    return index


def _check_tensors(where: str, tensors: dict[str, Tensor], shapes: dict[ModuleKey, tuple[int, int]],
                   kind: str, n_c: int, ranks: dict[str, int]) -> None:
    """Validate one cluster file's tensors against the index (shapes, per-module ranks, rows)."""
    expected = {f"{module_key_name(k)}.{p}" for k in shapes for p in _PARTS}
    if set(tensors) != expected:
        raise AdapterError(
            f"{where}: tensor names differ from the index: missing {sorted(expected - set(tensors))[:4]}, "
            f"unexpected {sorted(set(tensors) - expected)[:4]}"
        )
    for key, (d_out, d_in) in shapes.items():
        base = module_key_name(key)
        U, V, sig, err = (tensors[f"{base}.{p}"] for p in _PARTS)
        k_c = ranks.get(base)
        if not isinstance(k_c, int) or not 1 <= k_c <= min(d_out, d_in):
            raise AdapterError(f"{where}: index rank {k_c!r} for {base} is not in 1..{min(d_out, d_in)}")
        k = k_c
        want_sig = (n_c, k, k) if kind == "full" else (n_c, k)
        if (tuple(U.shape), tuple(V.shape), tuple(sig.shape), tuple(err.shape)) != (
            (d_out, k_c), (d_in, k_c), want_sig, (n_c,)
        ):
            raise AdapterError(
                f"{where}: {base} has U {tuple(U.shape)}, V {tuple(V.shape)}, sigma {tuple(sig.shape)}, "
                f"errors {tuple(err.shape)}; expected U ({d_out}, {k_c}), V ({d_in}, {k_c}), sigma {want_sig}, "
                f"errors ({n_c},) for kind {kind!r}"
            )
        if not all(torch.isfinite(t).all() for t in (U, V, sig)):
            raise AdapterError(f"{where}: {base} contains NaN or Inf")


def load_cluster_banks(
    path: str | Path,
    *,
    model_config: ModelConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify_checksums: bool = True,
) -> ClusterBanks:
    """Read and validate a bank directory; AdapterError says what is wrong and where.

    model_config: if given, every module's (d_out, d_in) and layer index must fit the model.
    """
    path = Path(path)
    index = _read_index(path)
    try:
        shapes = {parse_module_key(name): (int(s[0]), int(s[1])) for name, s in index["modules"].items()}
    except (ValueError, TypeError, IndexError) as exc:
        raise AdapterError(f"{path}: bad modules entry in the index: {exc}") from exc
    if model_config is not None:
        for key, shape in shapes.items():
            if key[0] >= model_config.num_layers or model_config.module_shape(key[1]) != shape:
                raise AdapterError(
                    f"{path}: module {module_key_name(key)} {shape} does not fit the model "
                    f"({model_config.num_layers} layers, {key[1]} shape {model_config.module_shape(key[1])})"
                )
    clusters = []
    for c, meta in enumerate(index["clusters"]):
        if meta.get("id") != c:
            raise AdapterError(f"{path}: cluster entry {c} has id {meta.get('id')!r}; ids must be 0..K-1 in order")
        file = path / str(meta.get("file", ""))
        if not file.is_file() or file.parent != path:
            raise AdapterError(f"{path}: cluster {c} file {meta.get('file')!r} is missing")
        if verify_checksums and _sha256(file) != meta.get("sha256"):
            raise AdapterError(f"{file}: sha256 mismatch (corrupt or replaced file)")
        try:
            tensors = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise AdapterError(f"{file}: not a readable safetensors file: {exc}") from exc
        members = list(meta.get("members", []))
        ranks = meta.get("ranks")
        _check_tensors(str(file), tensors, shapes, index["kind"], len(members), ranks if isinstance(ranks, dict) else {})
        conv = {p: {} for p in _PARTS}
        for key in shapes:
            for p in _PARTS:
                t = tensors[f"{module_key_name(key)}.{p}"]
                conv[p][key] = t.to(device=device, dtype=dtype if (dtype is not None and p != "errors") else t.dtype)
        clusters.append(ClusterBank(c, members, conv["U"], conv["V"], conv["sigma"], conv["errors"]))
    adapters = {}
    seen = set()
    for name, e in index["adapters"].items():
        c, row = e.get("cluster"), e.get("row")
        if not (isinstance(c, int) and 0 <= c < len(clusters)) or not (
            isinstance(row, int) and 0 <= row < len(clusters[c].members) and clusters[c].members[row] == name
        ):
            raise AdapterError(f"{path}: adapter {name!r} points at cluster {c!r} row {row!r}, which does not hold it")
        seen.add((c, row))
        adapters[name] = AdapterEntry(c, row, float(e.get("error", 0.0)), float(e.get("max_module_error", 0.0)),
                                      int(e.get("raw_params", 0)))
    total = sum(len(cl.members) for cl in clusters)
    if len(seen) != total:
        raise AdapterError(f"{path}: index lists {len(seen)} adapters but the clusters hold {total} rows")
    return ClusterBanks(clusters, adapters, index["kind"], int(index["rank"]), str(index["transform"]),
                        shapes, dict(index.get("extra", {})))


def add_adapter(
    banks: ClusterBanks, name: str, cluster: int, cores: dict[ModuleKey, Tensor], errors: dict[ModuleKey, float],
    raw_params: int = 0,
) -> AdapterEntry:
    """Append a projected adapter (e.g. clustering.assign_new_adapter's cores) as a new row of a cluster."""
    if name in banks.adapters:
        raise AdapterError(f"adapter {name!r} is already in the bank")
    if not 0 <= cluster < len(banks.clusters):
        raise ValueError(f"cluster {cluster} outside 0..{len(banks.clusters) - 1}")
    cl = banks.clusters[cluster]
    if set(cores) != set(cl.U) or set(errors) != set(cl.U):
        raise ValueError(f"cores/errors must cover exactly the bank's {len(cl.U)} modules")
    for key, core in cores.items():
        want = tuple(cl.sigma[key].shape[1:])
        if tuple(core.shape) != want:
            raise ValueError(f"core of {module_key_name(key)} has shape {tuple(core.shape)}, cluster needs {want}")
        cl.sigma[key] = torch.cat([cl.sigma[key], core.to(cl.sigma[key]).unsqueeze(0)])
        cl.errors[key] = torch.cat([cl.errors[key], torch.tensor([errors[key]], dtype=cl.errors[key].dtype)])
    cl.members.append(name)
    vals = list(errors.values())
    entry = AdapterEntry(cluster, len(cl.members) - 1, sum(vals) / len(vals), max(vals), raw_params)
    banks.adapters[name] = entry
    return entry


def bank_size_report(banks: ClusterBanks, raw_element_bytes: int | None = None) -> dict[str, Any]:
    """Bytes and parameter counts, compressed vs the original LoRAs (9.9).

    raw_element_bytes: element size assumed for the originals; default = the bank's own element
    size, so the ratio compares parameter counts at equal precision.
    """
    shared = core = 0
    shared_params = core_params = 0
    elem = None
    for cl in banks.clusters:
        for key in cl.U:
            shared += cl.U[key].nbytes + cl.V[key].nbytes
            shared_params += cl.U[key].numel() + cl.V[key].numel()
            core += cl.sigma[key].nbytes
            core_params += cl.sigma[key].numel()
            elem = cl.U[key].element_size()
    n = max(len(banks.adapters), 1)
    raw_params = sum(e.raw_params for e in banks.adapters.values())
    raw_bytes = raw_params * (raw_element_bytes or elem or 4)
    total = shared + core
    return {
        "num_adapters": len(banks.adapters),
        "num_clusters": len(banks.clusters),
        "kind": banks.kind,
        "rank": banks.rank,
        "compressed_bytes": total,
        "shared_basis_bytes": shared,
        "core_bytes": core,
        "compressed_bytes_per_adapter": total / n,
        "core_bytes_per_adapter": core / n,
        "raw_bytes": raw_bytes,
        "raw_bytes_per_adapter": raw_bytes / n,
        "compressed_params": shared_params + core_params,
        "raw_params": raw_params,
        "compression_ratio": (raw_bytes / total) if total else float("nan"),
    }
