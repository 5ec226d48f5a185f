"""OpenAI-compatible request/response models (pydantic, the HTTP edge) for
/v1/completions and /v1/chat/completions. `model` is the task name (or the base model id)."""

from __future__ import annotations

import math
import time
import uuid

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from inlaid_ray.engine.request import MAX_LOGPROBS, StructuredOutput
from inlaid_ray.model.tokenizer import ChatRole
from inlaid_ray.serve.tool_calls import call_grammar


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# OpenAI / vLLM request fields this server does not implement, with the values that mean "off".
# Sent with any other value they are refused with a 400 naming them, never ignored; a field that
# is neither here nor a declared field is refused too (extra="forbid").
UNSUPPORTED_FIELDS: dict[str, tuple[object, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "suffix": (None, ""),
    "guided_grammar": (None,),
}
MAX_CHOICES = 16  # most choices (n, best_of) per request; each is one engine request
# Informational fields that change nothing in a completion: accepted as they are.
INFORMATIONAL_FIELDS = ("metadata", "store", "service_tier")


def unsupported_field(body: dict) -> str | None:
    """The first UNSUPPORTED_FIELDS entry `body` sets to something other than "off", if any."""
    for name, off in UNSUPPORTED_FIELDS.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in off):
            return name
    return None


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema` (OpenAI): the schema the output must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} = any JSON value
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema' and only then")
        return self


# Fields that constrain the output to a grammar (OpenAI's, then vLLM's extensions): at most one.
STRUCTURED_OUTPUT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints; ranges follow the OpenAI API (top_k as in vLLM)."""

    # A parameter is honoured or refused by name: unknown fields are an error, not ignored.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="task name, or the base model id for no adapter")
    max_tokens: int | None = Field(default=None, description="tokens to generate (default 16 / chat: rest of context)")
    temperature: float = Field(default=1.0, description="0 = greedy; OpenAI range [0, 2]")
    top_p: float = Field(default=1.0, description="nucleus sampling mass, (0, 1]")
    top_k: int = Field(default=-1, description="-1 = off (vLLM extension)")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices to generate (each an engine request)")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI presence penalty")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI frequency penalty")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="vLLM extension: HF-style repetition penalty")
    logit_bias: dict[str, float] | None = Field(default=None, description="token id -> bias in [-100, 100]")
    min_tokens: int = Field(default=0, ge=0, description="vLLM extension: no EOS / stop_token_ids before this many tokens")
    stop_token_ids: list[int] | None = Field(default=None, description="vLLM extension: token ids that end generation")
    user: str | None = None
    metadata: dict[str, str] | None = None  # INFORMATIONAL_FIELDS
    store: bool | None = None
    service_tier: str | None = None
    return_token_ids: bool = Field(default=False, description="vLLM extension: add prompt_token_ids and token_ids")
    response_format: ResponseFormat | None = Field(default=None, description="text, json_object or json_schema")
    guided_json: dict[str, Any] | str | None = Field(default=None, description="vLLM extension: a JSON schema")
    guided_regex: str | None = Field(default=None, min_length=1, description="vLLM extension: a regular expression")
    guided_choice: list[str] | None = Field(default=None, min_length=1, description="vLLM extension: one of these")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not math.isfinite(v) or not 0.0 <= v <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not math.isfinite(v) or not 0.0 < v <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {v}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be >= 1, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings, got {stops!r}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {v}")
        return v

    def output_form_fields(self) -> list[str]:
        """The fields set that decide the output's form (a grammar, or tools); serve/prompts.py
        refuses more than one, naming the second."""
        return [f for f in STRUCTURED_OUTPUT_FIELDS if self._structured_output_of(f) is not None]

    def _structured_output_of(self, field: str) -> StructuredOutput | None:
        value = getattr(self, field)
        if value is None:
            return None
        if field == "response_format":
            if value.type == "text":
                return None
            if value.type == "json_object":
                return StructuredOutput("json_object")
            return StructuredOutput("json_schema", json.dumps(value.json_schema.json_schema))
        if field == "guided_json":
            return StructuredOutput("json_schema", value if isinstance(value, str) else json.dumps(value))
        if field == "guided_regex":
            return StructuredOutput("regex", value)
        return StructuredOutput("choice", json.dumps(value))

    @property
    def structured_output(self) -> tuple[str, StructuredOutput] | None:
        """The field that constrains the output and its grammar spec; None for free text."""
        for f in STRUCTURED_OUTPUT_FIELDS:
            spec = self._structured_output_of(f)
            if spec is not None:
                return f, spec
        return None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(t), float(b)) for t, b in (self.logit_bias or {}).items()))



class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(description="text, or token ids")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probabilities of the sampled tokens and this many alternatives")
    echo: bool = Field(default=False, description="return the prompt before the completion")
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES,
                                description="candidates generated; the n with the highest log-probability are returned")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < info.data.get("n", 1):
            raise ValueError(f"best_of={v} must be >= n={info.data.get('n', 1)}")
        if v is not None and v > 1 and info.data.get("stream"):
            raise ValueError("best_of > 1 cannot be streamed (the best candidates are known only at the end)")
        return v

    @property
    def num_candidates(self) -> int:
        """Engine requests per API request: best_of when set, else n."""
        return self.best_of or self.n

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("logprobs") is not None:
            raise ValueError("echo with logprobs needs the prompt's log-probabilities, which this server does not "
                             "compute; send echo or logprobs, not both")
        return v

    @property
    def engine_logprobs(self) -> int | None:
        """Alternatives per token the engine reports (None: no log-probabilities)."""
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]  # ["text"] is a batch of one
        if isinstance(v, list) and v and isinstance(v[0], str):
            raise ValueError("batched prompts are not supported; send one prompt per request")
        if (isinstance(v, str) and not v) or (isinstance(v, list) and not v):
            raise ValueError("prompt must not be empty")
        return v


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an earlier assistant turn made (sent back in `messages`)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: ChatRole | Literal["tool"]
    content: str | None = None  # None only for an assistant turn that made tool calls
    name: str | None = None  # OpenAI's participant name: informational, the chat template has no slot for it
    tool_calls: list[ToolCall] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns only: the call this result answers

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, got role {self.role!r}")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages need a tool_call_id, and only they carry one")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def template_input(self) -> dict[str, Any]:
        """What the chat template reads of this message."""
        return self.model_dump(include={"role", "content", "tool_calls", "tool_call_id"}, exclude_none=True) | (
            {"content": self.content} if self.content is None else {})

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        """OpenAI also sends content as a list of parts; only text parts are supported."""
        if isinstance(v, list):
            kinds = sorted({p.get("type") if isinstance(p, dict) else type(p).__name__ for p in v} - {"text"})
            if kinds:
                raise ValueError(f"only text content parts are supported, got {kinds}")
            return "".join(str(p.get("text", "")) for p in v)
        return v


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    # true: the arguments must follow `parameters`, which only a grammar guarantees (tool_choice
    # required or named); with auto it is refused (serve/prompts.py)
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type", "object") != "object":  # arguments are a JSON object (OpenAI's rule)
            raise ValueError(f"function parameters must be an object schema, got type {v.get('type')!r}")
        return v


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = Field(default=None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description='"auto" when tools are given (OpenAI\'s default); "required" or a named '
                                  "function hold the output to a call with a grammar")
    parallel_tool_calls: bool = Field(default=True, description="with tool_choice required: one or more calls")
    max_completion_tokens: int | None = None
    logprobs: bool = Field(default=False, description="log-probabilities of the sampled tokens")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                     description="alternatives per token (needs logprobs=true)")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    @property
    def engine_logprobs(self) -> int | None:
        """Alternatives per token the engine reports (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def num_candidates(self) -> int:
        return self.n

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, v: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [t.function.name for t in v or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"function names must be unique, got {names}")
        return v

    def tool_choice_error(self) -> str | None:
        """Why tool_choice does not fit the tools, or None."""
        names = [t.function.name for t in self.tools or ()]
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            return "tool_choice other than none/auto needs tools"
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return f"tool_choice names {choice.function.name!r}, which is not among the tools {names}"
        return None

    @property
    def named_tool_choice(self) -> bool:
        return isinstance(self.tool_choice, NamedToolChoice)

    def output_form_fields(self) -> list[str]:
        return (["tools"] if self.calls_tools else []) + super().output_form_fields()

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls (tools given and tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_functions(self) -> list[dict[str, Any]]:
        """The functions a grammar must hold the output to: the named one, or all for "required"."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return []
        functions = [t.function.model_dump(include={"name", "parameters"}) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in functions if f["name"] == self.tool_choice.function.name]
        return functions

    @property
    def structured_output(self) -> tuple[str, StructuredOutput] | None:
        if self.forced_functions:
            parallel = self.parallel_tool_calls and not self.named_tool_choice
            return "tool_choice", call_grammar(self.forced_functions, parallel)
        return super().structured_output

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> "ChatCompletionRequest":
        # OpenAI's current name wins over the deprecated max_tokens when both are sent.
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise ValueError(f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}")
            self.max_tokens = self.max_completion_tokens
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def completion_body(request_id: str, model: str, text: str, finish_reason: str | None, usage: Usage | None) -> dict:
    """A /v1/completions response (or stream chunk when `usage` is None and text is a delta)."""
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_body(request_id: str, model: str, text: str, finish_reason: str | None, usage: Usage | None) -> dict:
    """A non-streaming /v1/chat/completions response."""
    body = {
        "id": request_id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    """One chat.completion.chunk of a stream."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(request_id: str, model: str, obj: str, usage: Usage) -> dict:
    """The final stream chunk carrying usage (stream_options.include_usage): empty choices."""
    return {"id": request_id, "object": obj, "created": now(), "model": model, "choices": [], "usage": usage.model_dump()}


def error_body(message: str, err_type: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error JSON."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
