"""Shared set-up of the MLGPTQ tests (no tests here): a tiny random Llama with a tiny word-level
chat tokenizer, PEFT adapters written by `peft` for it, and JSONL calibration files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from conftest import write_tiny_hf_model

WORDS = ("the a of to and is in it task sample word user assistant system good bad review order email name "
         "price ship late fast slow happy sad city date item box red blue green").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
# name -> (rank, alpha, target modules, word pool): tasks differ in adapter and in data.
TASKS = {
    "qv": (4, 8, ["q_proj", "v_proj"], WORDS[:12]),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], WORDS[10:24]),
    "mlp": (2, 4, ["gate_proj", "up_proj", "down_proj"], WORDS[20:]),
}
GROUP_SIZE = 32  # divides the tiny model's d_in (64 and 96)


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer (vocab < the tiny model's 160) with <|im_start|>/<|im_end|> and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for w in (*WORDS, *map(str, range(60))):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def write_tiny_base(out: Path, seed: int = 0, **overrides) -> Path:
    """Tiny random GQA Llama (hidden 64, intermediate 96, 2 layers) with the word-level tokenizer."""
    path = write_tiny_hf_model(out, "llama", seed=seed, **overrides)
    write_tokenizer(path)
    return path


def make_peft_adapter(base_dir: Path, out: Path, r: int, alpha: int, targets: list[str], seed: int) -> Path:
    """A PEFT LoRA with random non-zero A and B (as after training) saved by `peft` itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  init_lora_weights=False))
    with torch.no_grad():  # make the update large enough to change the activations visibly
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(str(out))
    return out


def write_calibration(path: Path, words: list[str], n: int, seed: int, shape: str = "messages") -> Path:
    """`n` records of random sentences from `words` in one of the three record shapes."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            if shape == "messages":
                rec = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            elif shape == "prompt":
                rec = {"prompt": prompt + " ", "completion": answer}
            else:
                rec = {"text": f"{prompt} {answer}"}
            f.write(json.dumps(rec) + "\n")
    return path


def make_task_sources(root: Path, base_dir: Path, names=tuple(TASKS), n_records: int = 10):
    """TaskSource per task: its PEFT adapter and calibration file under `root`."""
    from inlaid_ray.quant.incremental import TaskSource

    sources = []
    for i, name in enumerate(names):
        r, alpha, targets, words = TASKS[name]
        adapter = root / f"adapter_{name}"
        if not adapter.exists():
            make_peft_adapter(base_dir, adapter, r, alpha, targets, seed=100 + i)
        calib = root / f"calib_{name}.jsonl"
        if not calib.exists():
            write_calibration(calib, list(words), n_records, seed=i)
        sources.append(TaskSource(name, adapter, calib))
    return sources
