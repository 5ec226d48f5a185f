"""LoRA adapters at serving time: PEFT directory I/O, the in-memory adapter, the per-replica
adapter bank (raw and compressed adapters) and the cluster-bank format that offline compression
(`inlaid_ray.compress`) writes."""

from inlaid_ray.lora.adapter import LoRAAdapter, LoRAFactors, check_adapter_fits
from inlaid_ray.lora.bank import AdapterBank, select_lora_op
from inlaid_ray.lora.cluster_bank import ClusterBank, ClusterBanks, load_cluster_banks, save_cluster_banks
from inlaid_ray.lora.peft_io import load_peft_adapter, save_peft_adapter

__all__ = [
    "AdapterBank",
    "ClusterBank",
    "ClusterBanks",
    "LoRAAdapter",
    "LoRAFactors",
    "check_adapter_fits",
    "load_cluster_banks",
    "load_peft_adapter",
    "save_cluster_banks",
    "save_peft_adapter",
    "select_lora_op",
]
