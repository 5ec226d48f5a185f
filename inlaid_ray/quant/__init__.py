"""GPTQ and MLGPTQ: quantization grid, layer-input Hessians (per task, max/mix aggregation), the
blockwise GPTQ routine, the GPTQ v1 checkpoint format and the packed linear layer."""

from inlaid_ray.quant.gptq import GPTQResult, gptq_quantize, inverse_hessian_factor, rtn_quantize
from inlaid_ray.quant.gptq_format import (
    QuantizeConfig,
    check_gptq_tensors,
    dequantize_gptq_tensors,
    load_gptq_checkpoint,
    pack_gptq_result,
    save_gptq_checkpoint,
    split_layers,
)
from inlaid_ray.quant.gptq_linear import GPTQLinear, gptq_linear_factory, select_gptq_matmul
from inlaid_ray.quant.hessian import (
    HessianAccumulator,
    channel_max_aggregate_hessians,
    eigenbasis_max_aggregate_hessians,
    max_aggregate_hessians,
    mix_aggregate_hessians,
    normalized_max_aggregate_hessians,
)
from inlaid_ray.quant.quantizer import SUPPORTED_BITS, QuantGrid, quantize, quantize_codes

__all__ = [
    "GPTQLinear",
    "GPTQResult",
    "HessianAccumulator",
    "QuantGrid",
    "QuantizeConfig",
    "SUPPORTED_BITS",
    "check_gptq_tensors",
    "dequantize_gptq_tensors",
    "gptq_linear_factory",
    "gptq_quantize",
    "inverse_hessian_factor",
    "load_gptq_checkpoint",
    "channel_max_aggregate_hessians",
    "eigenbasis_max_aggregate_hessians",
    "normalized_max_aggregate_hessians",
    "max_aggregate_hessians",
    "mix_aggregate_hessians",
    "pack_gptq_result",
    "quantize",
    "quantize_codes",
    "rtn_quantize",
    "save_gptq_checkpoint",
    "select_gptq_matmul",
    "split_layers",
]
