"""Grammars of structured output: a request's `StructuredOutput` spec (a JSON schema, any JSON
object, a regular expression, a list of choices, or Lark) as llguidance grammar text.

Checked without a tokenizer, so the HTTP router refuses a bad schema or pattern with a 400 before
any replica sees it; the engine compiles the same text into a per-request matcher
(engine/structured_output.py). This module uses no torch itself.
"""

from __future__ import annotations

import json

from llguidance import LLMatcher

from inlaid_ray.engine.request import StructuredOutput
from inlaid_ray.errors import InvalidRequest

# Compact JSON: no free whitespace between JSON tokens. With free whitespace a small model can
# emit blanks until max_tokens (vLLM's `disable_any_whitespace` exists for the same reason).
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_ERROR_CHARS = 300  # of a grammar compiler's message shown to the client


def grammar_of(spec: StructuredOutput) -> str:
    """llguidance grammar text of `spec`; InvalidRequest naming what is wrong."""
    try:
        grammar = _grammar_text(spec)
    except (ValueError, TypeError) as exc:  # llguidance refusing its input (e.g. a lone surrogate)
        raise InvalidRequest(f"invalid {spec.kind.replace('_', ' ')}: {str(exc)[:MAX_ERROR_CHARS]}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"invalid {spec.kind.replace('_', ' ')}: {_first_line(error)}")
    return grammar


def _grammar_text(spec: StructuredOutput) -> str:
    if spec.kind == "json_object":
        grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif spec.kind == "json_schema":
        schema = _json(spec.spec, "a JSON schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"the JSON schema must be an object, got {type(schema).__name__}")
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    elif spec.kind == "regex":
        grammar = LLMatcher.grammar_from_regex(spec.spec)
    elif spec.kind == "choice":
        choices = _json(spec.spec, "a list of choices")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise InvalidRequest(f"choices must be a non-empty list of non-empty strings, got {choices!r}")
        # JSON string literals are valid Lark string literals: any text, quotes and escapes included.
        grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    elif spec.kind == "lark":
        grammar = LLMatcher.grammar_from_lark(spec.spec)
    else:
        raise InvalidRequest(f"unknown structured output kind {spec.kind!r}")
    return grammar


def _json(text: str, what: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{what} must be valid JSON: {exc}") from exc


def _first_line(error: str) -> str:
    line = error.strip().splitlines()[0] if error.strip() else "rejected by the grammar compiler"
    return line[:MAX_ERROR_CHARS]
