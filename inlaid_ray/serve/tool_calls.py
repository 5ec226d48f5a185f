"""Tool calling in the Hermes form (the one Qwen2.5, Hermes and deploy/chat_templates/
smollm2_tools.jinja teach): the assistant answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_choice` "auto" lets the model choose and parses what it wrote (vLLM's hermes parser);
"required" and a named function hold the output to that form with a grammar (structured output,
engine/grammar.py), so the call always parses and its arguments follow the function's schema;
"none" leaves the output as text. Tools need a chat template that renders them.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from collections.abc import Collection, Sequence
from typing import Any

from inlaid_ray.engine.request import StructuredOutput

CALL_OPEN = "<tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# The separators the template shows; the grammar keeps to them (no free whitespace).
_CALL_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCallParsing:
    """How the calls of a chat answer are read back (serve/responses.py)."""

    names: frozenset[str]  # the request's functions
    parallel: bool  # every call, or only the first (parallel_tool_calls: false)
    # OpenAI's finish reason of an answer with calls: "tool_calls", but "stop" when tool_choice
    # named the function (the call was forced, not chosen)
    finish_reason: str = "tool_calls"


@functools.lru_cache(maxsize=8)  # asked per request with tools; a server has one or two templates
def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template reads the `tools` it is given (else tools would be dropped):
    `tools` is among the template's free variables (a mention in a comment does not count)."""
    if not chat_template:
        return False
    from jinja2 import Environment, meta

    return "tools" in meta.find_undeclared_variables(Environment().parse(chat_template))


def call_grammar(functions: Sequence[dict[str, Any]], parallel: bool) -> StructuredOutput:
    """A grammar for one call (or, with `parallel`, one or more) to one of `functions` (OpenAI
    function objects: name, parameters), in the Hermes form. Each function's arguments are their
    own `%json` rule, so its `parameters` stay a root schema (its `$ref`s resolve as written)."""
    rules = []
    for i, f in enumerate(functions):
        head = '<tool_call>\n{"name": ' + json.dumps(f["name"]) + ', "arguments": '
        schema = dict(f.get("parameters") or {"type": "object"}) | {"x-guidance": _CALL_JSON_FORMAT}
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} " + json.dumps("}\n</tool_call>") + "\n"
                     f"args_{i}: %json {json.dumps(schema)}\n")
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    calls = " | ".join(f"call_{i}" for i in range(len(functions)))
    return StructuredOutput("lark", f"{start}\ncall: {calls}\n" + "".join(rules))


def content_before_calls(text: str) -> int:
    """How much of a partial answer is content for sure: up to its first `<tool_call>`, or,
    without one, all but a suffix that could be the start of one (streamed text never has to be
    taken back)."""
    start = text.find(CALL_OPEN)
    if start >= 0:
        return start
    for keep in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def parse_tool_calls(text: str, names: Collection[str], parallel: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI `tool_calls`) of a completion: the text before the first call is the
    content (None when empty); every `<tool_call>` block naming a known function with an object
    of arguments is a call (only the first without `parallel`, as vLLM does). When any block
    does not parse, the whole text is content and there are no calls (vLLM's hermes parser)."""
    blocks = list(_CALL.finditer(text))
    if not blocks:
        return text, []
    calls = []
    for block in blocks:
        try:
            call = json.loads(block.group(1))
        except ValueError:
            return text, []
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)):
            return text, []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    content = text[: blocks[0].start()].strip()
    return content or None, calls if parallel else calls[:1]
