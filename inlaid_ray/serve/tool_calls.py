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

import json
import re
import uuid
from collections.abc import Collection, Sequence
from typing import Any

from inlaid_ray.engine.request import StructuredOutput

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# The separators the template shows; the grammar keeps to them (no free whitespace).
_CALL_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template reads the `tools` it is given (else tools would be dropped)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def call_grammar(functions: Sequence[dict[str, Any]], parallel: bool) -> StructuredOutput:
    """A grammar for one call (or, with `parallel`, one or more) to one of `functions` (OpenAI
    function objects: name, parameters), in the Hermes form, arguments held to each schema."""
    options = [{"type": "object",
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = (options[0] if len(options) == 1 else {"anyOf": options}) | {"x-guidance": _CALL_JSON_FORMAT}
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    lark = f'{start}\ncall: "<tool_call>\\n" args "\\n</tool_call>"\nargs: %json {json.dumps(schema)}\n'
    return StructuredOutput("lark", lark)


def parse_tool_calls(text: str, names: Collection[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI `tool_calls`) of a completion: the text before the first call is the
    content (None when empty); every `<tool_call>` block naming a known function with an object
    of arguments is a call. When any block does not parse, the whole text is content and there
    are no calls (vLLM's hermes parser does the same)."""
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
    return content or None, calls
