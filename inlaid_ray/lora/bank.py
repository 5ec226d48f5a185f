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

Atomicity: `add` validates, converts and pads everything before its first write, so a failing
add leaves the bank untouched; writes and bookkeeping happen under `lock`, which the engine
holds for a whole forward step, so a step sees an adapter's old or new version, never a mix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from inlaid_ray.errors import AdapterError, NoFreeSlot, TaskNotFound
from inlaid_ray.kernels.reference import lora_shrink_expand_ref
from inlaid_ray.lora.adapter import LoRAAdapter, check_adapter_fits
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.forward_batch import LoRABatch

# (y [T, d_out] in place, x [T, d_in], lora_a [S, R, d_in], lora_b [S, d_out, R], batch) -> None
LoRAOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch], None]


def select_lora_op(device: torch.device) -> LoRAOp:
    """The single place the shrink+expand implementation is chosen for a device.

    TODO(kernels): on CUDA return the Triton launcher (same signature as the reference) once
    `kernels/` provides it; everything else keeps the PyTorch reference.
    """
    return lora_shrink_expand_ref


class AdapterBank:
    """Fixed-capacity slots of LoRA adapters for one base model (see module docstring)."""

    def __init__(
        self,
        model_config: ModelConfig,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
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
        self._lora_op = select_lora_op(self.device)

    # ------------------------------------------------------------------ residency

    def add(self, adapter: LoRAAdapter) -> int:
        """Load `adapter` into a free slot (or its own slot if the name is resident); returns it."""
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
            self.generation += 1
        return slot

    def remove(self, name: str) -> None:
        """Free the slot of adapter `name` (its rows are zeroed); TaskNotFound if absent."""
        with self.lock:
            slot = self.slot_of(name)
            for key in self._slot_keys[slot]:
                self._zero(slot, key)
            self._set_keys(slot, frozenset())
            del self._slot_of[name]
            self._names[slot] = None
            self._hashes[slot] = ""
            self._slot_bytes[slot] = 0
            self.ranks[slot] = 0
            self.generation += 1

    def slot_of(self, name: str) -> int:
        try:
            return self._slot_of[name]
        except KeyError:
            raise TaskNotFound(f"adapter {name!r} is not in the bank (resident: "
                               f"{_preview(self.names)})") from None

    def content_hash(self, name: str) -> str:
        """The sha256 the resident version of `name` was loaded from ("" if built in memory)."""
        return self._hashes[self.slot_of(name)]

    @property
    def names(self) -> list[str]:
        """Resident adapter names in slot order."""
        return [n for n in self._names if n is not None]

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    # ------------------------------------------------------------------ compute

    def lora_weights(self, layer_idx: int, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lora_a [S, R, d_in], lora_b [S, d_out, R]) views for one projection, None if unallocated."""
        if module not in self._a:
            return None
        return self._a[module][layer_idx], self._b[module][layer_idx]

    def targeting_slots(self, layer_idx: int, module: str) -> frozenset[int]:
        """Slots whose adapter adapts this projection (the others hold zeros there)."""
        return frozenset(self._targeting.get((layer_idx, module), ()))

    def add_delta(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        layer_idx: int,
        module: str,
        lora_batch: LoRABatch | None,
    ) -> None:
        """y[t] += scale * B_s (A_s x[t]) with s = slot of token t; y [T, d_out] modified in place.

        x: [T, d_in]. A no-op (no launch) when no token's adapter targets this projection.
        Numerics: accumulates in fp32, y keeps its dtype; equal to the fp32 per-token product
        within 1e-5 relative (fp32 bank) / 2e-2 (bf16 bank), see tests/test_adapter_bank.py.
        """
        if lora_batch is None or not lora_batch.slots_list:
            return
        targeting = self._targeting.get((layer_idx, module))
        if not targeting or targeting.isdisjoint(lora_batch.slots_list):
            return
        assert x.shape[0] == y.shape[0] == lora_batch.token_slots.shape[0], (
            x.shape, y.shape, lora_batch.token_slots.shape)
        self._lora_op(y, x, self._a[module][layer_idx], self._b[module][layer_idx], lora_batch)

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
        }

    # ------------------------------------------------------------------ internals

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

    def _free_slot(self, name: str) -> int:
        for slot, resident in enumerate(self._names):
            if resident is None:
                return slot
        raise NoFreeSlot(f"adapter bank is full ({self.max_slots}/{self.max_slots} slots: "
                         f"{_preview(self.names)}); remove one before adding {name!r}")

    def _ensure_module(self, module: str) -> None:
        if module in self._a:
            return
        d_out, d_in = self.config.module_shape(module)
        shape = (self.config.num_layers, self.max_slots)
        self._a[module] = torch.zeros(*shape, self.max_rank, d_in, dtype=self.dtype, device=self.device)
        self._b[module] = torch.zeros(*shape, d_out, self.max_rank, dtype=self.dtype, device=self.device)

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
