"""The GPTQ-quantized base as it is served: the GPTQ v1 checkpoint format (`checkpoint`), the
packed projection `GPTQLinear` (`linear`), and `load_base`, which swaps it in at load time
(`loading`). Offline quantization that writes such checkpoints is `inlaid_ray.quant`."""

from inlaid_ray.quantized_base.checkpoint import (
    QuantizeConfig,
    check_gptq_tensors,
    dequantize_gptq_tensors,
    load_gptq_checkpoint,
    pack_gptq_result,
    save_gptq_checkpoint,
    split_layers,
)
from inlaid_ray.quantized_base.linear import GPTQLinear, gptq_linear_factory, select_gptq_matmul
from inlaid_ray.quantized_base.loading import is_gptq_dir, load_base

__all__ = [
    "GPTQLinear",
    "QuantizeConfig",
    "check_gptq_tensors",
    "dequantize_gptq_tensors",
    "gptq_linear_factory",
    "is_gptq_dir",
    "load_base",
    "load_gptq_checkpoint",
    "pack_gptq_result",
    "save_gptq_checkpoint",
    "select_gptq_matmul",
    "split_layers",
]
