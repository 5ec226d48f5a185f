"""Compressed adapters resident in a live `AdapterBank` (Compress then Serve, docs/algorithms.md 9.10):
clusters of adapters that share bases U_c, V_c and differ by a core Sigma_i, served as
y += U_c (Sigma_i (V_c^T x)) per token by `inlaid_ray.kernels.ops.compressed_lora`.

Layout per projection kind, all layers: `V [L, C, d_in, K]`, `U [L, C, d_out, K]` and `sigma
[L, C, N, K, K]` (full cores) or `[L, C, N, K]` (diagonal cores), for C cluster slots of up to N
member rows and shared rank K. A cluster of rank k_c < K, with fewer members, or not covering a
module is zero-padded, which leaves every U_c Sigma_i V_c^T unchanged (or zero). Storage for a
projection kind is allocated the first time a cluster covers it, as in the raw bank. Diagonal
cores are kept diagonal until a full-core cluster arrives; then the store switches to full
(diag_embed, one reallocation), so both kinds can be resident at once.

Slot ids: the adapter in (cluster slot c, row i) answers to bank slot `base + c * N + i`, base =
the raw bank's max_slots. The id is increasing in c, so a `LoRABatch` (slots ascending) already
lists raw segments first and compressed segments grouped by cluster: `split_lora_batch` slices
it into a raw `LoRABatch` and a `CompressedLoRABatch` from host-side lists, with no device sync.
Example, base 8, N 4: slots [1, 9, 13, 14] -> raw slot 1; cluster 0 row 1; cluster 1 rows 1, 2.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from inlaid_ray.errors import AdapterError, NoFreeSlot
from inlaid_ray.kernels.compressed_lora_batch import CompressedLoRABatch
from inlaid_ray.lora.cluster_bank import ClusterBank, module_key_name
from inlaid_ray.lora.adapter import Kind, ModuleKey
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.forward_batch import LoRABatch

# Which implementation the bank's ops use: "auto" = Triton on CUDA, PyTorch reference elsewhere.
Kernels = Literal["auto", "reference", "triton"]
# (y [T, d_out] in place, x [T, d_in], v [C, d_in, K], u [C, d_out, K], sigma [C, N, K(, K)], batch) -> None
CompressedOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, CompressedLoRABatch], None]


def select_compressed_op(device: torch.device, kernels: Kernels = "auto") -> CompressedOp:
    """The compressed-LoRA implementation: "auto" = Triton on CUDA, PyTorch reference elsewhere
    (`kernels.ops` dispatch); "reference"; "triton" (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if kernels == "reference":
        from inlaid_ray.kernels.reference import compressed_lora_ref

        return compressed_lora_ref
    if kernels == "triton":
        from inlaid_ray.kernels.compressed_lora import compressed_lora

        return compressed_lora
    if kernels == "auto":
        from inlaid_ray.kernels import ops

        return ops.compressed_lora
    raise ValueError(f"kernels={kernels!r}; expected 'auto', 'reference' or 'triton'")


@dataclass
class StepPlan:
    """One step's tokens split by storage: raw slots for the LoRA op, clusters for the compressed op."""

    raw: LoRABatch | None
    compressed: CompressedLoRABatch | None
    raw_slots: frozenset[int]
    clusters: frozenset[int]


def split_lora_batch(batch: LoRABatch, slot_base: int, rows_per_cluster: int) -> StepPlan:
    """Split a step's `LoRABatch` at `slot_base` (see module docstring); no device sync."""
    slots, counts = batch.slots_list, batch.counts_list
    n_raw = bisect.bisect_left(slots, slot_base)
    if n_raw == len(slots):
        return StepPlan(batch, None, frozenset(slots), frozenset())
    raw_tokens = sum(counts[:n_raw])
    ts = batch.token_slots
    raw = None
    if n_raw:
        raw = LoRABatch(
            token_slots=torch.where(ts < slot_base, ts, -1),
            sorted_token_ids=batch.sorted_token_ids[:raw_tokens], sorted_slots=batch.sorted_slots[:raw_tokens],
            slots=batch.slots[:n_raw], counts=batch.counts[:n_raw], offsets=batch.offsets[:n_raw],
            slots_list=slots[:n_raw], counts_list=counts[:n_raw], offsets_list=batch.offsets_list[:n_raw],
        )
    clusters: list[int] = []
    c_counts: list[int] = []
    for slot, count in zip(slots[n_raw:], counts[n_raw:]):
        c = (slot - slot_base) // rows_per_cluster
        if clusters and clusters[-1] == c:
            c_counts[-1] += count
        else:
            clusters.append(c)
            c_counts.append(count)
    offsets = [0]
    for count in c_counts[:-1]:
        offsets.append(offsets[-1] + count)
    meta = torch.tensor([clusters, c_counts, offsets], dtype=torch.int64).to(ts.device, non_blocking=True)
    rel = (ts - slot_base).clamp_min(0)
    compressed = ts >= slot_base
    cbatch = CompressedLoRABatch(
        token_clusters=torch.where(compressed, rel // rows_per_cluster, -1),
        token_rows=torch.where(compressed, rel % rows_per_cluster, 0),
        sorted_token_ids=batch.sorted_token_ids[raw_tokens:],
        clusters=meta[0], counts=meta[1], offsets=meta[2],
        clusters_list=clusters, counts_list=c_counts, offsets_list=offsets,
    )
    return StepPlan(raw, cbatch, frozenset(slots[:n_raw]), frozenset(clusters))


@dataclass
class StagedCluster:
    """A validated cluster cast to the store's dtype and device, ready to be written."""

    members: list[str]
    kind: Kind
    U: dict[ModuleKey, torch.Tensor]  # [d_out, k_c]
    V: dict[ModuleKey, torch.Tensor]  # [d_in, k_c]
    sigma: dict[ModuleKey, torch.Tensor]  # [n_c, k_c, k_c] or [n_c, k_c]
    label: str


class CompressedStore:
    """Cluster slots of a live AdapterBank (see module docstring). Not locked: the bank locks."""

    def __init__(
        self, model_config: ModelConfig, slot_base: int, max_clusters: int, max_rank: int, max_size: int,
        dtype: torch.dtype, device: torch.device, kernels: Kernels = "auto",
    ) -> None:
        if max_clusters < 0 or (max_clusters and (max_rank <= 0 or max_size <= 0)):
            raise ValueError(f"max_clusters={max_clusters} needs positive max_cluster_rank ({max_rank}) "
                             f"and max_cluster_size ({max_size})")
        self.config, self.slot_base = model_config, slot_base
        self.max_clusters, self.max_rank, self.max_size = max_clusters, max_rank, max_size
        self.dtype, self.device = dtype, device
        self.kind: Kind | None = None  # core layout of the storage, fixed by the first cluster
        self.V: dict[str, torch.Tensor] = {}  # module -> [L, C, d_in, K]
        self.U: dict[str, torch.Tensor] = {}  # module -> [L, C, d_out, K]
        self.sigma: dict[str, torch.Tensor] = {}  # module -> [L, C, N, K, K] or [L, C, N, K]
        self.rows: list[list[str | None]] = [[None] * max_size for _ in range(max_clusters)]
        self.labels: list[str | None] = [None] * max_clusters  # None = free cluster slot
        self.ranks: list[dict[ModuleKey, int]] = [{} for _ in range(max_clusters)]  # k_c per module
        self.location: dict[str, tuple[int, int]] = {}  # adapter name -> (cluster slot, row)
        self._targeting: dict[ModuleKey, set[int]] = {}  # (layer, module) -> clusters with a non-zero core
        self._op = select_compressed_op(device, kernels)

    # ------------------------------------------------------------------ lookup

    def slot(self, name: str) -> int:
        c, row = self.location[name]
        return self.slot_base + c * self.max_size + row

    def names(self) -> list[str]:
        return [n for rows in self.rows for n in rows if n is not None]

    def used_clusters(self) -> list[int]:
        return [c for c, label in enumerate(self.labels) if label is not None]

    def basis(self, cluster: int, key: ModuleKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d_out, k_c], V [d_in, k_c]) of a resident cluster: what a new adapter is projected on."""
        self._check_cluster(cluster)
        if key not in self.ranks[cluster]:
            raise AdapterError(f"cluster slot {cluster} does not cover {module_key_name(key)}")
        layer, module = key
        k = self.ranks[cluster][key]
        return self.U[module][layer, cluster, :, :k], self.V[module][layer, cluster, :, :k]

    # ------------------------------------------------------------------ staging (no writes)

    def stage_cluster(self, cluster: ClusterBank, label: str = "") -> StagedCluster:
        """Validate a cluster against the model and the store's capacity and cast it; AdapterError otherwise."""
        where = f"cluster {label or cluster.cluster_id!r}"
        members = list(cluster.members)
        if not members:
            raise AdapterError(f"{where} has no members")
        if len(set(members)) != len(members) or not all(isinstance(m, str) and m for m in members):
            raise AdapterError(f"{where}: member names must be distinct non-empty strings, got {members[:8]}")
        if len(members) > self.max_size:
            raise AdapterError(f"{where} has {len(members)} members > bank max_cluster_size {self.max_size}")
        keys = set(cluster.U)
        if not keys or set(cluster.V) != keys or set(cluster.sigma) != keys:
            raise AdapterError(f"{where}: U, V and sigma must cover the same non-empty module set")
        kinds = {("full" if cluster.sigma[k].dim() == 3 else "diag") for k in keys}
        if len(kinds) != 1:
            raise AdapterError(f"{where} mixes full and diagonal cores across modules")
        kind: Kind = kinds.pop()
        U, V, S = {}, {}, {}
        for key in sorted(keys):
            self._check_key(key, where)
            d_out, d_in = self.config.module_shape(key[1])
            u, v, s = cluster.U[key], cluster.V[key], cluster.sigma[key]
            k = u.shape[1] if u.dim() == 2 else -1
            want_s = (len(members), k, k) if kind == "full" else (len(members), k)
            if (tuple(u.shape), tuple(v.shape), tuple(s.shape)) != ((d_out, k), (d_in, k), want_s):
                raise AdapterError(f"{where} {module_key_name(key)}: U {tuple(u.shape)}, V {tuple(v.shape)}, "
                                   f"sigma {tuple(s.shape)} do not fit ({d_out}, k), ({d_in}, k), {want_s}")
            if not 1 <= k <= self.max_rank:
                raise AdapterError(f"{where} {module_key_name(key)}: rank {k} > bank max_cluster_rank {self.max_rank}")
            U[key], V[key], S[key] = (self._cast(t, where, key) for t in (u, v, s))
        return StagedCluster(members, kind, U, V, S, label or f"cluster-{cluster.cluster_id}")

    def stage_cores(self, cluster: int, name: str, cores: Mapping[ModuleKey, torch.Tensor]) -> dict[ModuleKey, torch.Tensor]:
        """Validate one new member's cores (per module [k_c, k_c] or [k_c]) for a resident cluster."""
        self._check_cluster(cluster)
        where = f"adapter {name!r} in cluster slot {cluster}"
        if set(cores) != set(self.ranks[cluster]):
            missing = sorted(set(self.ranks[cluster]) - set(cores))[:4]
            extra = sorted(set(cores) - set(self.ranks[cluster]))[:4]
            raise AdapterError(f"{where}: cores must cover the cluster's modules; missing {missing}, extra {extra}")
        out = {}
        for key, core in cores.items():
            k = self.ranks[cluster][key]
            if tuple(core.shape) not in ((k, k), (k,)):
                raise AdapterError(f"{where} {module_key_name(key)}: core {tuple(core.shape)}, cluster rank is {k}")
            out[key] = self._cast(core, where, key)
        return out

    def free_cluster(self, label: str) -> int:
        """A free cluster slot; NoFreeSlot if none."""
        for c, used in enumerate(self.labels):
            if used is None:
                return c
        raise NoFreeSlot(f"no free cluster slot for {label!r} ({self.max_clusters} slots, resident: "
                         f"{[x for x in self.labels if x is not None][:8]}); remove a cluster first")

    def free_row(self, cluster: int, name: str) -> int:
        self._check_cluster(cluster)
        for row, used in enumerate(self.rows[cluster]):
            if used is None:
                return row
        raise NoFreeSlot(f"cluster slot {cluster} ({self.labels[cluster]!r}) is full ({self.max_size} rows); "
                         f"cannot add {name!r}")

    # ------------------------------------------------------------------ writes (never raise)

    def write_cluster(self, c: int, staged: StagedCluster) -> None:
        """Write a staged cluster into free slot c; its members take rows 0..n_c-1."""
        self._ensure_kind(staged.kind)
        for module in {m for _, m in staged.U}:
            self._ensure_module(module)
        for key in staged.U:
            layer, module = key
            k = staged.U[key].shape[1]
            self.U[module][layer, c, :, :k] = staged.U[key]
            self.V[module][layer, c, :, :k] = staged.V[key]
            self._write_cores(key, c, slice(0, len(staged.members)), staged.sigma[key])
            self.ranks[c][key] = k
            if bool(staged.sigma[key].any()):  # all-zero cores (a module no member adapts) cost nothing
                self._targeting.setdefault(key, set()).add(c)
        self.labels[c] = staged.label
        for row, name in enumerate(staged.members):
            self.rows[c][row] = name
            self.location[name] = (c, row)

    def write_row(self, c: int, row: int, name: str, cores: dict[ModuleKey, torch.Tensor]) -> None:
        if any(core.dim() == 2 for core in cores.values()):
            self._ensure_kind("full")
        for key, core in cores.items():
            self._write_cores(key, c, slice(row, row + 1), core.unsqueeze(0))
            if bool(core.any()):
                self._targeting.setdefault(key, set()).add(c)
        self.rows[c][row] = name
        self.location[name] = (c, row)

    def remove_name(self, name: str) -> None:
        """Zero the name's core rows; a cluster left without members is freed entirely."""
        c, row = self.location.pop(name)
        for (layer, module) in self.ranks[c]:
            self.sigma[module][layer, c, row].zero_()
        self.rows[c][row] = None
        if all(n is None for n in self.rows[c]):
            self.remove_cluster(c)

    def remove_cluster(self, c: int) -> list[str]:
        """Free cluster slot c (bases and cores zeroed); returns the names it held."""
        self._check_cluster(c)
        names = [n for n in self.rows[c] if n is not None]
        for name in names:
            del self.location[name]
        for module in self.U:
            self.U[module][:, c].zero_()
            self.V[module][:, c].zero_()
            self.sigma[module][:, c].zero_()
        for key in self.ranks[c]:
            self._targeting.get(key, set()).discard(c)
        self.ranks[c] = {}
        self.rows[c] = [None] * self.max_size
        self.labels[c] = None
        return names

    # ------------------------------------------------------------------ compute

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, plan: StepPlan) -> None:
        """y[t] += U_c Sigma_row V_c^T x[t] for this step's compressed tokens; skipped if no active cluster covers it."""
        targeting = self._targeting.get((layer, module))
        if plan.compressed is None or not targeting or targeting.isdisjoint(plan.clusters):
            return
        self._op(y, x, self.V[module][layer], self.U[module][layer], self.sigma[module][layer], plan.compressed)

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.U, self.V, self.sigma) for t in d.values())

    # ------------------------------------------------------------------ internals

    def _check_cluster(self, c: int) -> None:
        if not (0 <= c < self.max_clusters and self.labels[c] is not None):
            raise AdapterError(f"cluster slot {c} is not resident (resident: {self.used_clusters()})")

    def _check_key(self, key: ModuleKey, where: str) -> None:
        layer, module = key
        if module not in LINEAR_MODULES or not 0 <= layer < self.config.num_layers:
            raise AdapterError(f"{where}: module {key} is not one of layers 0..{self.config.num_layers - 1} "
                               f"x {LINEAR_MODULES}")

    def _cast(self, t: torch.Tensor, where: str, key: ModuleKey) -> torch.Tensor:
        out = t.to(self.device, self.dtype)
        if not bool(torch.isfinite(out).all()):
            raise AdapterError(f"{where} {module_key_name(key)}: non-finite values after casting to {self.dtype}")
        return out

    def _write_cores(self, key: ModuleKey, c: int, rows: slice, cores: torch.Tensor) -> None:
        """cores [n, k, k] or [n, k] into rows of cluster c, embedding diagonals in a full store."""
        layer, module = key
        k = cores.shape[1]
        dst = self.sigma[module][layer, c, rows]
        dst.zero_()
        if self.kind == "full":
            dst[:, :k, :k] = cores if cores.dim() == 3 else torch.diag_embed(cores)
        else:
            dst[:, :k] = cores

    def _ensure_kind(self, kind: Kind) -> None:
        if self.kind is None or (self.kind == "diag" and kind == "full"):
            self.sigma = {m: torch.diag_embed(s) for m, s in self.sigma.items()}  # no-op while empty
            self.kind = kind

    def _ensure_module(self, module: str) -> None:
        if module in self.U:
            return
        d_out, d_in = self.config.module_shape(module)
        shape = (self.config.num_layers, self.max_clusters)
        kw = dict(dtype=self.dtype, device=self.device)
        self.V[module] = torch.zeros(*shape, d_in, self.max_rank, **kw)
        self.U[module] = torch.zeros(*shape, d_out, self.max_rank, **kw)
        core = (self.max_rank, self.max_rank) if self.kind == "full" else (self.max_rank,)
        self.sigma[module] = torch.zeros(*shape, self.max_size, *core, **kw)
