"""Artifacts the HTTP load driver serves besides the fp32 base: the MLGPTQ 4-bit SmolLM2
checkpoint, made once with `inlaid_ray.quant.incremental.quantize_base` from the demo tasks'
adapters and calibration sets and cached under the driver's work directory.

A checkpoint is reused only if its `quantize_config.json` records the same grid and tasks
(a partial directory from a killed run has none, so it is rebuilt).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from inlaid_ray.demo import demo_adapter_dir
from inlaid_ray.demo.paths import demo_data_path
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.incremental import TaskSource, quantize_base
from inlaid_ray.quant.mlgptq import DEFAULT_SHARED_METHOD, MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quantized_base.loading import is_gptq_dir


def quantized_dir_name(bits: int, group_size: int, method: str) -> str:
    """Cache directory name of a checkpoint, e.g. 'smollm2-gptq-mixed-4bit-g64'."""
    return f"smollm2-{method}-{bits}bit-g{group_size}"


def _matches(ckpt: Path, bits: int, group_size: int, tasks: Sequence[str], method: str) -> bool:
    if not is_gptq_dir(ckpt) or not (ckpt / "model.safetensors").is_file():
        return False
    qc = json.loads((ckpt / "quantize_config.json").read_text())
    meta = qc.get("meta") or {}
    return qc.get("bits") == bits and qc.get("group_size") == group_size and meta.get("method") == method and \
        sorted(meta.get("task_ids") or []) == sorted(tasks)


def ensure_quantized_base(
    base_dir: Path,
    work_dir: Path,
    tasks: Sequence[str],
    bits: int = 4,
    group_size: int = 64,
    calib_tokens: int | None = 4096,
    progress: bool = True,
    method: str = DEFAULT_SHARED_METHOD,
) -> Path:
    """The cached shared-base checkpoint of `base_dir` for the demo `tasks` (made if missing);
    the default shared method by default, as the demo serves.

    group_size 64 because SmolLM2's hidden size (576) is not a multiple of 128.
    """
    out = work_dir / quantized_dir_name(bits, group_size, method)
    if _matches(out, bits, group_size, tasks, method):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = [TaskSource(t, demo_adapter_dir(t), demo_data_path(t, "calib")) for t in tasks]
    cfg = MLGPTQConfig(method=method, grid=QuantGrid(bits=bits, group_size=group_size))  # type: ignore[arg-type]
    calib = CalibrationConfig(tokens_per_task=calib_tokens)
    quantize_base(base_dir, sources, out, cfg, calib, stats_dir=None, progress=progress)
    return out
