"""The multi-LoRA adapter bank of one replica: many adapters of different ranks and target
modules resident at once, in the padded slot layout the multi-LoRA ops read (punica / S-LoRA
style, see `inlaid_ray.kernels.reference`).

Layout per (layer, module): `lora_a [max_slots, max_rank, d_in]`, `lora_b [max_slots, d_out,
max_rank]`, the adapter scaling folded into `lora_b`, ranks below `max_rank` zero-padded and
modules an adapter does not target left at zero. Example, max_rank 4: an r=2 adapter in slot 1
targeting only q_proj has `lora_a[1, :2]` = A, `lora_a[1, 2:]` = 0 for q_proj, and all-zero
rows in slot 1 of every other module.

Memory choice: storage for a projection kind (say v_proj, all layers in one tensor) is
allocated the first time any adapter targets it and then kept for the bank's lifetime. That
costs nothing for modules no adapter uses (q,k,v-only adapters on a 7B shape need ~31% of the
all-linear bytes) while the number of allocations stays <= 7, so tensor addresses change at
most 7 times (`generation` counts every change so pointer tables / CUDA graphs can rebuild).
Per-layer-per-slot allocation would save a little more but make addresses change on every add.
Projections the model fuses along their outputs (`FUSED_PROJECTIONS`: q/k/v, gate/up) are
allocated together, side by side: one `[L, S, P * max_rank, d_in]` A and one `[L, S, sum of
d_out, max_rank]` B per group, whose slices are the members' tensors. The group's LoRA term is
then one shrink and one expand launch (`add_fused_delta`), at the price of allocating a whole
group when an adapter targets one member of it.

Compressed adapters (Compress then Serve) live in the same bank, in cluster slots of a
`CompressedStore` (inlaid_ray/lora/compressed_bank.py): a name resolves to a raw slot or to a
(cluster, row) reference with its own slot id >= max_slots, so one step mixes raw, compressed
and base-only tokens; `add_delta` sends raw tokens through the multi-LoRA op and compressed
tokens through the compressed op. Live API (between engine steps, e.g. for onboarding):
`add(adapter)` / `remove(name)` for raw adapters and any name; `add_cluster(cluster)` loads a
whole compressed cluster (every member becomes resident, replacing a resident adapter of the
same name, raw or compressed: recompressing = adding the new cluster version);
`add_to_cluster(name, cluster_slot, cores)` puts a new adapter projected onto a resident
cluster's bases (`cluster_basis`) into a free row; `remove_cluster(cluster_slot)`.

Atomicity: every add validates, converts and pads everything before its first write, so a
failing add leaves the bank untouched; writes and bookkeeping happen under `lock`, which the
engine holds for a whole forward step, so a step sees an adapter's old or new version, never a mix.
In serving, only the engine writes (`engine/adapters.py` commands, applied between steps in its
thread); other threads read `view`, an immutable snapshot replaced at the end of every write.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from inlaid_ray.errors import AdapterError, NoFreeSlot, TaskNotFound
from inlaid_ray.kernels.reference import lora_shrink_expand_ref
from inlaid_ray.lora.adapter import LoRAAdapter, check_adapter_fits
from inlaid_ray.lora.cluster_bank import ClusterBank
from inlaid_ray.lora.adapter import ModuleKey
from inlaid_ray.lora.compressed_bank import CompressedStore, Kernels, StepPlan, split_lora_batch
from inlaid_ray.model.config import FUSED_PROJECTIONS, LINEAR_MODULES, ModelConfig
from inlaid_ray.model.forward_batch import LoRABatch

# (y [T, d_out] in place, x [T, d_in], lora_a [S, R, d_in], lora_b [S, d_out, R], batch, *, ranks [S]) -> None
LoRAOp = Callable[..., None]


def _reference_lora_op(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       batch: LoRABatch, *, ranks: torch.Tensor | None = None) -> None:
    lora_shrink_expand_ref(y, x, lora_a, lora_b, batch)  # ranks is only a skip hint for kernels


@dataclass(frozen=True)
class FusedGroup:
    """Side-by-side LoRA storage of one group of output-fused projections (see module doc)."""

    modules: tuple[str, ...]
    a: tuple[torch.Tensor, ...]  # per layer: [S, P * max_rank, d_in]
    b: tuple[torch.Tensor, ...]  # per layer: [S, sum of d_out, max_rank]
    slices: tuple[tuple[int, ...], torch.Tensor]  # (d_out per member, their boundaries on the device)


def select_lora_slices_op(device: torch.device, kernels: Kernels = "auto") -> LoRAOp | None:
    """The fused-group op where one launch pair serves a group (Triton: CUDA, or CPU under
    TRITON_INTERPRET=1 for tests); None where the reference runs, which adds member by member
    and skips members no adapter of the step targets (fewer CPU ops)."""
    if kernels == "reference" or (kernels == "auto" and torch.device(device).type != "cuda"):
        return None
    if kernels == "auto":
        from inlaid_ray.kernels import ops

        return ops.lora_shrink_expand_slices
    from inlaid_ray.kernels.lora_sgmv import lora_shrink_expand_slices

    return lora_shrink_expand_slices


def select_lora_op(device: torch.device, kernels: Kernels = "auto") -> LoRAOp:
    """The single place the shrink+expand implementation is chosen: "auto" = the Triton SGMV
    kernels (`kernels.ops.lora_shrink_expand`) on CUDA, the PyTorch reference elsewhere;
    "reference"; "triton" (CUDA, or CPU under TRITON_INTERPRET=1, for tests)."""
    if kernels == "reference" or (kernels == "auto" and torch.device(device).type != "cuda"):
        return _reference_lora_op
    if kernels == "auto":
        from inlaid_ray.kernels import ops

        return ops.lora_shrink_expand
    if kernels == "triton":
        from inlaid_ray.kernels.lora_sgmv import lora_shrink_expand

        return lora_shrink_expand
    raise ValueError(f"kernels={kernels!r}; expected 'auto', 'reference' or 'triton'")


@dataclass(frozen=True)
class BankView:
    """What a bank holds, as of its last completed write (safe to read from any thread)."""

    max_slots: int
    free_slots: int
    raw: frozenset[str]
    compressed: Mapping[str, tuple[int, int]]  # name -> (cluster slot, row)
    clusters: Mapping[int, tuple[str, ...]]  # used cluster slot -> members in row order
    max_clusters: int
    max_cluster_size: int
    max_cluster_rank: int

    def __contains__(self, name: object) -> bool:
        return name in self.raw or name in self.compressed

    def cluster_of(self, name: str) -> tuple[int, int] | None:
        """(cluster slot, row) of a compressed adapter; None when raw or absent."""
        return self.compressed.get(name)

    @property
    def free_clusters(self) -> int:
        return self.max_clusters - len(self.clusters)


class AdapterBank:
    """Fixed-capacity slots of raw LoRA adapters plus compressed cluster slots (see module docstring)."""

    def __init__(
        self,
        model_config: ModelConfig,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        max_clusters: int = 0,
        max_cluster_rank: int = 0,
        max_cluster_size: int = 0,
        kernels: Kernels = "auto",
    ) -> None:
        """max_clusters / max_cluster_rank / max_cluster_size: capacity for compressed clusters (0 = none);
        kernels: "auto" (Triton on CUDA, reference elsewhere), "reference" or "triton"."""
        if max_slots <= 0 or max_rank <= 0:
            raise ValueError(f"max_slots={max_slots} and max_rank={max_rank} must be positive")
        self.config = model_config
        self.max_slots, self.max_rank = max_slots, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.lock = threading.RLock()
        self.generation = 0  # bumped on every content or address change
        self.ranks = torch.zeros(max_slots, dtype=torch.int32, device=self.device)  # 0 = empty
        # Per module kind, all layers: a [L, S, R, d_in], b [L, S, d_out, R]; see module doc.
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._names: list[str | None] = [None] * max_slots
        self._slot_of: dict[str, int] = {}
        self._hashes: list[str] = [""] * max_slots
        self._slot_keys: list[frozenset[tuple[int, str]]] = [frozenset()] * max_slots
        self._slot_bytes: list[int] = [0] * max_slots
        self._targeting: dict[tuple[int, str], set[int]] = {}  # (layer, module) -> slots
        self._groups: dict[tuple[str, ...], FusedGroup] = {}  # by member names, in output order
        # Per module, its layers' (a, b) views, made once: indexing a layer each step is an op.
        self._layer_views: dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        self._lora_op = select_lora_op(self.device, kernels)
        self._lora_slices_op = select_lora_slices_op(self.device, kernels)
        self.compressed = CompressedStore(model_config, max_slots, max_clusters, max_cluster_rank,
                                          max_cluster_size, dtype, self.device, kernels)
        self._compressed_hashes: dict[str, str] = {}
        # The last step's split, rebuilt when the batch object or the bank changes (one per step).
        self._plan: tuple[LoRABatch, int, StepPlan] | None = None
        self.view = self._snapshot()

    # ------------------------------------------------------------------ residency

    def add(self, adapter: LoRAAdapter) -> int:
        """Load raw `adapter` into a free slot (or its own slot if the name is resident raw; a
        compressed version of the name is dropped); returns the slot."""
        if adapter.max_rank > self.max_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.max_rank} > bank "
                               f"max_rank {self.max_rank}")
        if not adapter.weights:
            raise AdapterError(f"adapter {adapter.name!r} has no weights")
        check_adapter_fits(adapter, self.config)
        staged = self._stage(adapter)  # all conversion before the first write
        with self.lock:
            slot = self._slot_of.get(adapter.name)
            if slot is None:
                slot = self._free_slot(adapter.name)
            for module in {m for _, m in staged}:
                self._ensure_module(module)
            for key in self._slot_keys[slot] - staged.keys():  # old version's leftovers
                self._zero(slot, key)
            for (layer, module), (a, b) in staged.items():
                self._a[module][layer, slot].copy_(a)
                self._b[module][layer, slot].copy_(b)
            self._set_keys(slot, frozenset(staged))
            self._names[slot] = adapter.name
            self._slot_of[adapter.name] = slot
            self._hashes[slot] = adapter.content_hash
            self._slot_bytes[slot] = adapter.num_bytes
            self.ranks[slot] = adapter.max_rank
            if adapter.name in self.compressed.location:
                self._drop_compressed(adapter.name)
            self._changed()
        return slot

    def add_cluster(self, cluster: ClusterBank, *, label: str = "", content_hash: str = "") -> int:
        """Load a compressed cluster (e.g. one of `load_cluster_banks(...).clusters`) into a free
        cluster slot; every member becomes resident (a resident adapter of the same name, raw or
        compressed, is replaced). Returns the cluster slot. AdapterError if it does not fit the
        model or the capacity (max_cluster_rank/size), NoFreeSlot if no cluster slot is free."""
        staged = self.compressed.stage_cluster(cluster, label)
        with self.lock:
            c = self.compressed.free_cluster(staged.label)
            for name in staged.members:  # the new version replaces any resident one
                if name in self._slot_of:
                    self._drop_raw(name)
                elif name in self.compressed.location:
                    self._drop_compressed(name)
            self.compressed.write_cluster(c, staged)
            for name in staged.members:
                self._compressed_hashes[name] = content_hash
            self._changed()
        return c

    def add_to_cluster(self, name: str, cluster_slot: int, cores: Mapping[ModuleKey, torch.Tensor],
                       content_hash: str = "") -> int:
        """Add adapter `name` as a new row of resident cluster `cluster_slot`, given its cores on the
        cluster's bases (per module [k_c, k_c] or [k_c], scaling folded; e.g. project_onto_basis on
        `cluster_basis`). Replaces a resident adapter of that name; returns its slot."""
        staged = self.compressed.stage_cores(cluster_slot, name, cores)
        with self.lock:
            if self.compressed.location.get(name, (None,))[0] == cluster_slot:
                row = self.compressed.location[name][1]
            else:
                row = self.compressed.free_row(cluster_slot, name)
                if name in self._slot_of:
                    self._drop_raw(name)
                elif name in self.compressed.location:
                    self._drop_compressed(name)
            self.compressed.write_row(cluster_slot, row, name, staged)
            self._compressed_hashes[name] = content_hash
            self._changed()
            return self.compressed.slot(name)

    def remove_cluster(self, cluster_slot: int) -> list[str]:
        """Free a cluster slot and every adapter in it; returns their names."""
        with self.lock:
            names = self.compressed.remove_cluster(cluster_slot)
            for name in names:
                self._compressed_hashes.pop(name, None)
            self._changed()
        return names

    def remove(self, name: str) -> None:
        """Free adapter `name`, raw (slot zeroed) or compressed (core rows zeroed; an emptied
        cluster is freed); TaskNotFound if absent."""
        with self.lock:
            if name in self.compressed.location:
                self._drop_compressed(name)
            else:
                self.slot_of(name)  # TaskNotFound with the resident names
                self._drop_raw(name)
            self._changed()

    def slot_of(self, name: str) -> int:
        """The slot id a step's tokens use for `name`: < max_slots raw, else compressed."""
        slot = self._slot_of.get(name)
        if slot is not None:
            return slot
        if name in self.compressed.location:
            return self.compressed.slot(name)
        raise TaskNotFound(f"adapter {name!r} is not in the bank (resident: {_preview(self.names)})")

    def content_hash(self, name: str) -> str:
        """The sha256 the resident version of `name` was loaded from ("" if built in memory)."""
        if name in self.compressed.location:
            return self._compressed_hashes.get(name, "")
        return self._hashes[self.slot_of(name)]

    def cluster_of(self, name: str) -> tuple[int, int] | None:
        """(cluster slot, row) of a compressed adapter, None for a raw one; TaskNotFound if absent."""
        self.slot_of(name)
        return self.compressed.location.get(name)

    def cluster_members(self, cluster_slot: int) -> list[str]:
        """Resident adapters of a cluster slot in row order."""
        return [n for n in self.compressed.rows[cluster_slot] if n is not None]

    def cluster_basis(self, cluster_slot: int, key: ModuleKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d_out, k_c], V [d_in, k_c]) of a resident cluster for one (layer, module)."""
        return self.compressed.basis(cluster_slot, key)

    @property
    def names(self) -> list[str]:
        """Resident adapter names: raw in slot order, then compressed in (cluster, row) order."""
        return [n for n in self._names if n is not None] + self.compressed.names()

    @property
    def free_slots(self) -> int:
        """Free raw slots (compressed adapters do not use them)."""
        return self.max_slots - len(self._slot_of)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of or name in self.compressed.location

    def __len__(self) -> int:
        return len(self._slot_of) + len(self.compressed.location)

    # ------------------------------------------------------------------ compute

    def lora_weights(self, layer_idx: int, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lora_a [S, R, d_in], lora_b [S, d_out, R]) views for one projection, None if unallocated."""
        if module not in self._a:
            return None
        return self._a[module][layer_idx], self._b[module][layer_idx]

    def targeting_slots(self, layer_idx: int, module: str) -> frozenset[int]:
        """Raw slots whose adapter adapts this projection (the others hold zeros there)."""
        return frozenset(self._targeting.get((layer_idx, module), ()))

    def add_delta(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        layer_idx: int,
        module: str,
        lora_batch: LoRABatch | None,
    ) -> None:
        """y[t] += delta of token t's adapter applied to x[t]; y [T, d_out] modified in place.

        Raw slot s: scale * B_s (A_s x[t]); compressed (c, i): U_c (Sigma_i (V_c^T x[t])). x: [T, d_in].
        No launch for a kind no token's adapter uses on this projection.
        Numerics: accumulates in fp32, y keeps its dtype; equal to the fp32 per-token product
        within 1e-5 relative (fp32 bank) / 2e-2 (bf16 bank), see tests/test_adapter_bank.py and
        tests/test_compressed_serving.py.
        """
        static = lora_batch is not None and lora_batch.max_count is not None
        if lora_batch is None or not (lora_batch.slots_list or static):
            return
        assert x.shape[0] == y.shape[0] == lora_batch.token_slots.shape[0], (
            x.shape, y.shape, lora_batch.token_slots.shape)
        plan = self._step_plan(lora_batch)
        targeting = self._targeting.get((layer_idx, module))
        # A static batch launches whenever a resident adapter adapts this projection, so the
        # launches do not depend on the step's mix (the kernels skip empty segments).
        if plan.raw is not None and targeting and (static or not targeting.isdisjoint(plan.raw_slots)):
            a, b = self._layer_views[module]
            self._lora_op(y, x, a[layer_idx], b[layer_idx], plan.raw, ranks=self.ranks)
        self.compressed.add_delta(y, x, layer_idx, module, plan)

    def add_fused_delta(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        layer_idx: int,
        columns: list[tuple[str, int, int]],
        lora_batch: LoRABatch | None,
    ) -> None:
        """`add_delta` for projections fused along their outputs: y [T, sum of d_out] holds member
        `name`'s output in columns [start, end) of `columns`. Raw adapters go through one launch
        pair for the whole group where the group is stored side by side and the Triton op runs."""
        static = lora_batch is not None and lora_batch.max_count is not None
        if lora_batch is None or not (lora_batch.slots_list or static):
            return
        group = self._groups.get(tuple(name for name, _, _ in columns))
        if group is None or self._lora_slices_op is None:
            for name, start, end in columns:
                self.add_delta(y[:, start:end], x, layer_idx, name, lora_batch)
            return
        plan = self._step_plan(lora_batch)
        if plan.raw is not None:
            targeting = [self._targeting.get((layer_idx, name)) for name in group.modules]
            if static and any(targeting) or any(t and not t.isdisjoint(plan.raw_slots) for t in targeting):
                self._lora_slices_op(y, x, group.a[layer_idx], group.b[layer_idx], plan.raw, group.slices,
                                     ranks=self.ranks)
        if plan.compressed is not None:  # (column views cost ops: only when compressed tokens run)
            for name, start, end in columns:
                self.compressed.add_delta(y[:, start:end], x, layer_idx, name, plan)

    def stats(self) -> dict[str, object]:
        """Slots used, bank bytes allocated (padded) and adapter bytes (unpadded) resident."""
        allocated = sum(t.numel() * t.element_size() for t in (*self._a.values(), *self._b.values()))
        return {
            "slots_used": len(self._slot_of),
            "max_slots": self.max_slots,
            "max_rank": self.max_rank,
            "modules_allocated": [m for m in LINEAR_MODULES if m in self._a],
            "bytes_allocated": allocated,
            "adapter_bytes": sum(self._slot_bytes),
            "compressed_adapters": len(self.compressed.location),
            "clusters_used": len(self.compressed.used_clusters()),
            "max_clusters": self.compressed.max_clusters,
            "compressed_bytes_allocated": self.compressed.bytes_allocated(),
        }

    # ------------------------------------------------------------------ internals

    def _changed(self) -> None:
        """After a write (under the lock): bump the generation, publish a new view."""
        self.generation += 1
        self.view = self._snapshot()

    def _snapshot(self) -> BankView:
        store = self.compressed
        return BankView(
            max_slots=self.max_slots,
            free_slots=self.free_slots,
            raw=frozenset(self._slot_of),
            compressed=MappingProxyType(dict(store.location)),
            clusters=MappingProxyType({c: tuple(self.cluster_members(c)) for c in store.used_clusters()}),
            max_clusters=store.max_clusters,
            max_cluster_size=store.max_size,
            max_cluster_rank=store.max_rank,
        )

    def _stage(self, adapter: LoRAAdapter) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Padded, scale-folded bank-dtype copies of every factor, checked for overflow."""
        staged = {}
        r_max = self.max_rank
        for (layer, module), f in adapter.weights.items():
            d_out, d_in = self.config.module_shape(module)
            a = torch.zeros(r_max, d_in, dtype=self.dtype, device=self.device)
            b = torch.zeros(d_out, r_max, dtype=self.dtype, device=self.device)
            a[: f.rank] = f.a.to(self.device, self.dtype)
            b[:, : f.rank] = (f.b.to(self.device, torch.float32) * f.scale).to(self.dtype)
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise AdapterError(f"adapter {adapter.name!r} layer {layer} {module}: non-finite "
                                   f"values after folding scale {f.scale} and casting to {self.dtype}")
            staged[(layer, module)] = (a, b)
        return staged

    def _step_plan(self, batch: LoRABatch) -> StepPlan:
        """This step's raw/compressed split, built on the first projection and reused by the rest."""
        if self._plan is None or self._plan[0] is not batch or self._plan[1] != self.generation:
            if not self.compressed.location:
                plan = StepPlan(batch, None, frozenset(batch.slots_list), frozenset())
            else:
                plan = split_lora_batch(batch, self.max_slots, self.compressed.max_size)
            self._plan = (batch, self.generation, plan)
        return self._plan[2]

    def _drop_raw(self, name: str) -> None:
        slot = self._slot_of.pop(name)
        for key in self._slot_keys[slot]:
            self._zero(slot, key)
        self._set_keys(slot, frozenset())
        self._names[slot] = None
        self._hashes[slot] = ""
        self._slot_bytes[slot] = 0
        self.ranks[slot] = 0

    def _drop_compressed(self, name: str) -> None:
        self.compressed.remove_name(name)
        self._compressed_hashes.pop(name, None)

    def _free_slot(self, name: str) -> int:
        for slot, resident in enumerate(self._names):
            if resident is None:
                return slot
        raise NoFreeSlot(f"adapter bank is full ({self.max_slots}/{self.max_slots} slots: "
                         f"{_preview(self.names)}); remove one before adding {name!r}")

    def _ensure_module(self, module: str) -> None:
        if module in self._a:
            return
        shape = (self.config.num_layers, self.max_slots)
        members = next((g for g in FUSED_PROJECTIONS if module in g), (module,))
        widths = tuple(self.config.module_shape(m)[0] for m in members)
        d_in = self.config.module_shape(module)[1]
        r = self.max_rank
        a = torch.zeros(*shape, len(members) * r, d_in, dtype=self.dtype, device=self.device)
        b = torch.zeros(*shape, sum(widths), r, dtype=self.dtype, device=self.device)
        start = 0
        for p, (member, width) in enumerate(zip(members, widths)):
            self._a[member] = a[:, :, p * r:(p + 1) * r]
            self._b[member] = b[:, :, start:start + width]
            self._layer_views[member] = (tuple(self._a[member].unbind(0)), tuple(self._b[member].unbind(0)))
            start += width
        if len(members) > 1:
            bounds = torch.tensor([0, *itertools.accumulate(widths)], dtype=torch.int32, device=self.device)
            self._groups[members] = FusedGroup(members, tuple(a.unbind(0)), tuple(b.unbind(0)), (widths, bounds))

    def _zero(self, slot: int, key: tuple[int, str]) -> None:
        layer, module = key
        self._a[module][layer, slot].zero_()
        self._b[module][layer, slot].zero_()

    def _set_keys(self, slot: int, keys: frozenset[tuple[int, str]]) -> None:
        for key in self._slot_keys[slot] - keys:
            self._targeting[key].discard(slot)
        for key in keys:
            self._targeting.setdefault(key, set()).add(slot)
        self._slot_keys[slot] = keys


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "") or "none"
