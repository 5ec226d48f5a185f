"""The one rule for what a request may ask of a model, applied by the engine and by the router
(which answers with OpenAI's `context_length_exceeded` before a replica is involved).

max_model_len = prompt + output tokens of one sequence. A prompt must leave room for one output
token and its ids must lie in the vocabulary (both sides). An explicit max_tokens that does not
fit after the prompt is refused by the API (`check_fits`, as OpenAI and vLLM's server do); the
engine itself ends such a sequence at max_model_len with finish reason "length", as vLLM's does."""

from __future__ import annotations

from collections.abc import Sequence

from inlaid_ray.errors import InvalidRequest


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or the prompt plus max_tokens, does not fit in max_model_len; `param` says which."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def resolve_max_model_len(requested: int | None, max_position_embeddings: int, max_num_batched_tokens: int) -> int:
    """`requested`, checked against the model; None: min(model limit, tokens per step), since a
    prompt is prefilled in one step."""
    if requested is None:
        return min(max_position_embeddings, max_num_batched_tokens)
    if requested > max_position_embeddings:
        raise ValueError(f"max_model_len={requested} exceeds the model's max_position_embeddings={max_position_embeddings}")
    if requested > max_num_batched_tokens:
        raise ValueError(f"max_model_len={requested} > max_num_batched_tokens={max_num_batched_tokens}: "
                         "prompts are prefilled in one chunk, so a step must fit the longest sequence")
    return requested


def check_prompt(prompt_token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> None:
    """InvalidRequest for ids outside the vocabulary; ContextLengthExceeded for a prompt that leaves
    no room for one output token."""
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    n = len(prompt_token_ids)
    if n > max_model_len - 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has {n} tokens, "
            "which leaves no room for a completion.", "prompt")


def check_fits(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """ContextLengthExceeded when prompt + max_tokens exceeds max_model_len."""
    if prompt_len + max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
            "max_tokens")
