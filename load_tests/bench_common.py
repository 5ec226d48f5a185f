"""Shared set-up of the engine benchmarks (bench_engine.py, bench_engine_gpu.py): model shapes,
random LoRA adapters (in memory, as PEFT directories, or copied out of a PEFT model), random
4-bit GPTQ codes, the choice of kernel implementation, and device/JSON helpers.

Imports only torch and inlaid_ray.{model, lora, quant, kernels}: it must run on the GPU
machine, which has no ray / redis / fastapi.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inlaid_ray.engine.builder import BankCapacity, make_bank
from inlaid_ray.lora import AdapterBank, LoRAAdapter, LoRAFactors, save_peft_adapter
from inlaid_ray.lora.synthetic import random_lora_adapter
from inlaid_ray.model import ModelConfig
from inlaid_ray.quantized_base.linear import GPTQLinear, select_gptq_matmul

RESULTS = Path(__file__).resolve().parent / "results"

# ModelConfig's defaults are Llama-2-7B's shape (vocab 32000, 4096 hidden, 11008 MLP, 32 layers, MHA).
LLAMA2_7B = ModelConfig(name_or_path="llama-2-7b-shape (random weights)")
# A few-MB stand-in used to dry-run the GPU scripts on a CPU (`--shape tiny`).
TINY = ModelConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=32, max_position_embeddings=4096, name_or_path="tiny (random weights)",
)
SHAPES = {"llama-2-7b": LLAMA2_7B, "tiny": TINY}

GPTQ_BITS, GPTQ_GROUP = 4, 128


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed(device: torch.device | str) -> Iterable[dict[str, float]]:
    """`with timed(dev) as t: ...` then `t["s"]` holds the seconds, GPU work included."""
    out: dict[str, float] = {}
    sync(device)
    t0 = time.perf_counter()
    yield out
    sync(device)
    out["s"] = time.perf_counter() - t0


def device_info(device: torch.device | str) -> dict[str, Any]:
    """What ran the benchmark: GPU name (torch.cuda.get_device_name) or the CPU, and versions."""
    device = torch.device(device)
    info: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, written atomically so a killed run leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------ adapters


# Random adapters of the benchmarks: A ~ N(0, 1/d_in) (PEFT's fan-in scale), small B, scale 2.
BENCH_LORA_INIT = dict(a_std=None, b_std=0.01, scale=2.0)


def write_random_peft_adapters(
    config: ModelConfig, shapes: Mapping[str, tuple[int, tuple[str, ...]]], out_dir: Path, seed: int = 0
) -> dict[str, Path]:
    """PEFT directories {name: dir} of random adapters with the given (rank, target modules)."""
    dirs = {}
    for i, (name, (rank, modules)) in enumerate(shapes.items()):
        adapter = random_lora_adapter(config, name, rank, modules, seed + i, base_model=config.name_or_path or None,
                                      **BENCH_LORA_INIT)
        save_peft_adapter(adapter, out_dir / name)
        dirs[name] = out_dir / name
    return dirs


def adapters_from_peft_model(peft_model: nn.Module, names: Iterable[str]) -> list[LoRAAdapter]:
    """Copy the named adapters out of a PEFT-wrapped HF Llama, so both engines run the same weights."""
    wanted = list(names)
    weights: dict[str, dict[tuple[int, str], LoRAFactors]] = {n: {} for n in wanted}
    for mod_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or ".layers." not in mod_name:
            continue
        layer = int(mod_name.split(".layers.")[1].split(".")[0])
        proj = mod_name.rsplit(".", 1)[1]
        for n in wanted:
            if n in module.lora_A:
                weights[n][(layer, proj)] = LoRAFactors(
                    module.lora_A[n].weight.detach(), module.lora_B[n].weight.detach(), float(module.scaling[n])
                )
    return [LoRAAdapter(name=n, base_model_name_or_path=None, weights=weights[n]) for n in wanted]


def build_bank(
    config: ModelConfig, adapters: list[LoRAAdapter], dtype: torch.dtype, device: torch.device | str, max_rank: int
) -> AdapterBank:
    """A bank with exactly one slot per adapter, built by the engine builder's `make_bank`."""
    capacity = BankCapacity(max_adapters=max(1, len(adapters)), max_rank=max_rank)
    return make_bank(config, dtype, torch.device(device), capacity, adapters)


# ------------------------------------------------------------------------------ 4-bit weights


def fill_random_gptq(model: nn.Module, seed: int = 0) -> int:
    """Give every GPTQLinear random 4-bit codes and zero points and scales that keep |W| ~ 0.02;
    returns how many layers were filled."""
    n = 0
    for module in model.modules():
        if not isinstance(module, GPTQLinear):
            continue
        gen = torch.Generator(device=module.qweight.device).manual_seed(seed + n)
        for buf in (module.qweight, module.qzeros):
            buf.copy_(torch.randint(-(2**31), 2**31 - 1, buf.shape, generator=gen, device=buf.device, dtype=torch.int64))
        # codes - zeros spread ~ +-7.5 (std ~ 6): scale 0.02 / 6 gives weights of std ~ 0.02.
        module.scales.fill_(0.02 / 6.0)
        n += 1
    return n


class OpsGPTQLinear(GPTQLinear):
    """GPTQLinear whose matmul is `inlaid_ray.kernels.ops.gptq_matmul` (Triton on CUDA) with the
    known group size, for benchmarking while `select_gptq_matmul` still returns the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from inlaid_ray.kernels import ops

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = ops.gptq_matmul(x2, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias,
                            group_size=GPTQ_GROUP)
        return y.reshape(*lead, self.out_features)


def gptq_factory(device: torch.device | str, kernels: str):
    """Linear factory of empty 4-bit group-128 projections (fp16 scales); `kernels` = auto | ops."""
    cls = OpsGPTQLinear if kernels == "ops" else GPTQLinear
    return lambda layer, name, d_out, d_in, bias: cls.empty(
        d_out, d_in, bias, GPTQ_BITS, GPTQ_GROUP, torch.float16, device
    )


def use_kernel_ops(bank: AdapterBank | None, kernels: str) -> None:
    """`kernels="ops"`: route the bank's shrink/expand through `inlaid_ray.kernels.ops` (Triton on
    CUDA). `lora.bank.select_lora_op` still returns the reference (its TODO); this sets the op the
    bank calls, which has exactly the reference's signature."""
    if kernels == "ops" and bank is not None:
        from inlaid_ray.kernels import ops

        bank._lora_op = ops.lora_shrink_expand  # noqa: SLF001 - see docstring


def kernel_paths(bank: AdapterBank | None, model: nn.Module, device: torch.device | str) -> dict[str, str]:
    """Which implementations the measured forward actually calls (qualified names)."""
    def qual(fn: Any) -> str:
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

    out = {"lora_op": qual(bank._lora_op) if bank is not None else "none"}  # noqa: SLF001
    gptq = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    if gptq:
        if isinstance(gptq[0], OpsGPTQLinear):
            out["gptq_matmul"] = "inlaid_ray.kernels.ops.gptq_matmul"
        else:
            out["gptq_matmul"] = qual(select_gptq_matmul(torch.device(device)))
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
