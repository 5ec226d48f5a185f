"""Small helpers shared by the Triton ops: interpreter detection and a dot that the CPU
interpreter computes correctly for bf16."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints. `triton.cdiv` is a constexpr function in Triton 3.9 whose every
    host call unwraps its arguments (~6 us); the launch wrappers call this one instead."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as `triton.next_power_of_2` without its host cost."""
    return 1 << (n - 1).bit_length()


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def interp_upcast(kernel: object, dtype: torch.dtype) -> bool:
    """Whether `dot` must upcast: Triton's interpreter (3.9) multiplies bf16 tiles as raw uint16."""
    return dtype == torch.bfloat16 and is_interpreted(kernel)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST (interpreter only) multiplies in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:  # fp32 operands: full precision, not TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
