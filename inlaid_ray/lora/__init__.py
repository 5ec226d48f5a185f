"""LoRA adapters: PEFT directory I/O, the in-memory adapter, and the per-replica adapter bank."""

from inlaid_ray.lora.adapter import LoRAAdapter, LoRAFactors, check_adapter_fits
from inlaid_ray.lora.bank import AdapterBank, select_lora_op
from inlaid_ray.lora.peft_io import load_peft_adapter, save_peft_adapter

__all__ = [
    "AdapterBank",
    "LoRAAdapter",
    "LoRAFactors",
    "check_adapter_fits",
    "load_peft_adapter",
    "save_peft_adapter",
    "select_lora_op",
]
