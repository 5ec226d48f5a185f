"""Synthetic LoRA adapters for tests and benchmarks: plain random ones (`random_lora_adapter`), and
ones with a known cluster structure, on real model shapes, for joint compression and clustering
(docs/algorithms.md 9.4-9.8).

Each planted cluster c owns, per (layer, module), orthonormal subspaces U_c [d_out, s] and
V_c [d_in, s]. Adapter i of cluster c has B_i = U_c X_i + noise and A_i = Y_i V_c^T + noise with
Gaussian X_i [s, r], Y_i [r, s]: without noise its update B_i A_i lies in span(U_c) x span(V_c),
so a rank-k >= s basis per cluster fits it exactly and clusters are separable. Update norms are
spread log-normally so that the "normalize" transform matters, and the PEFT scaling alpha/r is
folded into B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from inlaid_ray.lora.adapter import LoRAAdapter, LoRAFactors
from inlaid_ray.lora.adapter import ModuleKey
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig

# Shape of HuggingFaceTB/SmolLM2-135M-Instruct (its config.json); tests check it against the file.
SMOLLM2_135M = ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
    name_or_path="SmolLM2-135M-Instruct",
)



def random_lora_adapter(
    config: ModelConfig, name: str, rank: int, modules: Iterable[str], seed: int | torch.Generator, *,
    a_std: float | None = 1.0, b_std: float = 1.0, scale: float = 1.0, layers: Iterable[int] | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", base_model: str | None = None,
) -> LoRAAdapter:
    """Gaussian factors A ~ N(0, a_std^2) (None: 1 / sqrt(d_in)) and B ~ N(0, b_std^2), drawn in fp32
    on `device` and cast to `dtype`, on `modules` of `layers` (default every layer); the same seed
    (or the same state of a passed generator) gives the same adapter."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for layer in layers if layers is not None else range(config.num_layers):
        for module in modules:
            d_out, d_in = config.module_shape(module)
            a = torch.randn(rank, d_in, generator=gen, device=device) * (a_std if a_std is not None else d_in**-0.5)
            b = torch.randn(d_out, rank, generator=gen, device=device) * b_std
            weights[(layer, module)] = LoRAFactors(a.to(dtype), b.to(dtype), scale)
    return LoRAAdapter(name, base_model, weights)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; every field has a small default for tests."""

    num_adapters: int = 40
    num_clusters: int = 4  # planted clusters C
    lora_rank: int = 8  # r of every adapter
    cluster_rank: int = 16  # s: dimension of a cluster's shared column and row subspaces
    noise: float = 0.1  # per-adapter noise, relative Frobenius norm added to each factor
    norm_spread: float = 1.0  # std of log(update norm) across adapters
    lora_alpha: float = 16.0  # PEFT scaling alpha / r, folded into B
    layers: tuple[int, ...] = (0,)
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_clusters <= self.num_adapters:
            raise ValueError(
                f"need 1 <= num_clusters <= num_adapters, got {self.num_clusters} and {self.num_adapters}"
            )
        if self.lora_rank < 1 or self.cluster_rank < 1 or self.noise < 0:
            raise ValueError(
                f"lora_rank {self.lora_rank} and cluster_rank {self.cluster_rank} must be >= 1, "
                f"noise {self.noise} >= 0"
            )
        bad = [m for m in self.modules if m not in LINEAR_MODULES]
        if bad or not self.modules or not self.layers:
            raise ValueError(f"modules {self.modules} / layers {self.layers}: need known, non-empty lists")


@dataclass
class SyntheticAdapters:
    """n adapters as {(layer, module): (A [r, d_in], B [d_out, r])} plus their planted labels."""

    names: list[str]
    adapters: list[dict[ModuleKey, tuple[Tensor, Tensor]]]
    labels: Tensor  # int64 [n], planted cluster of each adapter
    spec: SyntheticSpec
    # Planted orthonormal bases per module and cluster: U_c [d_out, s], V_c [d_in, s] (an oracle
    # basis for error bounds: the noise-free part of every member lies in it).
    bases: dict[ModuleKey, list[tuple[Tensor, Tensor]]]


def _orthonormal(d: int, k: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q


def _with_noise(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    if level == 0:
        return x
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x + noise * (level * torch.linalg.vector_norm(x) / torch.linalg.vector_norm(noise))


def make_synthetic_adapters(
    spec: SyntheticSpec,
    model_config: ModelConfig = SMOLLM2_135M,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SyntheticAdapters:
    """Generate spec.num_adapters adapters in balanced planted clusters (labels shuffled)."""
    bad_layers = [l for l in spec.layers if not 0 <= l < model_config.num_layers]
    if bad_layers:
        raise ValueError(f"layers {bad_layers} outside 0..{model_config.num_layers - 1}")
    gen = torch.Generator().manual_seed(spec.seed)
    n, C, r, s = spec.num_adapters, spec.num_clusters, spec.lora_rank, spec.cluster_rank
    labels = torch.arange(n) % C
    labels = labels[torch.randperm(n, generator=gen)]
    log_norms = torch.randn(n, generator=gen, dtype=torch.float64) * spec.norm_spread
    keys = [(layer, m) for layer in spec.layers for m in spec.modules]
    bases = {}
    for key in keys:
        d_out, d_in = model_config.module_shape(key[1])
        if s > min(d_out, d_in):
            raise ValueError(f"cluster_rank {s} exceeds min(d_out, d_in) = {min(d_out, d_in)} of {key}")
        bases[key] = [(_orthonormal(d_out, s, gen), _orthonormal(d_in, s, gen)) for _ in range(C)]
    adapters = []
    for i in range(n):
        c = int(labels[i])
        ad = {}
        for key in keys:
            Uc, Vc = bases[key][c]
            # Kaiming-like A (entries ~ 1/sqrt(d_in)), B carrying the adapter's norm and scaling.
            A = torch.randn(r, s, generator=gen, dtype=torch.float64) @ Vc.T * math.sqrt(Vc.shape[0] / r)
            B = Uc @ torch.randn(s, r, generator=gen, dtype=torch.float64) / math.sqrt(s * Uc.shape[0])
            A, B = _with_noise(A, spec.noise, gen), _with_noise(B, spec.noise, gen)
            B = B * (math.exp(float(log_norms[i])) * spec.lora_alpha / r)
            ad[key] = (A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype))
        adapters.append(ad)
    names = [f"synthetic-{i:05d}" for i in range(n)]
    out_bases = {
        key: [(U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)) for U, V in pairs]
        for key, pairs in bases.items()
    }
    return SyntheticAdapters(names, adapters, labels, spec, out_bases)


def raw_lora_params(adapter: dict[ModuleKey, tuple[Tensor, Tensor]]) -> int:
    """Number of LoRA parameters of one adapter: sum over modules of r (d_in + d_out)."""
    return sum(A.numel() + B.numel() for A, B in adapter.values())
