"""Offline quantization: the GPTQ grid, layer-input Hessians (per task, max/mix aggregation), the
blockwise GPTQ routine, and the MLGPTQ driver built on them. The quantized base as it is served
(GPTQ v1 checkpoint, `GPTQLinear`, `load_base`) lives in `inlaid_ray.quantized_base`."""

from inlaid_ray.quant.gptq import GPTQResult, gptq_quantize, inverse_hessian_factor, rtn_quantize
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
    "GPTQResult",
    "HessianAccumulator",
    "QuantGrid",
    "SUPPORTED_BITS",
    "gptq_quantize",
    "inverse_hessian_factor",
    "channel_max_aggregate_hessians",
    "eigenbasis_max_aggregate_hessians",
    "normalized_max_aggregate_hessians",
    "max_aggregate_hessians",
    "mix_aggregate_hessians",
    "quantize",
    "quantize_codes",
    "rtn_quantize",
]
