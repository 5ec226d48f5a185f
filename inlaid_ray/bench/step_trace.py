"""A CPU check that a forward could be captured as a CUDA graph (issue #15 item 3): trace every
aten op and every Triton launch of one call and report what would break capture or replay.

`StepTrace` records, while active:
- every aten op: its name, each tensor argument's shape and dtype, and the other arguments;
- every Triton launch (kernels under TRITON_INTERPRET=1 run on CPU tensors): kernel, grid,
  tensor shapes and scalar arguments; the kernel itself runs outside the trace;
- host syncs: `aten._local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`) and `Tensor.tolist()`;
- data-dependent shapes: ops whose output size depends on tensor values (`nonzero`, `unique`,
  `masked_select`, boolean indexing, ...);
- host data created inside the call (`torch.tensor(...)`: `aten.lift_fresh`), a host-to-device
  copy on a GPU that capture forbids.
Two calls of one graph bucket must produce the same `signature`: the same ops on the same
shapes and the same launches; any difference is a shape or launch that depends on the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

DATA_DEPENDENT_OPS = frozenset({
    "nonzero", "nonzero_static", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
    "masked_select", "argwhere", "repeat_interleave", "bincount", "histc",
})
HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    return type(value).__name__


class StepTrace(TorchDispatchMode):
    """Use as a context manager around one forward (see module docstring)."""

    def __init__(self, run_kernels: bool = True) -> None:
        super().__init__()
        self.run_kernels = run_kernels  # False: launches are recorded, not run (outputs are garbage)
        self.ops: list[tuple] = []
        self.launches: list[tuple] = []
        self.syncs: list[str] = []
        self.data_dependent: list[str] = []
        self.host_data: list[str] = []
        self._restore: list[Callable[[], None]] = []

    # ----------------------------------------------------------------- aten ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        self.ops.append((func.__name__, _describe(args), _describe(sorted(kwargs.items()))))
        if name == "_local_scalar_dense":
            self.syncs.append(func.__name__)
        if name in DATA_DEPENDENT_OPS or (name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in _flat(args[1:2]))):
            self.data_dependent.append(func.__name__)
        if name in HOST_DATA_OPS:
            self.host_data.append(func.__name__)
        return func(*args, **kwargs)

    # ----------------------------------------------------------------- activation
    def __enter__(self) -> "StepTrace":
        trace = self
        tolist = torch.Tensor.tolist

        def counted_tolist(t: torch.Tensor):
            trace.syncs.append("Tensor.tolist")
            return tolist(t)

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
        self._restore.append(lambda: setattr(torch.Tensor, "tolist", tolist))
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            while self._restore:
                self._restore.pop()()

    def _patch_triton(self) -> None:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # no Triton: nothing launches
            return
        trace = self
        getitem = InterpretedFunction.__getitem__

        def recorded(kernel, grid):
            launch = getitem(kernel, grid)

            def run(*args, **kwargs):
                name = getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
                trace.launches.append((name, _describe(grid), _describe(args), _describe(sorted(kwargs.items()))))
                if not trace.run_kernels:
                    return None
                with _disable_current_modes():  # the interpreter's own tensor work is not the step's
                    return launch(*args, **kwargs)

            return run

        InterpretedFunction.__getitem__ = recorded  # type: ignore[method-assign]
        self._restore.append(lambda: setattr(InterpretedFunction, "__getitem__", getitem))

    # ----------------------------------------------------------------- verdict
    @property
    def signature(self) -> tuple[tuple, tuple]:
        """What must be equal between two calls of one graph bucket."""
        return tuple(self.ops), tuple(self.launches)

    def problems(self) -> list[str]:
        """Everything in this call that CUDA-graph capture would not allow."""
        out = [f"host sync: {s}" for s in self.syncs]
        out += [f"data-dependent shape: {s}" for s in self.data_dependent]
        out += [f"host data created inside the call: {s}" for s in self.host_data]
        return out


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Triton launches (under TRITON_INTERPRET=1) return at once without running: the host cost
    of a step's CUDA code path, its outputs garbage."""
    from triton.runtime.interpreter import InterpretedFunction

    getitem = InterpretedFunction.__getitem__
    InterpretedFunction.__getitem__ = lambda kernel, grid: (lambda *args, **kwargs: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        InterpretedFunction.__getitem__ = getitem  # type: ignore[method-assign]


def differences(a: StepTrace, b: StepTrace, limit: int = 5) -> list[str]:
    """The first ops / launches that differ between two traced calls (empty: same signature)."""
    out = []
    for what, xs, ys in (("aten op", a.ops, b.ops), ("Triton launch", a.launches, b.launches)):
        if len(xs) != len(ys):
            out.append(f"{len(xs)} vs {len(ys)} {what}s")
        out += [f"{what} {i}: {x} vs {y}" for i, (x, y) in enumerate(zip(xs, ys)) if x != y][:limit]
    return out


def _flat(values: Any) -> list[Any]:
    out = []
    for v in values:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out
