"""Text through the engine (tiny random Llama with SmolLM2's vocabulary and the real
tokenizer): streamed deltas add up to the decoded output, stop strings end the text right
before themselves without ever retracting streamed text, stop token ids end generation,
and seeded sampling does not depend on the batch it runs in."""

from __future__ import annotations

import pytest

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.model import encode_text, load_model

CFG = EngineConfig(block_size=8, num_kv_blocks=64, max_model_len=128, max_num_batched_tokens=128, max_num_seqs=8)


@pytest.fixture(scope="module")
def model(tiny_smol_vocab_dir):
    return load_model(tiny_smol_vocab_dir)


def _run(engine, requests):
    """Add (prompt, params) pairs, step to the end; per request: deltas, tokens, final output."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    deltas = {rid: [] for rid in ids}
    tokens = {rid: [] for rid in ids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id in deltas:
                deltas[out.request_id].append(out.text)
                tokens[out.request_id].extend(out.token_ids)
                if out.finished:
                    finals[out.request_id] = out
    return [(deltas[r], tokens[r], finals[r]) for r in ids]


def _sampled(seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def test_stop_strings_end_text_before_them_and_never_retract(model, tokenizer):
    prompt = encode_text(tokenizer, "Once upon a time")
    engine = LLMEngine(model, tokenizer, CFG)
    [(deltas, tokens, final)] = _run(engine, [(prompt, _sampled(1))])
    text = "".join(deltas)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True) and final.finish_reason == "length"
    mid = len(text) // 2
    stop = text[mid : mid + 3]
    assert stop.strip(), f"pick a visible stop string, got {stop!r} from {text!r}"
    expected = text[: text.find(stop)]

    [(deltas, stopped_tokens, final)] = _run(engine, [(prompt, _sampled(1, stop=(stop, "\x00never")))])
    assert "".join(deltas) == expected and final.finish_reason == "stop"
    assert stopped_tokens == tokens[: len(stopped_tokens)] and len(stopped_tokens) < len(tokens)
    for k in range(1, len(deltas) + 1):
        assert expected.startswith("".join(deltas[:k])), "streamed text was retracted"


def test_min_tokens_holds_back_stop_strings(model, tokenizer):
    """vLLM's rule: a stop string matches only from min_tokens output tokens on. A stop string
    that first appears before that point is streamed as text; its next occurrence after min_tokens
    ends the request (the reference is the unconstrained run's text)."""
    prompt = encode_text(tokenizer, "Once upon a time")
    engine = LLMEngine(model, tokenizer, CFG)
    [(deltas, tokens, _)] = _run(engine, [(prompt, _sampled(2))])
    text = "".join(deltas)
    prefix_len = [len(tokenizer.decode(tokens[:k], skip_special_tokens=True)) for k in range(len(tokens) + 1)]
    # a visible character that occurs early and again later in the text
    stop = next(c for c in text[: len(text) // 3] if c.strip() and text.count(c) >= 2)
    first = text.find(stop)
    # the first occurrence is streamed while stop strings do not apply yet: checks start at output
    # token min_tokens, on text after the first min_tokens - 1 tokens' text
    min_tokens = 1 + next(j for j in range(len(tokens) + 1) if prefix_len[j] >= first + len(stop))
    later = [i for i in range(len(text)) if text.startswith(stop, i) and i >= prefix_len[min_tokens - 1]]
    [(deltas, _, final)] = _run(engine, [(prompt, _sampled(2, stop=(stop,), min_tokens=min_tokens))])
    if later:
        assert "".join(deltas) == text[: later[0]] and final.finish_reason == "stop"
    else:
        assert "".join(deltas) == text and final.finish_reason == "length"
    assert "".join(deltas).find(stop) == first  # the early occurrence was streamed, not a stop
    [(deltas, _, final)] = _run(engine, [(prompt, _sampled(2, stop=(stop,)))])
    assert "".join(deltas) == text[:first] and final.finish_reason == "stop"  # without min_tokens: the first


def test_stop_token_ids_end_generation_without_their_text(model, tokenizer):
    prompt = encode_text(tokenizer, "The weather today")
    engine = LLMEngine(model, tokenizer, CFG)
    [(_, tokens, _)] = _run(engine, [(prompt, _sampled(2))])
    stop_tok = tokens[len(tokens) // 2]
    cut = tokens.index(stop_tok)
    [(deltas, got, final)] = _run(engine, [(prompt, _sampled(2, stop_token_ids=(stop_tok,)))])
    assert got == tokens[: cut + 1] and final.finish_reason == "stop"
    assert "".join(deltas) == tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def test_seeded_requests_do_not_depend_on_their_batch(model, tokenizer):
    prompts = [encode_text(tokenizer, t) for t in ("Hello there", "A list of fruits:", "def f(x):", "1, 2, 3,")]
    params = [_sampled(10 + i, top_p=0.9, top_k=50) for i in range(4)]
    alone = [_run(LLMEngine(model, tokenizer, CFG), [(p, sp)])[0] for p, sp in zip(prompts, params)]
    together = _run(LLMEngine(model, tokenizer, CFG), list(zip(prompts, params)))
    for (d_a, t_a, _), (d_b, t_b, _) in zip(alone, together):
        assert (t_a, "".join(d_a)) == (t_b, "".join(d_b))
    assert len({tuple(t) for _, t, _ in alone}) == 4
    again = _run(LLMEngine(model, tokenizer, CFG), [(prompts[0], params[0])])[0]
    assert again[1] == alone[0][1]  # same seed, same tokens
