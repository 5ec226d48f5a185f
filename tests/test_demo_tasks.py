"""Demo tasks: deterministic disjoint generated splits, scorers, committed data, committed PEFT
adapters (config, tensor names and shapes for SmolLM2) and the committed evaluation results."""

from __future__ import annotations

import itertools
import json
import random
import re
import statistics

import pytest
from safetensors import safe_open

from inlaid_ray.demo import (
    DEMO_TASKS,
    RESULTS_DIR,
    SPLIT_SIZES,
    SPLITS,
    demo_adapter_dir,
    demo_data_path,
    get_task,
    load_examples,
    task_length_stats,
)
from inlaid_ray.demo.evaluate import evaluate_task
from inlaid_ray.demo.metrics import field_accuracy, lcs_length, parse_json_object, rouge_l, rouge_tokens
from inlaid_ray.demo.train import DEMO_RECIPES
from inlaid_ray.errors import TaskNotFound
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig

# SmolLM2-135M-Instruct's shape, as the brief for the demo adapters states it.
SMOLLM2 = ModelConfig(
    hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152
)
LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$"
)
TASK_NAMES = list(DEMO_TASKS)


def _without_token_counts(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("prompt_tokens", "completion_tokens")}


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generator_is_deterministic_and_seeded(name: str) -> None:
    task = get_task(name)
    first = task.make_examples("train", 30, seed=0)
    assert first == task.make_examples("train", 30, seed=0)
    assert first != task.make_examples("train", 30, seed=1)
    assert len({r["id"] for r in first}) == 30, "examples within a split must be distinct"
    for record in first:
        assert record["messages"] == [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_for_any_seeds(name: str) -> None:
    task = get_task(name)
    splits = {split: task.make_examples(split, 60, seed=i) for i, split in enumerate(SPLITS)}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not {r["id"] for r in splits[a]} & {r["id"] for r in splits[b]}, (a, b)
        assert not {r["prompt"] for r in splits[a]} & {r["prompt"] for r in splits[b]}, (a, b)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompts_vary_across_templates(name: str) -> None:
    task = get_task(name)
    records = task.make_examples("eval", SPLIT_SIZES["eval"])
    # Each template leaves some fixed wording; count how many different templates were used.
    used = {
        i
        for r in records
        for i, t in enumerate(task.prompt_templates)
        if all(piece in r["prompt"] for piece in re.split(r"\{\w+\}", t) if piece.strip())
    }
    assert len(used) >= len(task.prompt_templates) - 1, used


@pytest.mark.parametrize("name", TASK_NAMES)
def test_committed_data_is_what_the_generator_makes(name: str) -> None:
    task = get_task(name)
    for split in SPLITS:
        committed = load_examples(name, split)
        assert len(committed) == SPLIT_SIZES[split]
        assert [_without_token_counts(r) for r in committed] == task.make_examples(split, SPLIT_SIZES[split], 0)
        assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in committed)


def test_output_length_profiles_are_clearly_different() -> None:
    means = [task_length_stats(name)["completion_tokens"]["mean"] for name in TASK_NAMES]
    for name, shorter, longer in zip(TASK_NAMES[1:], means, means[1:]):
        assert longer >= 1.4 * shorter, f"{name}: mean completion {longer} vs previous task {shorter}"
    for name in TASK_NAMES:  # the evaluation budget leaves room above every reference
        longest = max(r["completion_tokens"] for split in SPLITS for r in load_examples(name, split))
        assert get_task(name).max_new_tokens >= 1.2 * longest + 1, (name, longest)
    stats = task_length_stats("email")
    tokens = [r["completion_tokens"] for r in load_examples("email", "train")]
    assert stats["completion_tokens"]["mean"] == pytest.approx(statistics.fmean(tokens))
    assert stats["completion_tokens"]["max"] == max(tokens) and stats["n"] == len(tokens)


