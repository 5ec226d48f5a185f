"""Incremental detokenization with the real SmolLM2 tokenizer: streamed deltas add up to
decoding the whole output at once, nothing streamed is ever retracted, and stop strings
cut the text right before themselves."""

from __future__ import annotations

import random

import pytest

from inlaid_ray.engine import IncrementalDetokenizer
from inlaid_ray.model import encode_text


def _stream(tokenizer, ids, prompt=(), stop=(), final_at_end=True):
    """Feed ids one by one; returns (deltas, stopped, detokenizer). Checks nothing is retracted."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), stop)
    deltas, stopped = [], False
    for i, t in enumerate(ids):
        delta, stopped = detok.update([t], final=final_at_end and i == len(ids) - 1)
        deltas.append(delta)
        if stopped:
            break
    return deltas, stopped, detok


def _reference_stop(tokenizer, ids, stops):
    """Decode growing prefixes; the text ends before the earliest stop once one appears."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)], True
    return tokenizer.decode(ids, skip_special_tokens=True), False


def test_random_token_streams_equal_full_decode(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(200):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        deltas, stopped, detok = _stream(tokenizer, ids, prompt)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == full == detok.text and not stopped
        for k in range(1, len(deltas)):  # every streamed prefix is a prefix of the final text
            assert full.startswith("".join(deltas[:k]))


def test_multibyte_characters_are_held_until_complete(tokenizer):
    text = "Grüße — 日本語のテキスト 🎉🎉 fin"
    ids = encode_text(tokenizer, text)
    deltas, _, _ = _stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas), "some tokens are partial characters and must emit nothing"


@pytest.mark.parametrize(
    "text,stops",
    [
        ("The answer is 42. Done here.", ("Done",)),
        ("The answer is 42. Done here.", ("42.", "answer")),  # earliest of several wins
        ("alpha beta gamma delta", ("gamma d",)),  # spans several tokens
        ("Héllo wörld, 日本語 end", ("日本",)),  # multibyte stop string
        ("no stop string appears here", ("xyz", "here!")),  # partial match 'here' released
    ],
)
def test_stop_strings_cut_before_and_never_retract(tokenizer, text, stops):
    ids = encode_text(tokenizer, text)
    deltas, stopped, detok = _stream(tokenizer, ids, stop=stops)
    expected, should_stop = _reference_stop(tokenizer, ids, stops)
    streamed = "".join(deltas)
    assert (streamed, stopped) == (expected, should_stop)
    assert detok.text == expected
    for k in range(1, len(deltas) + 1):
        assert expected.startswith("".join(deltas[:k])), f"streamed {''.join(deltas[:k])!r} then retracted"
    if should_stop:
        assert all(s not in streamed for s in stops)


def test_text_that_may_start_a_stop_string_is_held_then_flushed(tokenizer):
    ids = encode_text(tokenizer, "one two thr")
    detok = IncrementalDetokenizer(tokenizer, [], ("three",))
    streamed = "".join(detok.update([t])[0] for t in ids)
    assert streamed == "one two " and detok.text == "one two thr"  # 'thr' may begin 'three'
    delta, stopped = detok.update([], final=True)  # the request ends for another reason
    assert (streamed + delta, stopped) == ("one two thr", False)


def test_a_prompt_ending_inside_a_character_adds_nothing_to_the_output(tokenizer):
    prompt = encode_text(tokenizer, "x 日")[:-1]  # its last character cut in the middle
    assert tokenizer.decode(prompt).endswith("\ufffd")
    ids = encode_text(tokenizer, " again and again")
    deltas, _, detok = _stream(tokenizer, ids, prompt)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_failing_decode_stream_leaves_the_request_decoding_whole(tokenizer):
    """Fault injection: DecodeStream raises mid-request (tokenizers raises on a prefix it cannot
    continue); the request's text still equals decoding the whole output at once."""
    text = "Grüße — 日本語 and more words 🎉 here"
    ids = encode_text(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, encode_text(tokenizer, "Say:"), ())
    real = detok._stream

    class FailingAfter:
        def __init__(self, n):
            self.n = n

        def step(self, backend, token):
            self.n -= 1
            if self.n < 0:
                raise Exception("Invalid prefix encountered while decoding stream")
            return real.step(backend, token)

    detok._stream = FailingAfter(5)
    deltas = [detok.update([t], final=i == len(ids) - 1)[0] for i, t in enumerate(ids)]
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok._stream is None
