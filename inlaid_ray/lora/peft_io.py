"""Read and write LoRA adapters in the PEFT directory format (docs/algorithms.md section 4).

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` with tensors
`base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight [r, d_in]` and
`...lora_B.weight [d_out, r]`; the update of one projection is `y += s * B (A x)` with
`s = alpha / r` (`alpha / sqrt(r)` with rsLoRA), r and alpha taken per module from
`rank_pattern` / `alpha_pattern` exactly as PEFT matches them. Loading validates everything
against the base `ModelConfig` and raises `AdapterError` naming the file, tensor and values;
pickle files (`adapter_model.bin`) are refused without ever being opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from inlaid_ray.atomic_files import write_bytes_atomic
from inlaid_ray.errors import AdapterError
from inlaid_ray.lora.adapter import LoRAAdapter, LoRAFactors, check_adapter_fits
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

_BLOCK_OF = {m: "self_attn" for m in LINEAR_MODULES[:4]} | {m: "mlp" for m in LINEAR_MODULES[4:]}
# `key` is the module name PEFT matched patterns against (relative to the wrapped model).
_TENSOR_RE = re.compile(r"^base_model\.model\.(?P<key>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER_KEY_RE = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<module>\w+)$")
# Config values that change what the adapter computes in ways the engine does not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA (needs lora_magnitude_vector)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
# Model families recognisable from a name token such as "smollm2", "llama", "qwen2".
_FAMILIES = ("smollm", "tinyllama", "llama", "mixtral", "mistral", "qwen", "gemma", "phi",
             "gpt2", "falcon", "opt", "bloom", "pythia", "olmo", "deepseek", "granite")


def load_peft_adapter(
    path: str | Path,
    model_config: ModelConfig,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoRAAdapter:
    """Read a PEFT LoRA directory as-is and validate it against `model_config`."""
    adapter_dir = Path(path)
    cfg_path, weights_path = _locate_files(adapter_dir)
    cfg = _read_config(cfg_path)
    settings = _LoraSettings.parse(cfg, cfg_path)
    data = weights_path.read_bytes()
    try:
        tensors = safetensors_load(data)
    except SafetensorError as exc:
        raise AdapterError(f"{weights_path} is not a valid safetensors file: {exc}") from exc
    weights = _collect_factors(tensors, settings, weights_path, dtype, device)
    adapter = LoRAAdapter(
        name=name or adapter_dir.resolve().name,
        base_model_name_or_path=settings.base_model,
        weights=weights,
        content_hash=hashlib.sha256(data).hexdigest(),
        source=str(adapter_dir),
        extra={"adapter_config": cfg},
    )
    try:
        check_adapter_fits(adapter, model_config)
    except AdapterError as exc:
        raise AdapterError(f"{weights_path}: {exc}") from exc
    _check_family(settings.base_model, model_config.name_or_path, cfg_path)
    return adapter


def base_weight_name(layer: int, module: str) -> str:
    """The Hugging Face name of the dense weight that (layer, module) adapts."""
    return f"model.layers.{layer}.{_BLOCK_OF[module]}.{module}.weight"


def save_peft_adapter(adapter: LoRAAdapter, path: str | Path) -> str:
    """Write `adapter` as a standard PEFT directory with its scaling folded into lora_B
    (lora_alpha = r per module, so PEFT applies scale 1); returns the file's sha256."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for (layer, module), f in sorted(adapter.weights.items()):
        key = base_weight_name(layer, module).removesuffix(".weight")
        tensors[f"base_model.model.{key}.lora_A.weight"] = f.a.detach().cpu().contiguous()
        b = (f.b.detach().cpu().float() * f.scale).to(f.b.dtype)
        if not bool(torch.isfinite(b).all()):
            raise AdapterError(f"adapter {adapter.name!r} {key}: lora_B * scale {f.scale} "
                               f"overflows {f.b.dtype}; convert the adapter to float32 first")
        tensors[f"base_model.model.{key}.lora_B.weight"] = b.contiguous()
        ranks[key] = f.rank
    if not ranks:
        raise AdapterError(f"adapter {adapter.name!r} has no weights to save")
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # most common rank
    pattern = {k: v for k, v in ranks.items() if v != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = r everywhere: scale 1, already folded
        "target_modules": list(ranks),  # full module names: exact even for ragged coverage
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    data = safetensors_save(tensors, metadata={"format": "pt"})
    write_bytes_atomic(out / WEIGHTS_NAME, data)
    write_bytes_atomic(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _LoraSettings:
    """The adapter_config.json fields that decide what the tensors mean."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: str | tuple[str, ...] | None  # regex string, names, or None = use tensors
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    base_model: str | None

    @classmethod
    def parse(cls, cfg: dict[str, Any], cfg_path: Path) -> "_LoraSettings":
        peft_type = cfg.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}, only 'LORA' is supported")
        for key, what in _UNSUPPORTED.items():
            if cfg.get(key):
                raise AdapterError(f"{cfg_path}: {what} is not supported ({key}={cfg[key]!r})")
        if cfg.get("bias", "none") != "none":
            raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} is not supported, only 'none'")
        if cfg.get("modules_to_save"):
            raise AdapterError(
                f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r} is not supported "
                "(fully trained copies of base modules cannot be shared across adapters)"
            )
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # PEFT's defaults
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            raise AdapterError(f"{cfg_path}: need a positive int r and a number lora_alpha, "
                               f"got r={r!r}, lora_alpha={alpha!r}")
        base = cfg.get("base_model_name_or_path")
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern=_pattern_dict(cfg, "rank_pattern", cfg_path),
            alpha_pattern=_pattern_dict(cfg, "alpha_pattern", cfg_path),
            target_modules=_parse_targets(cfg.get("target_modules"), cfg_path),
            layers_to_transform=_int_tuple(cfg.get("layers_to_transform"), "layers_to_transform", cfg_path),
            layers_pattern=_str_tuple(cfg.get("layers_pattern")),
            base_model=str(base) if base else None,
        )

    def rank_alpha(self, key: str) -> tuple[int, float]:
        """(r, alpha) of module `key`, matched like PEFT's `get_pattern_key` (first match wins)."""
        r = next((v for k, v in self.rank_pattern.items() if _pattern_matches(k, key)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if _pattern_matches(k, key)),
                     self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, key: str) -> float:
        r, alpha = self.rank_alpha(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def selects(self, key: str, layer: int) -> bool:
        """Whether target_modules (+ layers_to_transform) select module `key`, as in PEFT's
        `check_target_module_exists`; None (no target list) accepts what the file holds."""
        t = self.target_modules
        if t is None:
            return True
        if isinstance(t, str):  # regex; PEFT ignores layers_to_transform here
            return re.fullmatch(t, key) is not None
        if key in t:
            return True
        if not any(key.endswith("." + name) for name in t):
            return False
        if self.layers_to_transform is None or not self.layers_to_transform:
            return True
        if self.layers_pattern and not any(re.match(rf"(?:^|.*?\.){p}\.{layer}\.", key)
                                           for p in self.layers_pattern):
            return False
        return layer in self.layers_to_transform


def _pattern_matches(pattern: str, key: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", key) is not None  # peft.utils.other.get_pattern_key


def _parse_targets(raw: Any, cfg_path: Path) -> str | tuple[str, ...] | None:
    """Normalise target_modules; reject anything that could adapt a non-linear or lm_head."""
    if raw is None:
        return None
    if isinstance(raw, str):
        if raw.lower() == "all-linear":  # PEFT excludes the output head from all-linear
            return LINEAR_MODULES
        try:
            regex = re.compile(raw)
        except re.error as exc:
            raise AdapterError(f"{cfg_path}: target_modules regex {raw!r} is invalid: {exc}") from exc
        outside = [n for n in ("lm_head", "model.embed_tokens", "embed_tokens") if regex.fullmatch(n)]
        if outside:
            raise AdapterError(f"{cfg_path}: target_modules {raw!r} matches {outside}, "
                               f"only {LINEAR_MODULES} can be adapted")
        return raw
    if not isinstance(raw, (list, tuple)) or not all(isinstance(x, str) for x in raw):
        raise AdapterError(f"{cfg_path}: target_modules must be a string or a list of names, got {raw!r}")
    bad = [x for x in raw if x.rsplit(".", 1)[-1] not in LINEAR_MODULES]
    if bad:
        raise AdapterError(f"{cfg_path}: target_modules {bad} are not among the supported "
                           f"linears {LINEAR_MODULES}")
    return tuple(raw)


def _pattern_dict(cfg: dict[str, Any], key: str, cfg_path: Path) -> dict[str, Any]:
    raw = cfg.get(key) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in raw.values()):
        raise AdapterError(f"{cfg_path}: {key} must map module patterns to positive numbers, got {raw!r}")
    return dict(raw)


def _int_tuple(raw: Any, key: str, cfg_path: Path) -> tuple[int, ...] | None:
    if raw is None:
        return None
    values = [raw] if isinstance(raw, int) else raw
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise AdapterError(f"{cfg_path}: {key} must be an int or a list of ints, got {raw!r}")
    return tuple(values)


def _str_tuple(raw: Any) -> tuple[str, ...] | None:
    if not raw:
        return None
    return (raw,) if isinstance(raw, str) else tuple(raw)


# ----------------------------------------------------------------------------- files and tensors


def _locate_files(adapter_dir: Path) -> tuple[Path, Path]:
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    cfg_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        if (adapter_dir / PICKLE_NAME).exists():
            # Never unpickled: a pickle can run arbitrary code on load.
            raise AdapterError(
                f"{adapter_dir / PICKLE_NAME} is a pickle file and is refused for safety; convert "
                f"the adapter to {WEIGHTS_NAME} (e.g. save_pretrained(safe_serialization=True))"
            )
        found = sorted(p.name for p in adapter_dir.iterdir())
        raise AdapterError(f"no {WEIGHTS_NAME} in {adapter_dir} (found: {found})")
    if not cfg_path.is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {adapter_dir}")
    return cfg_path, weights_path


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _collect_factors(
    tensors: dict[str, torch.Tensor],
    settings: _LoraSettings,
    weights_path: Path,
    dtype: torch.dtype,
    device: str | torch.device,
) -> dict[tuple[int, str], LoRAFactors]:
    """Pair lora_A/lora_B per module, check names, ranks and values, convert to `dtype`."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tname, t in tensors.items():
        key, ab = _parse_tensor_name(tname, weights_path)
        pairs.setdefault(key, {})[ab] = t
    if not pairs:
        raise AdapterError(f"{weights_path} holds no LoRA tensors")
    out: dict[tuple[int, str], LoRAFactors] = {}
    for key, ab in sorted(pairs.items()):
        m = _LAYER_KEY_RE.match(key)
        assert m is not None, key  # checked in _parse_tensor_name
        layer, module = int(m["layer"]), m["module"]
        where = f"{weights_path} module {key}"
        missing = {"A", "B"} - set(ab)
        if missing:
            raise AdapterError(f"{where}: lora_{missing.pop()}.weight is missing (its partner is present)")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must be 2-D")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{where}: weights must be floating point, got {a.dtype} / {b.dtype}")
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: rank mismatch, lora_A {tuple(a.shape)} has r={a.shape[0]} "
                               f"but lora_B {tuple(b.shape)} has r={b.shape[1]}")
        if not settings.selects(key, layer):
            raise AdapterError(f"{where}: not selected by target_modules={settings.target_modules!r}"
                               f" / layers_to_transform={settings.layers_to_transform!r}")
        r_cfg, _ = settings.rank_alpha(key)
        if a.shape[0] != r_cfg:
            raise AdapterError(f"{where}: tensors have rank {a.shape[0]} but the config "
                               f"(r / rank_pattern) gives r={r_cfg}")
        a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        for nm, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise AdapterError(f"{where}: {nm} has {bad} NaN/Inf values (after conversion to {dtype})")
        out[(layer, module)] = LoRAFactors(a=a, b=b, scale=settings.scale(key))
    return out


def _parse_tensor_name(tname: str, weights_path: Path) -> tuple[str, str]:
    """(module key, 'A' | 'B') of one tensor name; AdapterError for anything unsupported."""
    if "lora_embedding_" in tname:
        raise AdapterError(f"{weights_path}: tensor {tname!r} is an embedding LoRA, which is not supported")
    m = _TENSOR_RE.match(tname)
    if m is None:
        raise AdapterError(f"{weights_path}: unexpected tensor {tname!r}; expected "
                           "base_model.model.model.layers.{l}.<block>.<proj>.lora_{A,B}.weight")
    key = m["key"]
    lk = _LAYER_KEY_RE.match(key)
    if lk is None or lk["module"] not in LINEAR_MODULES or _BLOCK_OF[lk["module"]] != lk["block"]:
        raise AdapterError(f"{weights_path}: tensor {tname!r} targets {key!r}, which is not one of "
                           f"the supported linears {LINEAR_MODULES} of a decoder layer")
    return key, m["ab"]


def _model_family(name: str | None) -> str | None:
    """Model family named by an HF id or local path (its last part), None if unclear."""
    if not name:
        return None
    parts = [p for p in re.split(r"[\\/]", name.strip()) if p]
    if not parts:
        return None
    last = next((p for p in parts if p.startswith("models--")), parts[-1])  # HF cache dir
    found = set()
    for token in re.split(r"[-_.\s]+", last.lower()):
        fam = next((f for f in _FAMILIES if re.fullmatch(rf"{f}\d*", token)), None)
        if fam is not None:
            found.add(fam)
    return found.pop() if len(found) == 1 else None


def _check_family(adapter_base: str | None, model_name: str, cfg_path: Path) -> None:
    # Shapes are the real check; this only catches a clearly different family by name.
    a, m = _model_family(adapter_base), _model_family(model_name)
    if a is not None and m is not None and a != m:
        raise AdapterError(f"{cfg_path}: base_model_name_or_path {adapter_base!r} ({a}) is a "
                           f"different model family from the served base {model_name!r} ({m})")
