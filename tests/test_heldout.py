"""The rollout gate's held-out loss against transformers + PEFT: the same records, the same
adapter, the mean cross-entropy over each answer computed by an outside implementation (fp64),
the answer found from the chat template by transformers' tokenizer itself."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from inlaid_ray.lora.peft_io import load_peft_adapter
from inlaid_ray.model import ModelConfig, load_tokenizer
from inlaid_ray.quant.calibration import load_scored_file
from inlaid_ray.quant.heldout import heldout_loss
from inlaid_ray.quantized_base.loading import load_base
from test_mlgptq_setup import TASKS, make_peft_adapter, write_calibration, write_tiny_base


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    base = write_tiny_base(root / "base")
    rank, alpha, targets, words = TASKS["all"]
    adapter = make_peft_adapter(base, root / "adapter", rank, alpha, targets, seed=3)
    records = write_calibration(root / "eval.jsonl", list(words), 7, seed=11)  # chat records
    with records.open("a") as f:  # and one of each other shape
        f.write(json.dumps({"prompt": "the task is ", "completion": "good"}) + "\n")
        f.write(json.dumps({"text": "a review of the order"}) + "\n")
    return base, adapter, records


def reference_loss(base, adapter, records) -> tuple[float, int]:
    """Mean cross-entropy over the answers (assistant reply, completion; all but the first token of
    text) with transformers + PEFT, the answer located with the HF tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    total, count = 0.0, 0
    for line in records.read_text().splitlines():
        rec = json.loads(line)
        if "messages" in rec:  # the reply through its end-of-turn token, not the template's newline after it
            ids = list(tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"])
            prompt = tok.apply_chat_template(rec["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
            start = len(prompt)
            ids = ids[: ids.index(tok.eos_token_id, start) + 1]
        elif "prompt" in rec:
            ids = tok.encode(rec["prompt"] + rec["completion"], add_special_tokens=False)
            start = len(tok.encode(rec["prompt"], add_special_tokens=False))
        else:
            ids, start = tok.encode(rec["text"], add_special_tokens=False), 1
        if len(ids) <= start:  # nothing to score
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        total += float(F.cross_entropy(logits[start - 1 : -1], torch.tensor(ids[start:]), reduction="sum"))
        count += len(ids) - start
    return total / count, count


@pytest.mark.parametrize("with_adapter", [True, False])
def test_heldout_loss_matches_transformers_and_peft(setup, with_adapter):
    base, adapter_dir, records = setup
    model = load_base(base, torch.float32, "cpu")
    adapter = load_peft_adapter(adapter_dir, ModelConfig.from_dir(base), name="t") if with_adapter else None
    examples = load_scored_file(records, load_tokenizer(base))
    assert all(1 < start < end <= len(ids) for ids, start, end in examples[:-1]) and examples[-1][1] == 1
    # a small batch budget: several prefill batches; an example with nothing to score is skipped
    empty = (examples[0][0], len(examples[0][0]), len(examples[0][0]))
    loss, count = heldout_loss(model, [*examples, empty], adapter, batch_tokens=40)
    want, want_count = reference_loss(base, adapter_dir if with_adapter else None, records)
    assert count == want_count
    assert loss == pytest.approx(want, rel=1e-5)
    assert model.adapter_bank is None  # the scoring bank is detached again
    with pytest.raises(ValueError, match="a token to score"):
        heldout_loss(model, [([5], 1, 1)], None)


def test_adapter_changes_the_loss(setup):
    """The adapter is really applied: with and without it the losses differ."""
    base, adapter_dir, records = setup
    model = load_base(base, torch.float32, "cpu")
    adapter = load_peft_adapter(adapter_dir, ModelConfig.from_dir(base), name="t")
    examples = load_scored_file(records, load_tokenizer(base))
    assert abs(heldout_loss(model, examples, adapter)[0] - heldout_loss(model, examples, None)[0]) > 1e-3
