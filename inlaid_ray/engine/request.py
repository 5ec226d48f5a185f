"""A generation request's parameters, life-cycle state and streamed outputs (vLLM's
`SamplingParams` / `Request` / `RequestOutput`, reduced to what this engine uses)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args


from inlaid_ray.errors import InvalidRequest

FinishReason = Literal["stop", "length", "abort"]
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)
StructuredOutputKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain a request's output to a grammar (compiled in engine/grammar.py)."""

    kind: StructuredOutputKind
    spec: str = ""  # json_schema: the schema as JSON text; regex: the pattern; choice: a JSON list of strings;
    # lark: a grammar in llguidance's Lark dialect (built by the server, e.g. for tool calls)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI semantics; temperature 0 = greedy)."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = -1  # keep the k most likely tokens; -1 = off
    seed: int | None = None  # per-request RNG seed; None = drawn from the engine's seed
    stop: tuple[str, ...] = ()  # stop strings, excluded from the returned text
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation like EOS
    ignore_eos: bool = False  # keep generating past the model's EOS tokens
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings do not end a request before this many output tokens
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated, [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output, [-2, 2]
    repetition_penalty: float = 1.0  # HF/vLLM: logits of prompt and output tokens / this (> 0) if positive, * if not
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to its logit
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's log-probability and the k most likely
    structured_output: StructuredOutput | None = None  # None: free text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logits processor (engine/logits_processors.py) applies."""
        return bool(self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias)

    def validate(self, max_model_len: int) -> None:
        """Raise InvalidRequest naming the offending value (limits are those of the model)."""
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):  # NaN fails too
            raise InvalidRequest(f"top_p must be in (0, 1], got {p!r}")
        k = self.top_k
        if not _is_int(k) or k == 0 or k < -1:
            raise InvalidRequest(f"top_k must be -1 (off) or >= 1, got {k!r}")
        n = self.max_tokens
        if not _is_int(n) or n < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {n!r}")
        if n > max_model_len - 1:
            raise InvalidRequest(
                f"max_tokens={n} exceeds what the model allows: max_model_len={max_model_len} "
                f"leaves at most {max_model_len - 1} tokens after a one-token prompt"
            )
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise InvalidRequest(f"seed must be a 64-bit integer or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            _is_int(i) and i >= 0 for i in self.stop_token_ids
        ):
            raise InvalidRequest(f"stop_token_ids must be a tuple of token ids >= 0, got {self.stop_token_ids!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be an integer in [0, max_tokens={n}], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:  # NaN fails too
                raise InvalidRequest(f"{name} must be in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or not (0.0 < r < math.inf):
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0, got {r!r}")
        if not isinstance(self.logit_bias, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0
            and isinstance(pair[1], (int, float)) and -100.0 <= pair[1] <= 100.0 for pair in self.logit_bias
        ):
            raise InvalidRequest(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {self.logit_bias!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        so = self.structured_output
        if so is not None:
            if not (isinstance(so, StructuredOutput) and so.kind in get_args(StructuredOutputKind)
                    and isinstance(so.spec, str)):
                raise InvalidRequest(f"structured_output must be a StructuredOutput, got {so!r}")
            # A complete grammar ends the request, so neither can be honoured beside one.
            if self.ignore_eos:
                raise InvalidRequest("ignore_eos cannot be combined with structured output (the grammar's end stops it)")
            if self.min_tokens:
                raise InvalidRequest("min_tokens cannot be combined with structured output (the grammar's end stops it)")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds KV blocks and ran in the last step
    PAUSED = "paused"  # holds KV blocks but the policy left it out of the last step
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation in flight; satisfies `inlaid_ray.sched.policy.SchedulableRequest`."""

    request_id: str
    task: str | None  # adapter (task) name; None = base model
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    wait_start: float  # last time it entered the waiting queue (arrival or preemption)
    predicted_output_len: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # first step that ran it (queue time = this - arrival_time)
    first_token_time: float | None = None
    finish_time: float | None = None
    sample_seed: int | None = None  # seed of its sampling uniforms (engine/sampling.py); None for greedy
    detokenizer: Any = field(default=None, repr=False)  # IncrementalDetokenizer or None
    grammar: Any = field(default=None, repr=False)  # llguidance matcher of a structured-output request, or None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_id(self, position: int) -> int:
        """Token at `position` of prompt + output."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before penalties, bias and
    temperature, as vLLM reports by default) and the `SamplingParams.logprobs` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a delta while streaming.

    `text` and `token_ids` are the new text and tokens of this step; `LLMEngine.generate`
    returns the same type with the whole completion in them.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int  # generated so far, including a final stop token
    task: str | None = None
    arrival_time: float | None = None  # engine clock
    first_scheduled_time: float | None = None  # engine clock; None while it has not run yet
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of `token_ids` when requested
    finish_time: float | None = None  # engine clock; set on the output that finishes the request

    @property
    def queue_time_s(self) -> float | None:
        """Seconds from arrival to the first step that ran it (vLLM's queue time); None before."""
        if self.arrival_time is None or self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def engine_time_s(self) -> float | None:
        """Seconds from arrival at the engine to the end of the request; None before it ends."""
        if self.arrival_time is None or self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time
