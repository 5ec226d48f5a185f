"""OpenAI request -> prompt token ids + engine SamplingParams, with the context-length rules.

Limits (max_model_len = prompt + output tokens of one sequence): a prompt of more than
max_model_len - 1 tokens is rejected (`context_length_exceeded`, param prompt/messages); an
explicit max_tokens that does not fit after the prompt is rejected the same way (param
max_tokens). Without max_tokens, completions generate OpenAI's default 16 tokens (fewer if the
context is nearly full) and chat generates up to the end of the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inlaid_ray.engine import SamplingParams
from inlaid_ray.errors import InvalidRequest
from inlaid_ray.model import encode_chat, encode_text
from inlaid_ray.serve.http_errors import OpenAIHTTPError
from inlaid_ray.serve.openai_protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class PreparedPrompt:
    prompt_token_ids: tuple[int, ...]
    prompt_text: str  # what the length predictor reads
    params: SamplingParams


def prepare_completion(req: CompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int) -> PreparedPrompt:
    """Tokenize a /v1/completions prompt (raw, no template) and build its sampling params."""
    if isinstance(req.prompt, str):
        ids, text = encode_text(tokenizer, req.prompt), req.prompt
        if not ids:
            raise OpenAIHTTPError(400, "the prompt encodes to zero tokens", param="prompt")
    else:
        ids = list(req.prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size][:5]
        if bad:
            raise OpenAIHTTPError(400, f"prompt token ids {bad} are outside the vocabulary [0, {vocab_size})", param="prompt")
        text = tokenizer.decode(ids)
    default = min(DEFAULT_COMPLETION_TOKENS, max(1, max_model_len - len(ids)))
    return PreparedPrompt(tuple(ids), text, sampling_params(req, len(ids), max_model_len, default, "prompt"))


def prepare_chat(req: ChatCompletionRequest, tokenizer: Any, max_model_len: int) -> PreparedPrompt:
    """Apply the chat template and build the sampling params (default: rest of the context)."""
    try:
        ids = encode_chat(tokenizer, [m.model_dump(include={"role", "content"}) for m in req.messages])
    except ValueError as exc:
        raise OpenAIHTTPError(400, str(exc), param="messages") from exc
    users = [m.content for m in req.messages if m.role == "user"]
    text = users[-1] if users else req.messages[-1].content
    default = max(1, max_model_len - len(ids))
    return PreparedPrompt(tuple(ids), text, sampling_params(req, len(ids), max_model_len, default, "messages"))


def sampling_params(req: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_model_len: int,
                    default_max_tokens: int, prompt_param: str) -> SamplingParams:
    """Engine params for `req`; 400 when the prompt or max_tokens do not fit in max_model_len."""
    if prompt_len > max_model_len - 1:
        raise OpenAIHTTPError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, your {prompt_param} has "
            f"{prompt_len} tokens, which leaves no room for a completion.",
            code="context_length_exceeded", param=prompt_param)
    max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
    if prompt_len + max_tokens > max_model_len:
        raise OpenAIHTTPError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, {max_tokens} for the completion).",
            code="context_length_exceeded", param="max_tokens")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=req.ignore_eos,
    )
    try:
        params.validate(max_model_len)
    except InvalidRequest as exc:
        raise OpenAIHTTPError(400, str(exc)) from exc
    return params
