"""The GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: "gptq"`,
docs/algorithms.md section 3): packing a `GPTQResult` into `qweight/qzeros/scales/g_idx(/bias)`,
validating such tensors, and saving / loading a whole quantized model directory
(`model.safetensors`, `quantize_config.json`, `config.json["quantization_config"]`, tokenizer).

Bit packing and dequantization are the references in `inlaid_ray.kernels.reference`; this module
only arranges tensors and files. Directory writes are atomic (temp dir, then rename).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inlaid_ray.atomic_files import replacing_dir
from inlaid_ray import __version__
from inlaid_ray.errors import ModelLoadError
from inlaid_ray.kernels.reference import gptq_dequantize_ref, pack_codes
from inlaid_ray.model.config import ModelConfig
from inlaid_ray.quant.quantizer import SUPPORTED_BITS, QuantGrid

if TYPE_CHECKING:  # the offline GPTQ result is only read here, by attribute
    from inlaid_ray.quant.gptq import GPTQResult

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


@dataclass(frozen=True)
class QuantizeConfig:
    """What `quantize_config.json` holds: the grid, names AutoGPTQ readers expect, and `meta`
    (our MLGPTQ provenance: method, task ids, aggregation, activation_source, damping, ...)."""

    grid: QuantGrid = field(default_factory=QuantGrid)
    model_name_or_path: str = ""
    model_file_base_name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """AutoGPTQ `to_dict` keys plus GPTQModel's `lm_head`/`pack_dtype` and our `meta`."""
        g = self.grid
        return {
            "bits": g.bits,
            "group_size": g.group_size,
            "damp_percent": g.damp_percent,
            "desc_act": g.desc_act,
            "static_groups": g.static_groups,
            "sym": g.sym,
            "true_sequential": g.true_sequential,
            "model_name_or_path": self.model_name_or_path,
            "model_file_base_name": self.model_file_base_name,
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {
                "quantizer": [f"inlaid-ray:{__version__}"],
                "blocksize": g.blocksize,
                "damp_max": g.damp_max,
                "psd_repair": g.psd_repair,
                **self.meta,
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "quantize config") -> "QuantizeConfig":
        """Parse AutoGPTQ/GPTQModel keys (synonyms `w_bit`, `q_group_size` accepted); v1 only."""
        method = d.get("quant_method", "gptq")
        fmt = d.get("checkpoint_format", "gptq")
        if method != "gptq" or fmt != "gptq" or d.get("is_marlin_format", False):
            raise ModelLoadError(
                f"{source}: quant_method={method!r}, checkpoint_format={fmt!r}, "
                f"is_marlin_format={d.get('is_marlin_format', False)}; only GPTQ v1 ('gptq', 'gptq') is supported"
            )
        meta = dict(d.get("meta") or {})
        known = {f.name for f in fields(QuantGrid)}
        grid_args = {
            "bits": d.get("bits", d.get("w_bit")),
            "group_size": d.get("group_size", d.get("q_group_size", -1)),
            "sym": d.get("sym", True),
            "desc_act": d.get("desc_act", False),
            "static_groups": d.get("static_groups", False),
            "damp_percent": d.get("damp_percent", 0.01),
            "true_sequential": d.get("true_sequential", True),
            **{k: meta[k] for k in ("blocksize", "damp_max", "psd_repair") if k in meta and k in known},
        }
        try:
            grid = QuantGrid(**grid_args)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: invalid GPTQ settings {grid_args}: {exc}") from exc
        for k in ("quantizer", "blocksize", "damp_max", "psd_repair"):
            meta.pop(k, None)
        return cls(
            grid=grid,
            model_name_or_path=str(d.get("model_name_or_path", "")),
            model_file_base_name=str(d.get("model_file_base_name") or "model"),
            meta=meta,
        )


def pack_gptq_result(result: GPTQResult, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors of one layer: qweight int32 [d_in*b/32, d_out] (packed along the input dim),
    qzeros int32 [n_groups, d_out*b/32] storing zero - 1, scales fp16 [n_groups, d_out], g_idx int32
    [d_in], bias fp16 [d_out] if given. Runs on the result's device."""
    bits = result.bits
    d_out, d_in = result.codes.shape
    if (d_in * bits) % 32 or (d_out * bits) % 32:
        raise ValueError(
            f"{bits}-bit packing needs d_in*bits and d_out*bits divisible by 32; got d_in={d_in}, d_out={d_out}"
        )
    if int(result.zeros.min()) < 1:
        # v1 stores zero - 1, so a zero point of 0 (asymmetric grid of an all-non-negative group)
        # cannot be written; GPTQ v2 fixes this, but v1 is what serving kernels read.
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1); quantize with sym=True")
    scales16 = result.scales.to(torch.float16)
    if not torch.equal(scales16.float(), result.scales.float()):
        raise ValueError("scales are not exactly representable in fp16; they must come from QuantGrid.find_params")
    out = {
        "qweight": pack_codes(result.codes.t().contiguous(), bits, dim=0),  # [d_in*b/32, d_out]
        "qzeros": pack_codes(result.zeros - 1, bits, dim=1),  # [n_groups, d_out*b/32]
        "scales": scales16.contiguous(),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def check_gptq_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], bits: int) -> tuple[int, int, int]:
    """Validate one layer's GPTQ v1 tensors (names without the prefix); returns (d_out, d_in, n_groups)."""
    missing = [n for n in GPTQ_TENSORS if n not in tensors]
    if missing:
        raise ModelLoadError(f"{prefix}: missing GPTQ tensors {missing}")
    if bits not in SUPPORTED_BITS:
        raise ModelLoadError(f"{prefix}: bits={bits} not in {SUPPORTED_BITS}")
    qweight, qzeros, scales, g_idx = (tensors[n] for n in GPTQ_TENSORS)
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise ModelLoadError(f"{prefix}.{name} has dtype {t.dtype}, expected torch.int32")
    if scales.dtype not in _SCALE_DTYPES:
        raise ModelLoadError(f"{prefix}.scales has dtype {scales.dtype}, expected one of {_SCALE_DTYPES}")
    if scales.dim() != 2 or g_idx.dim() != 1:
        raise ModelLoadError(f"{prefix}: scales {tuple(scales.shape)} must be 2-D and g_idx {tuple(g_idx.shape)} 1-D")
    (n_groups, d_out), d_in = scales.shape, g_idx.shape[0]
    expect = {
        "qweight": (d_in * bits // 32, d_out),
        "qzeros": (n_groups, d_out * bits // 32),
    }
    if (d_in * bits) % 32 or (d_out * bits) % 32:
        raise ModelLoadError(f"{prefix}: d_in={d_in}, d_out={d_out} cannot be {bits}-bit packed in int32 words")
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(f"{prefix}.{name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                 f"for d_in={d_in}, d_out={d_out}, n_groups={n_groups}, bits={bits}")
    if d_in and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        span = [int(g_idx.min()), int(g_idx.max())]
        raise ModelLoadError(f"{prefix}.g_idx values span {span}, outside [0, {n_groups})")
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ModelLoadError(f"{prefix}.bias has shape {tuple(bias.shape)}, expected ({d_out},)")
    return d_out, d_in, n_groups


def dequantize_gptq_tensors(tensors: Mapping[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Dense W [d_out, d_in] in the scales dtype, through `kernels.reference.gptq_dequantize_ref`."""
    return gptq_dequantize_ref(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)


def split_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group flat checkpoint tensors `prefix.qweight`, ... by quantized-layer prefix."""
    prefixes = {n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")}
    return {p: {n: tensors[f"{p}.{n}"] for n in (*GPTQ_TENSORS, "bias") if f"{p}.{n}" in tensors} for p in prefixes}


def _check_against_model(prefix: str, d_out: int, d_in: int, model_config: ModelConfig | None) -> None:
    m = _LAYER_PREFIX.match(prefix)
    if model_config is None or m is None:
        return
    expected = model_config.module_shape(m.group(2))
    if (d_out, d_in) != expected or int(m.group(1)) >= model_config.num_layers:
        raise ModelLoadError(f"{prefix}: quantized shape (d_out={d_out}, d_in={d_in}) does not fit the model config "
                             f"(expected {expected}, {model_config.num_layers} layers)")


def _flatten(quantized_layers: Mapping[str, Mapping[str, torch.Tensor]], other: Mapping[str, torch.Tensor],
             bits: int, other_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for prefix, layer in quantized_layers.items():
        prefix = prefix.rstrip(".")
        check_gptq_tensors(prefix, layer, bits)
        for name, t in layer.items():
            flat[f"{prefix}.{name}"] = t
    seen: set[int] = set()
    for name, t in other.items():
        if name in flat:
            raise ValueError(f"tensor {name!r} is both a quantized-layer tensor and an unquantized one")
        flat[name] = t.to(other_dtype) if t.is_floating_point() else t
    out = {}
    for name, t in flat.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied tensors (embed/lm_head): safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_gptq_checkpoint(
    out_dir: str | Path,
    quantized_layers: Mapping[str, Mapping[str, torch.Tensor]],
    other_tensors: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    quant_config: QuantizeConfig,
    meta: Mapping[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    other_dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a GPTQ v1 model directory atomically; returns its path.

    quantized_layers: HF prefix (e.g. `model.layers.0.self_attn.q_proj`) -> `pack_gptq_result` output;
    other_tensors: embeddings, norms, lm_head under HF names (floating ones cast to `other_dtype`);
    meta: merged into `quant_config.meta` (provenance); tokenizer files copied from `tokenizer_dir`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    qc = QuantizeConfig(quant_config.grid, quant_config.model_name_or_path, quant_config.model_file_base_name,
                        {**quant_config.meta, **(meta or {})})
    tensors = _flatten(quantized_layers, other_tensors, qc.grid.bits, other_dtype)
    qdict = qc.to_dict()
    config = {**dict(hf_config), "quantization_config": qdict}
    if other_dtype in (torch.float16, torch.bfloat16):
        config["torch_dtype"] = str(other_dtype).removeprefix("torch.")
    with replacing_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qdict, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return out_dir


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def load_gptq_checkpoint(
    model_dir: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], QuantizeConfig, dict[str, torch.Tensor]]:
    """(config.json dict, QuantizeConfig, all tensors by HF name) of a GPTQ v1 directory, with every
    quantized layer validated (dtypes, packed shapes, g_idx range, fit to the model config)."""
    model_dir = Path(model_dir)
    cfg_path, q_path, w_path = model_dir / "config.json", model_dir / QUANTIZE_CONFIG_FILE, model_dir / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    config = _read_json(cfg_path)
    if q_path.is_file():
        qdict = _read_json(q_path)
    elif isinstance(config.get("quantization_config"), dict):
        qdict = config["quantization_config"]
    else:
        raise ModelLoadError(f"{model_dir} has neither {QUANTIZE_CONFIG_FILE} nor config.json['quantization_config']")
    qc = QuantizeConfig.from_dict(qdict, source=str(q_path))
    if not w_path.is_file():
        raise ModelLoadError(f"no {WEIGHTS_FILE} in {model_dir} (sharded GPTQ checkpoints are not supported yet)")
    try:
        tensors = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read {w_path}: {exc}") from exc
    try:
        model_config: ModelConfig | None = ModelConfig.from_hf_dict(config, name_or_path=str(model_dir))
    except (ModelLoadError, KeyError):
        model_config = None  # not a Llama-family config: validate the tensors on their own
    layers = split_layers(tensors)
    if not layers:
        raise ModelLoadError(f"{w_path} holds no quantized layer (no '*.qweight' tensor)")
    for prefix, layer in layers.items():
        d_out, d_in, n_groups = check_gptq_tensors(prefix, layer, qc.grid.bits)
        g = d_in if qc.grid.group_size == -1 else qc.grid.group_size
        if n_groups != math.ceil(d_in / g):
            raise ModelLoadError(f"{prefix}: {n_groups} groups, but group_size={qc.grid.group_size} "
                                 f"and d_in={d_in} give {math.ceil(d_in / g)}")
        _check_against_model(prefix, d_out, d_in, model_config)
    return config, qc, tensors
