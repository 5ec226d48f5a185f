"""The engine's adapter residency interface (vLLM's worker-owned LoRA manager): the serving layer
submits typed commands, the engine applies them between steps in its own thread, so the adapter
bank has one writer and a step never overlaps a write. Readers on other threads use the bank's
published `BankView`.

Example: a replica loads task "email" raw, then evicts "sentiment" once its last request ended:
    await engine.submit_adapter_command(LoadAdapter(email_adapter))   # -> its slot
    await engine.submit_adapter_command(EvictAdapter("sentiment"))
An eviction of an adapter that a request in flight on this engine still uses is refused
(`AdapterInUse`): requests never lose their adapter mid-generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from inlaid_ray.errors import AdapterError
from inlaid_ray.lora.bank import BankView


class AdapterInUse(AdapterError):
    """An eviction named an adapter that a request in flight still uses."""


@dataclass(frozen=True)
class LoadAdapter:
    """Make a raw PEFT adapter resident (a resident adapter of that name is replaced in place)."""

    adapter: Any  # LoRAAdapter


@dataclass(frozen=True)
class LoadCluster:
    """Make a compressed cluster resident in a free cluster slot (members replace residents of their name)."""

    cluster: Any  # ClusterBank
    label: str = ""


@dataclass(frozen=True)
class EvictAdapter:
    """Free an adapter's slot or row (TaskNotFound if absent, AdapterInUse if a request uses it)."""

    name: str


AdapterCommand = LoadAdapter | LoadCluster | EvictAdapter


class AdapterHost(Protocol):
    """What adapter residency needs from an engine: the bank's view and a command queue."""

    @property
    def adapter_view(self) -> BankView: ...

    def submit_adapter_command(self, command: AdapterCommand) -> Any:  # an awaitable of the command's result
        ...


def apply_adapter_command(bank: Any, command: AdapterCommand, in_use: frozenset[str]) -> int | None:
    """Apply one command to `bank`: the slot a load used, None for an eviction. `in_use`: adapters
    that requests in flight use (an eviction of one of them is refused)."""
    if isinstance(command, LoadAdapter):
        return bank.add(command.adapter)
    if isinstance(command, LoadCluster):
        return bank.add_cluster(command.cluster, label=command.label)
    if isinstance(command, EvictAdapter):
        if command.name in in_use:
            raise AdapterInUse(f"adapter {command.name!r} is used by a request in flight; evict it after that ends")
        bank.remove(command.name)
        return None
    raise TypeError(f"not an adapter command: {command!r}")