def test_unknown_task_and_split_are_named_in_errors() -> None:
    with pytest.raises(TaskNotFound, match="nope"):
        get_task("nope")
    with pytest.raises(TaskNotFound, match="nope"):
        demo_adapter_dir("nope")
    with pytest.raises(ValueError, match="test"):
        demo_data_path("sentiment", "test")
    with pytest.raises(ValueError, match="test"):
        get_task("sentiment").make_examples("test", 1)


# --------------------------------------------------------------------------- scorers


def _brute_force_lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by trying every subsequence of `a` (tiny inputs only)."""

    def is_subsequence(sub: tuple[str, ...], seq: list[str]) -> bool:
        it = iter(seq)
        return all(x in it for x in sub)

    for size in range(len(a), 0, -1):
        if any(is_subsequence(sub, b) for sub in itertools.combinations(a, size)):
            return size
    return 0


def test_lcs_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _brute_force_lcs(a, b), (a, b)


def test_rouge_l_is_the_lcs_f1() -> None:
    pred, ref = "The red box was painted, quickly!", "the box was painted by Anna"
    p_tok, r_tok = rouge_tokens(pred), rouge_tokens(ref)
    lcs = _brute_force_lcs(p_tok, r_tok)
    precision, recall = lcs / len(p_tok), lcs / len(r_tok)
    assert rouge_l(pred, ref) == pytest.approx(2 * precision * recall / (precision + recall))
    assert rouge_l("", "") == 1.0 and rouge_l("", ref) == 0.0 and rouge_l("xyz", ref) == 0.0


def test_json_helpers() -> None:
    assert parse_json_object('Sure! ```json\n{"qty": 3, "city": "Lyon"}\n```') == {"qty": 3, "city": "Lyon"}
    assert parse_json_object("{broken {\"a\": 1}") == {"a": 1}
    assert parse_json_object("[1, 2]") is None and parse_json_object("no json") is None
    assert field_accuracy({"qty": 3, "city": "Nice"}, {"qty": 3, "city": "Lyon"}) == 0.5
    assert field_accuracy(None, {"qty": 3}) == 0.0


def _corruptions(reference: str) -> list[str]:
    """Ways a model gets an answer wrong: other label, truncation, a changed word, swapped words."""
    if reference in ("positive", "negative"):
        return ["negative" if reference == "positive" else "positive", "neutral", ""]
    words = reference.split(" ")
    swapped = words[1:2] + words[:1] + words[2:]
    changed = words[:-2] + ["Zanzibar" + words[-2]] + words[-1:]
    return [reference[: len(reference) // 2], " ".join(swapped), " ".join(changed), ""]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_scorer_is_one_on_reference_and_lower_on_corruptions(name: str) -> None:
    task = get_task(name)
    for record in load_examples(name, "eval")[:10]:
        reference = record["completion"]
        perfect = task.score(reference, reference)
        assert task.primary_metric in perfect
        assert all(v == 1.0 for v in perfect.values()), perfect
        assert task.score(f"  {reference}\n", reference) == perfect  # surrounding whitespace is not an error
        for wrong in _corruptions(reference):
            scores = task.score(wrong, reference)
            assert scores[task.primary_metric] < 1.0, (wrong, scores)
            assert all(0.0 <= v <= 1.0 for v in scores.values()), scores


def test_sentiment_accepts_capitalised_and_punctuated_labels() -> None:
    task = get_task("sentiment")
    assert task.score("Positive.", "positive")["accuracy"] == 1.0
    prose = task.score("The review is positive, not negative.", "positive")
    assert prose == {"accuracy": 0.0, "label_mentioned": 1.0}
    assert task.score("Negative", "positive") == {"accuracy": 0.0, "label_mentioned": 0.0}


def test_evaluate_task_scores_what_the_injected_generator_returns() -> None:
    records = load_examples("rewrite", "eval")[:6]
    answers = {r["prompt"]: r["completion"] for r in records}
    calls = []

    def echo_reference(prompts: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
        calls.append(max_tokens)
        return [answers[m[0]["content"]] if i % 2 == 0 else "" for i, m in enumerate(prompts)]

    result = evaluate_task("rewrite", echo_reference, limit=6, token_counter=lambda s: len(s.split()))
    assert calls == [get_task("rewrite").max_new_tokens]
    assert result["n"] == 6 and result["metrics"]["exact_match"] == pytest.approx(0.5)
    assert [s["exact_match"] for s in result["per_example"]] == [1.0, 0.0] * 3
    assert result["mean_output_tokens"] == pytest.approx(
        statistics.fmean(len(r["completion"].split()) if i % 2 == 0 else 0 for i, r in enumerate(records))
    )


# --------------------------------------------------------------------------- committed adapters


@pytest.mark.parametrize("name", TASK_NAMES)
def test_committed_adapter_config_matches_recipe(name: str) -> None:
    from peft import LoraConfig, PeftConfig

    config = PeftConfig.from_pretrained(str(demo_adapter_dir(name)))
    assert isinstance(config, LoraConfig)
    recipe = DEMO_RECIPES[name]
    assert config.r == recipe.r and config.lora_alpha == recipe.alpha
    assert set(config.target_modules) == set(recipe.target_modules)
    assert config.use_rslora == recipe.use_rslora and not config.use_dora
    assert config.task_type == "CAUSAL_LM" and config.modules_to_save is None


def test_committed_adapters_mix_ranks_targets_and_scaling() -> None:
    recipes = [DEMO_RECIPES[name] for name in TASK_NAMES]
    assert len({r.r for r in recipes}) >= 3
    assert len({frozenset(r.target_modules) for r in recipes}) >= 3
    assert any(r.use_rslora for r in recipes) and not all(r.use_rslora for r in recipes)
    assert any(set(r.target_modules) == set(LINEAR_MODULES) for r in recipes)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_committed_adapter_tensors_are_lora_pairs_of_smollm2_shape(name: str) -> None:
    recipe = DEMO_RECIPES[name]
    path = demo_adapter_dir(name) / "adapter_model.safetensors"
    seen: set[tuple[int, str, str]] = set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            match = LORA_KEY.match(key)
            assert match, f"unexpected tensor {key!r} in {path}"
            layer, module, ab = int(match[1]), match[2], match[3]
            d_out, d_in = SMOLLM2.module_shape(module)
            tensor = f.get_tensor(key)
            assert str(tensor.dtype) == "torch.float16", (key, tensor.dtype)
            expected = (recipe.r, d_in) if ab == "A" else (d_out, recipe.r)
            assert tuple(tensor.shape) == expected, (key, tuple(tensor.shape), expected)
            assert tensor.float().abs().sum() > 0, f"{key} is all zeros (adapter untrained?)"
            seen.add((layer, module, ab))
    expected_keys = {
        (layer, module, ab)
        for layer in range(SMOLLM2.num_layers)
        for module in recipe.target_modules
        for ab in "AB"
    }
    assert seen == expected_keys


# --------------------------------------------------------------------------- committed results


def _eval_summary() -> dict:
    return json.loads((RESULTS_DIR / "adapter_eval.json").read_text())


@pytest.mark.parametrize("name", TASK_NAMES)
def test_committed_eval_shows_adapter_beats_base(name: str) -> None:
    entry = _eval_summary()["tasks"][name]
    metric = get_task(name).primary_metric
    assert entry["primary_metric"] == metric and entry["n"] == SPLIT_SIZES["eval"]
    for side in ("base", "adapter"):
        per_example = entry[side]["per_example"]
        assert len(per_example) == entry["n"]
        assert statistics.fmean(per_example) == pytest.approx(entry[side]["metrics"][metric])
    base, adapted = entry["base"]["metrics"][metric], entry["adapter"]["metrics"][metric]
    assert adapted >= base + 0.25, f"{name}: adapter {metric} {adapted:.3f} vs base {base:.3f}"
    recipe = DEMO_RECIPES[name]
    assert entry["adapter_config"]["r"] == recipe.r
    assert set(entry["adapter_config"]["target_modules"]) == set(recipe.target_modules)


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2_dir():
    from inlaid_ray.config import Settings
    from inlaid_ray.model.prepare import prepare_smollm2

    return prepare_smollm2(Settings.from_env().cache_dir)


@pytest.mark.slow
def test_training_labels_are_exactly_the_completion_and_end_of_turn(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    from inlaid_ray.demo.train import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for name in TASK_NAMES:
        record = load_examples(name, "train")[0]
        ids, labels = tokenize_example(tokenizer, record["messages"])
        assert len(ids) == len(labels)
        supervised = [t for t in labels if t != -100]
        assert tokenizer.decode(supervised) == record["completion"] + tokenizer.eos_token
        n_prompt = labels.index(supervised[0])
        assert tokenizer.decode(ids[:n_prompt]).endswith(record["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_saves_a_peft_fp16_adapter(smollm2_dir, tmp_path) -> None:
    from peft import PeftConfig

    from inlaid_ray.demo.train import LoraRecipe, train_adapter

    recipe = LoraRecipe(
        r=2, alpha=4, target_modules=("q_proj", "v_proj"), steps=6, batch_size=4, lr=3e-3, warmup_steps=1
    )
    log = train_adapter(smollm2_dir, "sentiment", tmp_path / "sentiment", recipe, seed=0)
    assert len(log["losses"]) == 6 and log["train_tokens"] > 0
    assert statistics.fmean(log["losses"][-2:]) < log["losses"][0], log["losses"]
    config = PeftConfig.from_pretrained(str(tmp_path / "sentiment"))
    assert config.r == 2 and set(config.target_modules) == {"q_proj", "v_proj"}
    assert sorted(p.name for p in (tmp_path / "sentiment").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]
    with safe_open(str(tmp_path / "sentiment" / "adapter_model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == SMOLLM2.num_layers * 2 * 2
        assert all(str(f.get_tensor(k).dtype) == "torch.float16" for k in f.keys())


@pytest.mark.slow
def test_adapter_score_reproduces_with_transformers_peft(smollm2_dir) -> None:
    import torch

    from inlaid_ray.demo.evaluate import hf_generate_fn

    torch.manual_seed(0)
    name, limit = "extract", 8
    result = evaluate_task(name, hf_generate_fn(smollm2_dir, demo_adapter_dir(name), batch_size=limit), limit=limit)
    stored = _eval_summary()["tasks"][name]["adapter"]["per_example"][:limit]
    # Greedy decoding in fp32; a different batch composition may flip at most one near-tie.
    assert result["metrics"][get_task(name).primary_metric] == pytest.approx(
        statistics.fmean(stored), abs=1 / limit + 1e-9
    )


def test_committed_demo_manifest_is_what_the_demo_builds():
    """inlaid_ray/demo/manifest.json is generated (`python -m inlaid_ray.demo.manifest`), not edited."""
    import json

    from inlaid_ray.demo.manifest import DEMO_MANIFEST, build_demo_manifest

    assert json.loads(DEMO_MANIFEST.read_text()) == build_demo_manifest(DEMO_MANIFEST.parent)


def test_demo_manifest_loads_with_every_task_ready():
    from inlaid_ray.demo.manifest import DEMO_CLUSTERS, DEMO_MANIFEST
    from inlaid_ray.serve.seed import SeedManifest, adapter_ready

    manifest = SeedManifest.load(DEMO_MANIFEST)
    assert manifest.clusters == DEMO_CLUSTERS
    assert all(adapter_ready(t.adapter_dir) and t.calibration.is_file() for t in manifest.tasks.values())
