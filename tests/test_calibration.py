"""Calibration JSONL: the three record shapes against the tokenizer's own rendering, equal token
budgets, truncation, seeded sampling that does not depend on the other tasks, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid_ray.errors import InvalidRequest
from inlaid_ray.quant.calibration import (
    CalibrationConfig,
    build_calibration_sets,
    load_calibration_file,
    read_calibration_records,
    render_record,
    sample_calibration,
)
from test_mlgptq_setup import WORDS, write_calibration, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_record_shapes_render_like_the_tokenizer(tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "good review 5"}, {"role": "assistant", "content": "bad item"}]
    path = _write_lines(tmp_path / "c.jsonl", [
        json.dumps({"messages": msgs, "prompt": "ignored", "extra": 1}),  # messages win over prompt
        json.dumps({"messages": msgs[:1]}),
        json.dumps({"prompt": "the price is ", "completion": "late"}),
        "",
        json.dumps({"text": "happy city 12"}),
    ])
    seqs = load_calibration_file(path, tokenizer)

    def chat(m, gen):
        ids = tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=gen)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    assert seqs == [
        chat(msgs, False),
        chat(msgs[:1], True),  # the last turn is the user's: the assistant header follows
        tokenizer.encode("the price is late", add_special_tokens=False),
        tokenizer.encode("happy city 12", add_special_tokens=False),
    ]
    assert [n for n, _ in read_calibration_records(path)] == [1, 2, 3, 5]  # blank line skipped, numbering kept


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], "is empty"),
        (["", "   "], "is empty"),
        (['{"text": "a"}', "{not json"], r"c\.jsonl:2: not valid JSON"),
        (['["a list"]'], r"c\.jsonl:1: expected a JSON object, got list"),
        (['{"text": "ok"}', '{"input": "x"}'], r"c\.jsonl:2: unknown record shape with keys \['input'\]"),
        (['{"prompt": "only a prompt"}'], r"c\.jsonl:1: 'prompt' and 'completion' must both be strings"),
        (['{"messages": [{"role": "user"}]}'], r"c\.jsonl:1: 'messages' must be a non-empty list"),
        (['{"text": ""}'], r"c\.jsonl:1: 'text' must be a non-empty string"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, lines, match):
    path = _write_lines(tmp_path / "c.jsonl", lines) if lines else tmp_path / "c.jsonl"
    if not lines:
        path.write_text("")
    with pytest.raises(InvalidRequest, match=match):
        read_calibration_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidRequest, match=r"calibration file .*nope\.jsonl does not exist"):
        read_calibration_records(tmp_path / "nope.jsonl")


def test_record_without_tokens_is_an_error(tokenizer):
    with pytest.raises(InvalidRequest, match="f.jsonl:7: the record renders to no tokens"):
        render_record({"text": "   "}, tokenizer, "f.jsonl:7")


def test_equal_budgets_exact_token_counts_and_truncation(tokenizer, tmp_path):
    files = {
        "short": write_calibration(tmp_path / "a.jsonl", WORDS[:8], 5, seed=0, shape="text"),
        "long": write_calibration(tmp_path / "b.jsonl", WORDS, 30, seed=1),
    }
    cfg = CalibrationConfig(max_seq_len=12)
    sets = build_calibration_sets(files, tokenizer, cfg)
    short_total = sum(min(len(s), 12) for s in load_calibration_file(files["short"], tokenizer))
    assert sets["short"].num_tokens == sets["long"].num_tokens == short_total  # budget = smallest task
    for s in sets.values():
        assert max(len(q) for q in s.sequences) <= 12
    # an explicit budget is met exactly by cutting the last sequence
    sets = build_calibration_sets(files, tokenizer, CalibrationConfig(tokens_per_task=25, max_seq_len=12))
    assert sets["long"].num_tokens == 25 and sets["short"].num_tokens == 25


def test_sampling_is_seeded_and_independent_of_other_tasks(tokenizer, tmp_path):
    a = write_calibration(tmp_path / "a.jsonl", WORDS, 20, seed=0)
    b = write_calibration(tmp_path / "b.jsonl", WORDS, 20, seed=1)
    cfg = CalibrationConfig(tokens_per_task=60)
    alone = build_calibration_sets({"a": a}, tokenizer, cfg)["a"]
    together = build_calibration_sets({"b": b, "a": a}, tokenizer, cfg)["a"]
    assert alone == together and alone.digest == together.digest
    other_seed = build_calibration_sets({"a": a}, tokenizer, CalibrationConfig(tokens_per_task=60, seed=1))["a"]
    assert other_seed.sequences != alone.sequences and other_seed.num_tokens == 60
    # every chosen sequence is a prefix of a file record
    records = load_calibration_file(a, tokenizer)
    assert all(any(tuple(r[: len(s)]) == s for r in records) for s in alone.sequences)
    # the same data under another task name is the same sample (a copied task has the same statistics),
    # and the sample is a proper subset of the file: the shuffle did choose
    renamed = build_calibration_sets({"a-copy": a}, tokenizer, cfg)["a-copy"]
    assert renamed.sequences == alone.sequences and renamed.digest == alone.digest
    assert alone.num_tokens < sum(len(r) for r in records)


def test_max_sequences_and_invalid_config(tokenizer):
    s = sample_calibration("t", [[1, 2, 3]] * 10, None, CalibrationConfig(max_sequences=4))
    assert s.num_sequences == 4 and s.num_tokens == 12
    with pytest.raises(ValueError, match="tokens_per_task=0"):
        CalibrationConfig(tokens_per_task=0)
    with pytest.raises(InvalidRequest, match="non-empty token sequences"):
        sample_calibration("t", [[1], []], None, CalibrationConfig())


@pytest.mark.slow
def test_demo_calibration_files_render_with_smollm2_template(smollm2_dir):
    """The demo calib split (chat records) renders to the prompt + completion token counts it records."""
    from inlaid_ray.demo.paths import demo_data_path
    from inlaid_ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    path = demo_data_path("extract", "calib")
    seqs = load_calibration_file(path, tok)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(seqs) == len(records)
    for seq, rec in zip(seqs, records):
        # chat template: prompt (incl. assistant header) + completion + <|im_end|> + trailing newline
        assert len(seq) == rec["prompt_tokens"] + rec["completion_tokens"] + 2


@pytest.mark.slow
def test_scored_answer_span_is_the_training_labels(smollm2_dir):
    """Held-out scoring of a chat record covers exactly the tokens the demo trains on (its labels:
    the reply and <|im_end|>, not the template's newline after it), on SmolLM2's real template."""
    from inlaid_ray.demo.paths import demo_data_path
    from inlaid_ray.demo.train import tokenize_example
    from inlaid_ray.model.tokenizer import load_tokenizer
    from inlaid_ray.quant.calibration import load_scored_file

    tok = load_tokenizer(smollm2_dir)
    path = demo_data_path("sentiment", "eval")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for (ids, start, end), rec in zip(load_scored_file(path, tok), records):
        want_ids, labels = tokenize_example(tok, rec["messages"])
        assert ids[:end] == want_ids and end < len(ids)  # the trailing newline is left out
        assert [i for i, lab in enumerate(labels) if lab >= 0] == list(range(start, end))


def test_packed_windows_keep_the_tokens_and_cut_sequence_starts(tokenizer, tmp_path):
    """pack_tokens=N: the same sampled tokens in the same order, in windows of N (last shorter)."""
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i} " + "word " * (i % 7 + 3)}) for i in range(40)))
    plain = build_calibration_sets({"t": path}, tokenizer, CalibrationConfig(tokens_per_task=300))["t"]
    packed = build_calibration_sets({"t": path}, tokenizer, CalibrationConfig(tokens_per_task=300, pack_tokens=64))["t"]
    flat = [t for s in plain.sequences for t in s]
    assert [t for s in packed.sequences for t in s] == flat and packed.num_tokens == 300
    assert [len(s) for s in packed.sequences] == [64] * 4 + [300 - 256]
    assert plain.num_sequences > packed.num_sequences
    assert CalibrationConfig(pack_tokens=64).to_dict()["pack_tokens"] == 64
    assert "pack_tokens" not in CalibrationConfig().to_dict()  # stores written before the option still match
    with pytest.raises(ValueError, match="pack_tokens"):
        CalibrationConfig(pack_tokens=0)
