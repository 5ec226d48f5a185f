"""Train one PEFT LoRA adapter per demo task on SmolLM2 (transformers + peft), loss on the
assistant completion only, and save it in PEFT's format (float16 weights).

Ranks and target modules differ across tasks on purpose (r = 4 on q/v, r = 8 on attention,
r = 8 rsLoRA on all seven linears, r = 16 on all seven) so the serving code meets mixed ranks.
Training is short: bf16 autocast on CPU, logits computed only at supervised positions.
`python -m inlaid_ray.demo.train` regenerates the data set and retrains every adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from inlaid_ray.progress import Progress

from inlaid_ray.demo.data import load_examples, write_demo_data
from inlaid_ray.demo.paths import ADAPTERS_DIR, DATA_DIR, RESULTS_DIR, demo_adapter_dir
from inlaid_ray.demo.tasks import DEMO_TASKS, get_task
from inlaid_ray.model.config import LINEAR_MODULES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Recorded in adapter_config.json instead of this machine's cache path.
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_IGNORE = -100


@dataclass(frozen=True)
class LoraRecipe:
    """Adapter shape and optimisation schedule of one task."""

    r: int
    alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 8


DEMO_RECIPES: dict[str, LoraRecipe] = {
    "sentiment": LoraRecipe(r=4, alpha=8, target_modules=("q_proj", "v_proj"), steps=40, lr=2e-3),
    "extract": LoraRecipe(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), steps=80, lr=2e-3),
    "rewrite": LoraRecipe(r=8, alpha=8, target_modules=LINEAR_MODULES, use_rslora=True, steps=100),
    "email": LoraRecipe(r=16, alpha=32, target_modules=LINEAR_MODULES, steps=50, lr=2e-3),
}


@dataclass(frozen=True)
class TrainSettings:
    """Where and how numerically training runs."""

    device: str = "cpu"
    autocast_dtype: str | None = "bfloat16"  # None = plain fp32 (slower on CPU)
    # The dev machine has two cores shared with other jobs; there one thread measured ~5x faster
    # than two (OpenMP barriers stall when a thread is descheduled). None = torch's default.
    num_threads: int | None = 1
    save_dtype: str = "float16"


def tokenize_example(
    tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a user/assistant pair: labels are the completion tokens and the
    <|im_end|> that closes them; the chat prefix and the template's trailing newline are ignored."""
    prompt = _ids(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template tokenises the prompt differently inside the full conversation")
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    end = full.index(eos, len(prompt)) + 1  # keep the end-of-turn token: the model must learn to stop
    return full[:end], [_IGNORE] * len(prompt) + full[len(prompt) : end]


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, all [B, T]."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), _IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def completion_loss(
    causal_lm: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions; the vocab projection (a fifth of
    SmolLM2's FLOPs) runs only where a label exists."""
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, T, d]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != _IGNORE  # [B, T - 1]
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # [N, vocab]
    return F.cross_entropy(logits.float(), targets[keep])


def _lr_factor(step: int, recipe: LoraRecipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _lora_model(base_dir: Path, recipe: LoraRecipe, device: str) -> torch.nn.Module:
    """SmolLM2 in fp32 with trainable LoRA layers injected per `recipe` (PEFT's PeftModel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices per step: consecutive slices of a stream of per-epoch permutations."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n_examples, generator=generator).tolist()
        batches.append(order[:batch_size])
        del order[:batch_size]
    return batches


def train_adapter(
    base_dir: Path,
    task_name: str,
    out_dir: Path,
    recipe: LoraRecipe,
    seed: int = 0,
    settings: TrainSettings = TrainSettings(),
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Train and save one adapter; returns a log (recipe, losses, seconds, tokens seen)."""
    from transformers import AutoTokenizer

    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    torch.manual_seed(seed)  # LoRA A initialisation
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = _lora_model(base_dir, recipe, settings.device)
    model.train()
    causal_lm = model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    examples = [tokenize_example(tokenizer, r["messages"]) for r in load_examples(task_name, "train", data_dir)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    autocast = torch.autocast(
        device_type=torch.device(settings.device).type,
        dtype=getattr(torch, settings.autocast_dtype or "float32"),
        enabled=settings.autocast_dtype is not None,
    )
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    batches = _batch_order(len(examples), recipe.batch_size, recipe.steps, seed)
    for batch in (bar := Progress(batches, desc=f"train {task_name}", unit="step")):
        collated = _collate([examples[i] for i in batch], tokenizer.pad_token_id)
        input_ids, mask, labels = (t.to(settings.device) for t in collated)
        with autocast:
            loss = completion_loss(causal_lm, input_ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    _save_adapter(model, out_dir, getattr(torch, settings.save_dtype))
    return {
        "task": task_name,
        "recipe": asdict(recipe),
        "seed": seed,
        "settings": asdict(settings),
        "train_examples": len(examples),
        "train_tokens": tokens,
        "train_seconds": seconds,
        "losses": losses,
        "final_loss": statistics.fmean(losses[-10:]),
    }


def _save_adapter(model: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    """PEFT's save_pretrained with the LoRA weights cast to `dtype` and a portable base id."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    out_dir.mkdir(parents=True, exist_ok=True)
    # Embeddings are never targeted; saying so skips PEFT's vocabulary check against the Hub.
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's Hub model-card stub


def train_demo_adapters(
    base_dir: Path,
    out_dir: Path = ADAPTERS_DIR,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    settings: TrainSettings = TrainSettings(),
    data_dir: Path | None = None,
    results_dir: Path | None = RESULTS_DIR,
) -> dict[str, dict[str, Any]]:
    """Train one adapter per task into `out_dir/<task>/`; logs go to `results_dir/train_<task>.json`."""
    logs = {}
    for name in tasks or list(DEMO_TASKS):
        get_task(name)
        logs[name] = train_adapter(
            Path(base_dir), name, demo_adapter_dir(name, Path(out_dir)), DEMO_RECIPES[name], seed, settings, data_dir
        )
        log.info("trained %s in %.0f s (final loss %.4f)", name, logs[name]["train_seconds"], logs[name]["final_loss"])
        if results_dir is not None:
            Path(results_dir).mkdir(parents=True, exist_ok=True)
            (Path(results_dir) / f"train_{name}.json").write_text(json.dumps(logs[name], indent=2) + "\n")
    return logs


def plot_losses(logs: dict[str, dict[str, Any]], path: Path) -> None:
    """One training-loss curve per task (log scale) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, entry in logs.items():
        ax.plot(entry["losses"], label=f"{name} (r={entry['recipe']['r']}, {entry['train_seconds']:.0f} s)")
    ax.set(xlabel="step", ylabel="completion loss", yscale="log", title="Demo LoRA adapters: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merge_json(path: Path, update: dict[str, Any]) -> None:
    """Update the top-level keys of a JSON file (so retraining a subset keeps the other tasks)."""
    current = json.loads(path.read_text()) if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**current, **update}, indent=2, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the demo data set and retrain the demo adapters."""
    from transformers import AutoTokenizer

    from inlaid_ray.config import Settings
    from inlaid_ray.model.prepare import prepare_smollm2

    parser = argparse.ArgumentParser(prog="python -m inlaid_ray.demo.train", description=main.__doc__)
    parser.add_argument("--tasks", nargs="*", default=list(DEMO_TASKS), choices=list(DEMO_TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dir", type=Path, default=None, help="HF model dir (default: converted SmolLM2)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out-dir", type=Path, default=ADAPTERS_DIR)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--skip-data", action="store_true", help="train on the existing data files")
    parser.add_argument("--data-only", action="store_true", help="regenerate the data and stop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=TrainSettings.num_threads)
    parser.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    base_dir = args.base_dir or prepare_smollm2(Settings.from_env().cache_dir)
    if not args.skip_data:
        stats = write_demo_data(AutoTokenizer.from_pretrained(base_dir), args.tasks, args.seed, data_dir=args.data_dir)
        _merge_json(args.results_dir / "length_stats.json", stats)
    if args.data_only:
        return 0
    settings = TrainSettings(
        device=args.device, num_threads=args.threads, autocast_dtype=None if args.fp32 else "bfloat16"
    )
    train_demo_adapters(base_dir, args.out_dir, args.tasks, args.seed, settings, args.data_dir, args.results_dir)
    logs = {
        name: json.loads((args.results_dir / f"train_{name}.json").read_text())
        for name in DEMO_TASKS
        if (args.results_dir / f"train_{name}.json").is_file()
    }
    plot_losses(logs, args.results_dir / "train_loss.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
