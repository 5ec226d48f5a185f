"""Load a serving base: a dense HF directory, or a GPTQ v1 checkpoint whose projections become
`GPTQLinear` modules at load time (gpt-fast style: the model knows no checkpoint format; the
format's owner swaps the modules in). Every entry point that may be handed a quantized base
loads it here."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from inlaid_ray.model.config import ModelConfig
from inlaid_ray.model.loader import load_model, load_weights, map_hf_names, quantization_config
from inlaid_ray.model.transformer import Transformer
from inlaid_ray.quantized_base.checkpoint import load_gptq_checkpoint
from inlaid_ray.kernels.reference import gptq_matmul_ref
from inlaid_ray.quantized_base.linear import gptq_linear_factory, select_gptq_matmul

log = logging.getLogger(__name__)


def is_gptq_dir(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a GPTQ checkpoint (quantize_config.json or a gptq quantization_config)."""
    qc = quantization_config(model_dir)
    return qc is not None and qc.get("quant_method", "gptq") == "gptq" and "bits" in qc


def load_base(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    adapter_bank: object | None = None,
    cache_dequantized: bool | None = None,
) -> Transformer:
    """The model in `model_dir`, dense or GPTQ. GPTQ scales are kept in fp32 for an fp32 model (so
    the dequantized weights are exactly the quantizer's grid values), fp16 otherwise.

    The one policy for the dequantized-weight cache: `cache_dequantized=None` caches exactly
    where no fused GPTQ kernel serves the device and dtype (CPU; fp32 on CUDA), since the
    reference would unpack every weight on every forward (seconds per step for SmolLM2 on a CPU
    core): dense speed and dense memory there, with the quantized model's outputs."""
    model_dir = Path(model_dir)
    if not is_gptq_dir(model_dir):
        return load_model(model_dir, dtype, device, adapter_bank)
    hf_config, qc, tensors = load_gptq_checkpoint(model_dir, device)  # validates every packed layer
    if cache_dequantized is None:
        cache_dequantized = select_gptq_matmul(torch.device(device), qc.grid.bits, dtype) is gptq_matmul_ref
    log.info("GPTQ base %s on %s (%s): %s", model_dir, device, dtype,
             "dequantized-weight cache (no fused kernel here)" if cache_dequantized else "fused GPTQ kernel")
    config = ModelConfig.from_hf_dict(hf_config, name_or_path=str(model_dir))
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    factory = gptq_linear_factory(qc.grid.bits, qc.grid.group_size, scale_dtype, device, cache_dequantized)
    model = Transformer(config, dtype=dtype, device=device, make_linear=factory, adapter_bank=adapter_bank)
    return load_weights(model, map_hf_names(tensors, config), model_dir)
