"""Logits processors and log-probabilities against independent references: transformers'
`generate` (repetition penalty, sequence bias, min_new_tokens, output logits) on the same tiny
Llama, and a float64 loop of OpenAI's presence/frequency formula over transformers' logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.errors import InvalidRequest
from inlaid_ray.model import load_model
from conftest import write_tiny_hf_model

CFG = EngineConfig(block_size=4, num_kv_blocks=128, max_model_len=64, max_num_batched_tokens=128, max_num_seqs=8)
PROMPTS = [[1, 5, 7, 9, 11], [4, 4, 4, 9], [150, 3, 99, 12, 8, 8, 40]]
N = 14


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    return load_model(tiny_llama_dir), hf


def _hf_generate(hf, prompt: list[int], **kwargs) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=N, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def _engine_tokens(model, params: list[SamplingParams]) -> list[list[int]]:
    outs = LLMEngine(model, None, CFG).generate(PROMPTS, params)  # one mixed batch
    return [list(o.token_ids) for o in outs]


def test_repetition_penalty_and_logit_bias_match_transformers(models):
    model, hf = models
    plain = _engine_tokens(model, [SamplingParams(max_tokens=N, ignore_eos=True)] * 3)
    favoured = plain[0][3]
    params = [SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(max_tokens=N, ignore_eos=True, logit_bias=((favoured, 3.0), (plain[1][0], -100.0))),
              SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=0.7, logit_bias=((favoured, 1.5),))]
    got = _engine_tokens(model, params)
    want = [
        _hf_generate(hf, PROMPTS[0], repetition_penalty=1.8),
        _hf_generate(hf, PROMPTS[1], sequence_bias={(favoured,): 3.0, (plain[1][0],): -100.0}),
        _hf_generate(hf, PROMPTS[2], repetition_penalty=0.7, sequence_bias={(favoured,): 1.5}),
    ]
    assert got == want
    assert all(g != p for g, p in zip(got, plain))  # each setting changed the output


def test_min_tokens_matches_transformers_min_new_tokens(tmp_path, models):
    model, hf = models
    first = _engine_tokens(model, [SamplingParams(max_tokens=N, ignore_eos=True)] * 3)
    stop = first[0][1]  # made the EOS: without min_tokens the first request ends at its 2nd token
    eos_dir = write_tiny_hf_model(tmp_path / "eos", eos_token_id=stop)
    eos_model = load_model(eos_dir)
    eos_hf = AutoModelForCausalLM.from_pretrained(str(eos_dir), dtype=torch.float32).eval()
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2]]
    outs = LLMEngine(eos_model, None, CFG).generate(
        prompts, [SamplingParams(max_tokens=N), SamplingParams(max_tokens=N, min_tokens=6),
                  SamplingParams(max_tokens=N, stop_token_ids=(first[2][0],)),
                  SamplingParams(max_tokens=N, min_tokens=3, stop_token_ids=(first[2][0],))])
    # Without min_tokens both end at once: at the EOS, and at the stop token id.
    assert [(len(o.token_ids), o.finish_reason) for o in outs[::2]] == [(2, "stop"), (1, "stop")]
    want1 = _hf_generate(eos_hf, PROMPTS[0], min_new_tokens=6, eos_token_id=stop)
    want3 = _hf_generate(eos_hf, PROMPTS[2], min_new_tokens=3, eos_token_id=[stop, first[2][0]])
    for out, want in ((outs[1], want1), (outs[3], want3)):
        assert len(out.token_ids) >= 6
        assert list(out.token_ids) == want[:len(out.token_ids)]  # transformers pads after EOS; we stop at it


def test_presence_and_frequency_penalties_match_a_float64_reference(models):
    model, hf = models
    settings = [(0.0, 1.5), (1.2, 0.0), (-0.5, 0.8)]  # (presence, frequency)
    params = [SamplingParams(max_tokens=N, ignore_eos=True, presence_penalty=p, frequency_penalty=f) for p, f in settings]
    got = _engine_tokens(model, params)
    for prompt, (presence, frequency), tokens in zip(PROMPTS, settings, got):
        seq, out = list(prompt), []
        for _ in range(N):
            with torch.no_grad():
                logits = hf(torch.tensor([seq])).logits[0, -1].double()
            for t in set(out):
                logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
            seq.append(out[-1])
        assert tokens == out


def test_logprobs_match_transformers_output_logits(models):
    model, hf = models
    params = [SamplingParams(max_tokens=N, ignore_eos=True, logprobs=5),
              SamplingParams(max_tokens=N, ignore_eos=True),
              SamplingParams(max_tokens=N, ignore_eos=True, logprobs=0, repetition_penalty=1.5)]
    outs = LLMEngine(model, None, CFG).generate(PROMPTS, params)
    assert outs[1].logprobs == ()
    for prompt, out, k in ((PROMPTS[0], outs[0], 5), (PROMPTS[2], outs[2], 0)):
        seq = prompt + list(out.token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, len(prompt) - 1:-1].double()  # raw, before the penalty
        logp = torch.log_softmax(logits, dim=-1)
        assert len(out.logprobs) == N
        for step, lp in enumerate(out.logprobs):
            assert lp.token_id == out.token_ids[step]
            assert lp.logprob == pytest.approx(float(logp[step, lp.token_id]), abs=1e-4)
            assert len(lp.top) == k
            want_vals, _ = logp[step].topk(k)
            assert [v for _, v in lp.top] == pytest.approx(want_vals.tolist(), abs=1e-4)
            assert all(float(logp[step, t]) == pytest.approx(v, abs=1e-4) for t, v in lp.top)


@pytest.mark.parametrize("params,match", [
    (SamplingParams(logit_bias=((160, 1.0),)), r"\[160\].*outside the vocabulary"),
    (SamplingParams(logit_bias=((3, 101.0),)), "logit_bias"),
    (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    (SamplingParams(presence_penalty=2.5), "presence_penalty"),
    (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(logprobs=21), "logprobs"),
    (SamplingParams(stop_token_ids=(500,)), r"\[500\]"),
])
def test_bad_processor_params_are_refused_by_name(models, params, match):
    with pytest.raises(InvalidRequest, match=match):
        LLMEngine(models[0], None, CFG).make_request([1, 2, 3], params)
