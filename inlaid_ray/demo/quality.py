"""Quality of a (quantized) base with task adapters on the demo tasks: each task's own metric from
greedy generations of the project's engine (`LLMEngine`, every adapter in one bank on ONE base),
and the eval loss (mean next-token cross-entropy over the reference completion tokens and the
end-of-turn token, the training objective of `inlaid_ray.demo.train`).

A directory is either one model (fp16 or a GPTQ checkpoint, served to every task) or a
`gptq-per-task` output holding one checkpoint per task in `<dir>/<task>/` (each task on its own
base, the non-shareable upper bound).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from inlaid_ray.progress import Progress

from inlaid_ray.demo.data import load_examples
from inlaid_ray.demo.evaluate import GenerateFn, Messages, evaluate_task
from inlaid_ray.demo.tasks import get_task
from inlaid_ray.demo.train import tokenize_example
from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams, blocks_for
from inlaid_ray.engine.builder import BankCapacity, make_bank
from inlaid_ray.lora.adapter import LoRAAdapter
from inlaid_ray.lora.bank import AdapterBank
from inlaid_ray.lora.peft_io import load_peft_adapter
from inlaid_ray.quant.heldout import scored_loss
from inlaid_ray.model.tokenizer import encode_chat
from inlaid_ray.model.transformer import Transformer
from inlaid_ray.quantized_base.loading import is_gptq_dir, load_base


def round_to_fp16(model: Transformer) -> Transformer:
    """Round every weight to fp16 in place (compute stays in the model's dtype): the unquantized
    reference holding exactly what a GPTQ checkpoint stores for its non-quantized tensors."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().to(p.dtype))
    return model


def load_eval_model(model_dir: str | Path, device: str = "cpu", fp16_reference: bool = True) -> Transformer:
    """fp32 model for evaluation; GPTQ bases keep a dequantized cache (dense speed), dense bases are
    rounded to fp16 when `fp16_reference`."""
    if is_gptq_dir(model_dir):
        return load_base(model_dir, torch.float32, device, cache_dequantized=True)
    model = load_base(model_dir, torch.float32, device)
    return round_to_fp16(model) if fp16_reference else model


def attach_adapters(model: Transformer, adapters: Mapping[str, LoRAAdapter]) -> AdapterBank | None:
    """One bank holding every adapter (task name = adapter name), attached to the model."""
    if not adapters:
        model.adapter_bank = None
        return None
    capacity = BankCapacity(max_adapters=len(adapters), max_rank=max(a.max_rank for a in adapters.values()))
    named = [dataclasses.replace(adapter, name=name) for name, adapter in adapters.items()]
    bank = make_bank(model.config, model.dtype, model.device, capacity, named)
    model.adapter_bank = bank
    return bank


def engine_generate_fn(engine: LLMEngine, tokenizer: Any, task: str | None) -> GenerateFn:
    """`evaluate_task`'s generate_fn: greedy completions of chat prompts for `task` through `engine`."""

    def generate(prompts: list[Messages], max_tokens: int) -> list[str]:
        ids = [encode_chat(tokenizer, m) for m in prompts]
        outs = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), tasks=[task] * len(ids))
        return [tokenizer.decode(list(o.token_ids), skip_special_tokens=True).strip() for o in outs]

    return generate


def make_engine(model: Transformer, bank: AdapterBank | None, max_seqs: int, max_model_len: int) -> LLMEngine:
    """An engine sized for `max_seqs` sequences of up to `max_model_len` tokens at once."""
    block_size = 16
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=max_seqs * blocks_for(max_model_len, block_size),
                       max_num_seqs=max_seqs, max_model_len=max_model_len,
                       max_num_batched_tokens=max(max_model_len, 4096))
    return LLMEngine(model, None, cfg, adapter_bank=bank)


def completion_loss(model: Transformer, tokenizer: Any, records: Sequence[dict[str, Any]], slot: int,
                    batch_tokens: int = 1024) -> tuple[float, int]:
    """(mean cross-entropy per supervised token, number of those tokens) of chat records with
    adapter `slot` (-1 = base): teacher-forced, completion tokens + end-of-turn only (the training
    labels), scored by the rollout gate's `scored_loss`."""
    examples = []
    for r in records:
        ids, labels = tokenize_example(tokenizer, r["messages"])
        examples.append((ids, next(i for i, label in enumerate(labels) if label >= 0), len(ids)))
    return scored_loss(model, examples, slot, batch_tokens)


def evaluate_tasks(
    model: Transformer,
    tokenizer: Any,
    adapters: Mapping[str, LoRAAdapter | None],
    gen_limit: int | None = None,
    loss_limit: int | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """{task: {primary_metric, value, metrics, eval_loss, n_gen, n_loss_tokens, predictions}} of
    every task in `adapters` (None = the base alone) on this ONE model."""
    bank = attach_adapters(model, {n: a for n, a in adapters.items() if a is not None})
    results: dict[str, dict[str, Any]] = {}
    for name in Progress(list(adapters), desc="eval tasks", unit="task", disable=not progress):
        task = get_task(name)
        slot = bank.slot_of(name) if bank is not None and name in bank else -1
        records = load_examples(name, "eval", data_dir)
        loss, n_tok = completion_loss(model, tokenizer, records[:loss_limit], slot)
        n_gen = len(records[:gen_limit])
        longest = max(len(encode_chat(tokenizer, r["messages"][:1])) for r in records[:gen_limit])
        engine = make_engine(model, bank, n_gen, longest + task.max_new_tokens + 1)
        gen = evaluate_task(task, engine_generate_fn(engine, tokenizer, name if slot >= 0 else None),
                            limit=gen_limit, data_dir=data_dir)
        results[name] = {"primary_metric": task.primary_metric, "value": gen["metrics"][task.primary_metric],
                         "metrics": gen["metrics"], "eval_loss": loss, "n_gen": gen["n"], "n_loss_tokens": n_tok,
                         "predictions": gen["predictions"]}
    return results


def evaluate_dir(
    model_dir: str | Path,
    tokenizer: Any,
    adapter_dirs: Mapping[str, Path | None],
    gen_limit: int | None = None,
    loss_limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """`evaluate_tasks` on a model directory, or per task on a gptq-per-task directory."""
    model_dir = Path(model_dir)
    per_task = not (model_dir / "config.json").is_file()
    groups = [[t] for t in adapter_dirs] if per_task else [list(adapter_dirs)]
    results: dict[str, dict[str, Any]] = {}
    for names in groups:
        path = model_dir / names[0] if per_task else model_dir
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model at {path} (expected config.json{' of a per-task checkpoint' if per_task else ''})")
        model = load_eval_model(path, device)
        adapters = {n: load_peft_adapter(adapter_dirs[n], model.config, name=n) if adapter_dirs[n] else None
                    for n in names}
        results.update(evaluate_tasks(model, tokenizer, adapters, gen_limit, loss_limit, progress=progress))
    return results


def format_table(rows: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Markdown table: one row per (model, task) with the task's metric and eval loss."""
    lines = ["| model | task | metric | value | eval loss | ppl | n |", "|---|---|---|---|---|---|---|"]
    for model_name, tasks in rows.items():
        for task, r in tasks.items():
            lines.append(f"| {model_name} | {task} | {r['primary_metric']} | {r['value']:.3f} | {r['eval_loss']:.4f} | "
                         f"{math.exp(r['eval_loss']):.3f} | {r['n_gen']} |")
    return "\n".join(lines)


def mean_over_tasks(results: Mapping[str, Mapping[str, Any]], key: str) -> float:
    return statistics.fmean(float(r[key]) for r in results.values())
