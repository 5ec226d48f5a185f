"""OpenAI request -> prompt token ids + engine SamplingParams, with the context-length rules.

Limits are engine/limits.py's, shared with the engine: a prompt of more than max_model_len - 1
tokens is rejected (`context_length_exceeded`, param prompt/messages); an explicit max_tokens
that does not fit after the prompt is rejected the same way (param max_tokens). Without max_tokens, completions generate OpenAI's default 16 tokens (fewer if the
context is nearly full) and chat generates up to the end of the context.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inlaid_ray.engine import SamplingParams
from inlaid_ray.engine.request import StructuredOutput
from inlaid_ray.engine.grammar import grammar_of
from inlaid_ray.engine.limits import ContextLengthExceeded, check_fits, check_prompt
from inlaid_ray.errors import InvalidRequest
from inlaid_ray.model import encode_chat, encode_text
from inlaid_ray.serve.http_errors import OpenAIHTTPError
from inlaid_ray.serve.openai_protocol import ChatCompletionRequest, CompletionRequest
from inlaid_ray.serve.tool_calls import template_renders_tools

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
        text = ""  # decoded below, once the ids are known to be in the vocabulary
    _check(lambda: check_prompt(ids, vocab_size, max_model_len), "prompt")
    text = text or tokenizer.decode(ids)
    default = min(DEFAULT_COMPLETION_TOKENS, max(1, max_model_len - len(ids)))
    return PreparedPrompt(tuple(ids), text, sampling_params(req, len(ids), vocab_size, max_model_len, default, "prompt"))


def _check(rule: Callable[[], None], prompt_param: str) -> None:
    """Run a shared limit rule (engine/limits.py); its error as OpenAI's 400, naming the parameter."""
    try:
        rule()
    except ContextLengthExceeded as exc:
        param = prompt_param if exc.param == "prompt" else exc.param
        raise OpenAIHTTPError(400, str(exc), code="context_length_exceeded", param=param) from exc
    except InvalidRequest as exc:
        raise OpenAIHTTPError(400, str(exc), param=prompt_param) from exc


def prepare_chat(req: ChatCompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int) -> PreparedPrompt:
    """Apply the chat template and build the sampling params (default: rest of the context)."""
    _check_tools(req)
    tool_turns = any(m.role == "tool" or m.tool_calls for m in req.messages)
    if (req.tools or tool_turns) and not template_renders_tools(getattr(tokenizer, "chat_template", None)):
        raise OpenAIHTTPError(400, "this model's chat template does not render tools or tool calls; serve it with "
                                   "a chat template that does (AppArgs.chat_template, e.g. "
                                   "deploy/chat_templates/smollm2_tools.jinja)", param="tools" if req.tools else "messages")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        ids = encode_chat(tokenizer, [m.template_input() for m in req.messages], tools=tools)
    except ValueError as exc:
        raise OpenAIHTTPError(400, str(exc), param="messages") from exc
    users = [m.content for m in req.messages if m.role == "user"]
    text = users[-1] if users else (req.messages[-1].content or "")
    _check(lambda: check_prompt(ids, vocab_size, max_model_len), "messages")
    default = max(1, max_model_len - len(ids))
    return PreparedPrompt(tuple(ids), text, sampling_params(req, len(ids), vocab_size, max_model_len, default, "messages"))


def _check_tools(req: ChatCompletionRequest) -> None:
    """tool_choice fits the tools, `strict` only where a grammar holds the arguments, and every
    function's parameters compile as a JSON schema (the error names the function)."""
    error = req.tool_choice_error()
    if error is not None:
        raise OpenAIHTTPError(400, error, param="tool_choice")
    for tool in req.tools or ():
        f = tool.function
        if f.strict and req.calls_tools and not req.forced_functions:
            raise OpenAIHTTPError(400, f"function {f.name!r} is strict, which only tool_choice \"required\" or a named "
                                       "function can guarantee (a grammar holds the arguments there)", param="tools")
        try:
            grammar_of(StructuredOutput("json_schema", json.dumps(f.parameters)))
        except InvalidRequest as exc:
            raise OpenAIHTTPError(400, f"parameters of function {f.name!r}: {exc}", param="tools") from exc


def sampling_params(req: CompletionRequest | ChatCompletionRequest, prompt_len: int, vocab_size: int,
                    max_model_len: int, default_max_tokens: int, prompt_param: str) -> SamplingParams:
    """Engine params for `req`; 400 when the prompt or max_tokens do not fit in max_model_len."""
    max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
    _check(lambda: check_fits(prompt_len, max_tokens, max_model_len), prompt_param)
    for param, ids in (("logit_bias", [t for t, _ in req.logit_bias_pairs]), ("stop_token_ids", req.stop_token_ids or [])):
        outside = [t for t in ids if t >= vocab_size]
        if outside:
            raise OpenAIHTTPError(400, f"token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})",
                                  param=param)
    forms = req.output_form_fields()
    if len(forms) > 1:
        raise OpenAIHTTPError(400, f"{forms[1]} cannot be combined with {forms[0]}: each decides the form of the output",
                              param=forms[1])
    structured = req.structured_output
    if structured is not None:
        # A bad schema or pattern: 400 here, naming the field (a tool call grammar comes from `tools`).
        _check(lambda: grammar_of(structured[1]), "tools" if structured[0] == "tool_choice" else structured[0])
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=req.logit_bias_pairs,
        logprobs=req.engine_logprobs,
        structured_output=structured[1] if structured else None,
    )
    try:
        params.validate(max_model_len)
    except InvalidRequest as exc:
        param = next((f for f in ("min_tokens", "max_tokens", "ignore_eos") if str(exc).startswith(f)), None)
        raise OpenAIHTTPError(400, str(exc), param=param) from exc
    return params
