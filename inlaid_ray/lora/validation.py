"""Whether an adapter may be served: a PEFT LoRA directory in safetensors (pickle is refused
unread by `lora.peft_io`) that fits the base model's layers and shapes, names a base of the same
family, stays within the serving limits (rank, file size) and changes no projection by more
than `max_delta_ratio` of its base weight (Frobenius norms: finite but absurd weights, such as an
adapter full of 60000.0, would go live and answer garbage). One rule for onboarding (jobs/) and
the runtime adapter endpoint (serve/router.py). Problems raise AdapterError naming the file and
the offending value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from inlaid_ray.errors import AdapterError
from inlaid_ray.lora.adapter import LoRAAdapter
from inlaid_ray.lora.peft_io import WEIGHTS_NAME, base_weight_name, load_peft_adapter
from inlaid_ray.model import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterLimits:
    """What a replica can serve: rank of its adapter bank and a sanity bound on the file size."""

    max_rank: int = 16
    max_file_mb: float = 512.0
    # ||scale * B A||_F / ||W||_F per projection; trained adapters are far below 1 (the demo's: <= 0.07).
    max_delta_ratio: float = 1.0


def _same_name(a: str | None, b: str) -> bool:
    return bool(a) and Path(str(a)).name.lower() == Path(b).name.lower()


def delta_norm_ratios(adapter: LoRAAdapter, base_dir: str | Path) -> dict[tuple[int, str], float]:
    """||scale * B A||_F / ||W||_F for each adapted projection whose dense weight `base_dir` holds."""
    from safetensors import safe_open

    handles = [safe_open(str(f), "pt") for f in sorted(Path(base_dir).glob("*.safetensors"))]
    where = {k: h for h in handles for k in h.keys()}
    ratios = {}
    for key, f in adapter.weights.items():
        handle = where.get(base_weight_name(*key))
        if handle is None:  # a quantized checkpoint has no dense weight to compare with
            continue
        a, b = f.a.double(), f.b.double()
        delta_sq = float(((b.T @ b) * (a @ a.T)).sum()) * f.scale**2  # ||B A||_F^2 = <B^T B, A A^T>
        weight = float(handle.get_tensor(base_weight_name(*key)).double().norm())
        ratios[key] = delta_sq**0.5 / max(weight, 1e-30)
    return ratios


def validate_adapter(path: str | Path, model_config: ModelConfig, limits: AdapterLimits = AdapterLimits(),
                     name: str | None = None, base_dir: str | Path | None = None) -> LoRAAdapter:
    """The adapter at `path` read (fp32, CPU) and checked against the base and `limits`; with
    `base_dir` (dense safetensors) its update is also bounded by the base weights' norms."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if weights.is_file() and weights.stat().st_size > limits.max_file_mb * 2**20:
        raise AdapterError(f"{weights} is {weights.stat().st_size / 2**20:.1f} MiB, above the limit of "
                           f"{limits.max_file_mb:g} MiB for one adapter")
    adapter = load_peft_adapter(path, model_config, name=name)  # shapes, names, values, family, no pickle
    if adapter.max_rank > limits.max_rank:
        worst = max(adapter.weights.items(), key=lambda kv: kv[1].rank)[0]
        raise AdapterError(f"{path}: rank {adapter.max_rank} (layer {worst[0]} {worst[1]}) exceeds the serving "
                           f"limit max_rank={limits.max_rank}")
    if base_dir is not None:
        ratios = delta_norm_ratios(adapter, base_dir)
        worst = max(ratios, key=ratios.get, default=None)
        if worst is not None and ratios[worst] > limits.max_delta_ratio:
            raise AdapterError(f"{path}: the update of layer {worst[0]} {worst[1]} has {ratios[worst]:.3g}x the norm "
                               f"of its base weight (limit {limits.max_delta_ratio:g}); the weights look corrupt")
    base = adapter.base_model_name_or_path
    if base and not _same_name(base, model_config.name_or_path):
        # Shapes and family already match; a different checkpoint of the same shape is allowed
        # (fine-tunes are often trained against a mirror or local copy), but worth a line in the log.
        log.warning("adapter %s was trained on %r; the served base is %r (same family and shapes)",
                    path, base, model_config.name_or_path)
    return adapter
