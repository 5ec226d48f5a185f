"""Structured output (engine/grammar.py, engine/structured_output.py) against independent
references: every constrained completion of a random model with SmolLM2's vocabulary is checked
with `jsonschema`, `json` and Python's `re`; the per-step mask is checked token by token against
llguidance's own token validation; unconstrained rows of a mixed batch are checked against the
same requests run alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.engine.grammar import grammar_of
from inlaid_ray.engine.request import StructuredOutput
from inlaid_ray.engine.structured_output import unpack_bitmask
from inlaid_ray.errors import InvalidRequest
from inlaid_ray.model import load_model

CFG = EngineConfig(block_size=4, num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", 'say "maybe"']


@pytest.fixture(scope="module")
def engine(tiny_smol_vocab_dir, tokenizer):
    return LLMEngine(load_model(tiny_smol_vocab_dir), tokenizer, CFG)


def _so(kind: str, spec: object = "") -> StructuredOutput:
    return StructuredOutput(kind, spec if isinstance(spec, str) else json.dumps(spec))


def test_unpack_bitmask_matches_a_bit_loop():
    words = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32)
    vocab = 150  # not a multiple of 32: the last word is cut
    want = torch.tensor([[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)])
    assert torch.equal(unpack_bitmask(words, vocab), want)


def test_constrained_rows_follow_their_grammar_in_one_mixed_batch(engine, tokenizer):
    prompt = tokenizer.encode("Tell me about yourself.", add_special_tokens=False)
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, structured_output=_so("json_schema", SCHEMA))
              for s in range(3)]
    params += [
        SamplingParams(max_tokens=20, temperature=1.0, seed=7, structured_output=_so("regex", REGEX)),
        SamplingParams(max_tokens=20, structured_output=_so("choice", CHOICES)),
        SamplingParams(max_tokens=20, temperature=1.0, seed=3, structured_output=_so("choice", CHOICES)),
        SamplingParams(max_tokens=12),  # free text beside them
        SamplingParams(max_tokens=12, temperature=1.0, seed=11),
    ]
    outs = engine.generate([prompt] * len(params), params)
    for out in outs[:3]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert outs[3].finish_reason == "stop" and re.fullmatch(REGEX, outs[3].text), outs[3].text
    assert outs[4].text in CHOICES and outs[5].text in CHOICES
    alone = engine.generate([prompt] * 2, params[6:])
    assert [o.token_ids for o in outs[6:]] == [o.token_ids for o in alone]  # the mask touched no other row


def test_json_object_is_an_object_or_cut_by_max_tokens(engine, tokenizer):
    prompt = tokenizer.encode("JSON please:", add_special_tokens=False)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_output=_so("json_object"))
              for s in range(4)]
    outs = engine.generate([prompt] * 4, params)
    assert outs[0].text.startswith("{")
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict), out.text
        else:  # a random model may write a long object: cut, like any completion at max_tokens
            assert out.finish_reason == "length" and out.num_completion_tokens == 120


def test_the_mask_allows_exactly_the_tokens_the_grammar_accepts(engine, tokenizer):
    """Step by step along a valid JSON text: every token the step's mask allows (and a sample of
    those it forbids) is checked with llguidance's token validation on the matcher's state."""
    manager = engine.structured_output
    req = engine.make_request([1, 2, 3], SamplingParams(max_tokens=50, structured_output=_so("json_schema", SCHEMA)))
    text = json.dumps({"name": "Ann", "age": 31, "ok": True, "tags": ["red"]}, separators=(",", ":"))
    gen = torch.Generator().manual_seed(0)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for k, token in enumerate(tokens):
        logits = torch.zeros(1, engine.model_config.vocab_size)
        allowed = manager.mask(logits, [req])[0].isfinite()
        assert allowed[token], tokenizer.decode([token])
        ids = allowed.nonzero().flatten()
        forbidden = (~allowed).nonzero().flatten()
        forbidden = forbidden[torch.randperm(len(forbidden), generator=gen)[:200]]
        assert all(req.grammar.validate_tokens([int(t)]) == 1 for t in ids[:300])
        assert all(req.grammar.validate_tokens([int(t)]) == 0 for t in forbidden)
        assert manager.advance(req, token) == (k == len(tokens) - 1)  # complete at the last token only


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput("json_schema", "{not json"), "valid JSON"),
    (StructuredOutput("json_schema", json.dumps({"type": "nonsense"})), "invalid json schema"),
    (StructuredOutput("json_schema", "[1]"), "must be an object"),
    (StructuredOutput("regex", "a(b"), "invalid regex"),
    (StructuredOutput("json_schema", json.dumps({"const": "\ud800"})), "invalid json schema"),  # lone surrogate
    (StructuredOutput("choice", "[]"), "non-empty list"),
    (StructuredOutput("choice", json.dumps(["a", ""])), "non-empty strings"),
])
def test_bad_grammars_are_refused_by_name(spec, message):
    with pytest.raises(InvalidRequest, match=message):
        grammar_of(spec)


def test_a_failed_matcher_aborts_its_request_alone(engine, tokenizer):
    """A matcher in error (here: fed a token its grammar forbids) allows only EOS and would accept
    it; the engine must abort that request, not end it as a normal stop, and serve the others."""
    prompt = tokenizer.encode("Pick one.", add_special_tokens=False)
    broken = engine.make_request(prompt, SamplingParams(max_tokens=8, structured_output=_so("choice", CHOICES)))
    assert not broken.grammar.consume_token(tokenizer.encode("zebra", add_special_tokens=False)[0])
    engine.add(broken)
    other = engine.add_request(prompt, SamplingParams(max_tokens=8, structured_output=_so("choice", CHOICES)))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[broken.request_id].finish_reason == "abort" and finals[broken.request_id].token_ids == ()
    assert finals[other].finish_reason == "stop"


def test_settings_a_grammar_would_override_are_refused(engine):
    spec = _so("choice", CHOICES)
    for extra, name in ((dict(ignore_eos=True), "ignore_eos"), (dict(min_tokens=2), "min_tokens")):
        with pytest.raises(InvalidRequest, match=name):
            engine.make_request([1, 2], SamplingParams(max_tokens=8, structured_output=spec, **extra))


def test_an_engine_without_tokenizer_refuses_structured_output(engine):
    bare = LLMEngine(engine.model, None, CFG)
    with pytest.raises(InvalidRequest, match="tokenizer"):
        bare.make_request([1, 2], SamplingParams(max_tokens=8, structured_output=_so("json_object")))
