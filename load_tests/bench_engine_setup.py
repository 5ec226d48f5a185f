"""The two set-ups of bench_engine.py: the real SmolLM2 with the demo adapters on CPU, and a
random-weight model of a named shape shared by the engine and transformers (+ PEFT adapters
copied into the engine's bank) for GPUs. Each returns a `Setup`; the 4-bit engine reuses a bank."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench_common import (
    SHAPES, adapters_from_peft_model, build_bank, fill_random_gptq, gptq_factory, use_kernel_ops,
    write_random_peft_adapters,
)
from inlaid_ray.engine import EngineConfig, LLMEngine
from inlaid_ray.lora import AdapterBank
from inlaid_ray.model import ModelConfig, random_model

if TYPE_CHECKING:
    from bench_engine import BenchConfig


@dataclass
class Setup:
    """Everything a measurement loop needs, built by `setup_real` or `setup_random`."""

    config: ModelConfig
    engine: LLMEngine
    hf: Any  # the plain HF model (base measurements)
    make_peft: Callable[[], Any]  # wraps `hf` with every adapter, returns the PEFT model
    prompts: list[list[int]]
    adapter_names: list[str]
    pad_id: int
    meta: dict[str, Any]
    bank: AdapterBank | None = None  # random set-up: filled by make_peft (the adapters come from PEFT)


def engine_config_for(prompts: list[list[int]], max_tokens: int, block_size: int = 16) -> EngineConfig:
    """Room for every prompt at once: all prefilled in one step, then decoded together."""
    longest = max(len(p) for p in prompts) + max_tokens
    return EngineConfig(
        block_size=block_size,
        num_kv_blocks=len(prompts) * (math.ceil(longest / block_size) + 1),
        max_num_seqs=len(prompts),
        max_num_batched_tokens=max(2048, sum(len(p) for p in prompts), longest),
        max_model_len=longest,
    )


def setup_real(cfg: "BenchConfig", tmp: Path) -> Setup:
    """SmolLM2 + demo adapters (or random ones of their shapes) + demo eval prompts, fp32."""
    from transformers import AutoModelForCausalLM

    from inlaid_ray.config import Settings
    from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir, load_examples
    from inlaid_ray.engine.builder import build_engine
    from inlaid_ray.model import encode_chat, load_tokenizer
    from inlaid_ray.model.prepare import prepare_smollm2

    base = prepare_smollm2(Settings.from_env().cache_dir)
    config = ModelConfig.from_dir(base)
    names = list(DEMO_TASKS)
    demo_dirs = {n: demo_adapter_dir(n) for n in names}
    if all((d / "adapter_config.json").is_file() for d in demo_dirs.values()):
        dirs, source = demo_dirs, "committed demo adapters (inlaid_ray/demo/adapters)"
    else:
        from inlaid_ray.demo.train import DEMO_RECIPES

        shapes = {n: (DEMO_RECIPES[n].r, DEMO_RECIPES[n].target_modules) for n in names}
        dirs = write_random_peft_adapters(config, shapes, tmp / "adapters", cfg.seed)
        source = "random PEFT adapters with the demo recipes' ranks and target modules (demo adapters not trained yet)"
    tokenizer = load_tokenizer(base)
    by_task = {n: load_examples(n, "eval") for n in names}
    prompts = []
    for i in range(cfg.num_prompts):  # round-robin over tasks so every N sees every length profile
        rec = by_task[names[i % len(names)]][i // len(names)]
        prompts.append(encode_chat(tokenizer, [{"role": "user", "content": rec["prompt"]}]))
    engine = build_engine(base, dirs, dtype="float32", device=cfg.device, engine_config=engine_config_for(prompts, cfg.max_tokens))
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(cfg.device).eval()

    def make_peft() -> Any:
        from peft import PeftModel

        peft = PeftModel.from_pretrained(hf, str(dirs[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            peft.load_adapter(str(dirs[n]), adapter_name=n)
        return peft.eval()

    meta = {"model": "SmolLM2-135M-Instruct (real weights)", "model_dir": str(base), "dtype": "float32",
            "adapters": source, "adapter_dirs": {n: str(d) for n, d in dirs.items()},
            "prompts": "demo eval-split prompts through the chat template, tasks round-robin",
            "prompt_lens": [len(p) for p in prompts]}
    return Setup(config, engine, hf, make_peft, prompts, names, tokenizer.pad_token_id or 0, meta)


def hf_twin(model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype, device: str) -> Any:
    """A transformers LlamaForCausalLM holding exactly our model's weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hf_cfg = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=list(config.eos_token_ids),
    )
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight names do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def setup_random(cfg: "BenchConfig", tmp: Path) -> Setup:
    """Random-weight model of `cfg.shape` shared with HF, random PEFT adapters copied into the bank."""
    config = SHAPES[cfg.shape]
    dtype = torch.float16 if torch.device(cfg.device).type == "cuda" else torch.float32
    model = random_model(config, dtype=dtype, device=cfg.device, seed=cfg.seed)
    hf = hf_twin(model, config, dtype, cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(3, config.vocab_size, (cfg.num_prompts, cfg.prompt_len), generator=gen).tolist()
    names = [f"adapter-{i:02d}" for i in range(cfg.num_random_adapters)]
    engine = LLMEngine(model, None, engine_config_for(prompts, cfg.max_tokens))
    setup = Setup(config, engine, hf, lambda: None, prompts, names, 0, {})

    def make_peft() -> Any:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=list(cfg.modules), lora_dropout=0.0,
                          init_lora_weights=False)  # random A and B: every adapter changes the output
        with torch.device(cfg.device):
            peft = get_peft_model(hf, lcfg, adapter_name=names[0])
            for n in names[1:]:
                peft.add_adapter(n, lcfg)
        peft.eval()
        bank = build_bank(config, adapters_from_peft_model(peft, names), dtype, cfg.device, cfg.rank)
        use_kernel_ops(bank, cfg.kernels)
        setup.bank = bank
        return peft

    setup.make_peft = make_peft
    setup.meta = {"model": f"{config.name_or_path}, {dtype}", "dtype": str(dtype),
                  "adapters": f"{len(names)} random PEFT adapters (init_lora_weights=False), rank {cfg.rank}, "
                              f"alpha {2 * cfg.rank}, targets {list(cfg.modules)}; the same weights copied into the bank",
                  "prompts": f"random token ids, {cfg.prompt_len} tokens each"}
    return setup


def quant_engine(config: ModelConfig, bank: Any, prompts: list[list[int]], cfg: "BenchConfig") -> LLMEngine:
    """The engine over a 4-bit GPTQ-shaped model (random codes, fp16 activations), same bank."""
    dtype = torch.float16 if torch.device(cfg.device).type == "cuda" else torch.float32
    model = random_model(config, dtype=dtype, device=cfg.device, seed=cfg.seed, make_linear=gptq_factory(cfg.device, cfg.kernels))
    fill_random_gptq(model, cfg.seed)
    return LLMEngine(model, None, engine_config_for(prompts, cfg.max_tokens), adapter_bank=bank)
