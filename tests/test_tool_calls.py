"""Tool calls (serve/tool_calls.py): the Hermes parser on texts written by hand, the call grammar
driving a random model with SmolLM2's vocabulary (its calls are checked with `jsonschema`), the
tool chat template against the model's own template, and the refusal when a template cannot
render tools."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.model import load_model
from inlaid_ray.model.tokenizer import encode_chat
from inlaid_ray.serve.http_errors import OpenAIHTTPError
from inlaid_ray.serve.openai_protocol import ChatCompletionRequest
from inlaid_ray.serve.prompts import prepare_chat
from inlaid_ray.serve.tool_calls import call_grammar, parse_tool_calls, template_renders_tools

TOOLS_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "chat_templates" / "smollm2_tools.jinja"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
FUNCTIONS = [{"name": "get_weather", "parameters": WEATHER}, {"name": "add", "parameters": ADD}]
TOOLS = [{"type": "function", "function": f | {"description": f"the {f['name']} tool"}} for f in FUNCTIONS]


def test_parse_hermes_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    content, calls = parse_tool_calls(text, {"get_weather", "add"})
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"}), ("add", {"a": 1, "b": 2})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("just text", {"add"}) == ("just text", [])
    assert [c["function"]["name"] for c in parse_tool_calls(text, {"get_weather", "add"}, parallel=False)[1]] == [
        "get_weather"]  # parallel_tool_calls false: the first call only
    for broken in ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>',  # not JSON
                   '<tool_call>{"name": "sub", "arguments": {}}</tool_call>',  # unknown function
                   '<tool_call>{"name": "add", "arguments": "a=1"}</tool_call>'):  # arguments not an object
        assert parse_tool_calls(broken, {"add"}) == (broken, [])


@pytest.fixture(scope="module")
def engine(tiny_smol_vocab_dir, tokenizer):
    cfg = EngineConfig(block_size=4, num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8)
    return LLMEngine(load_model(tiny_smol_vocab_dir), tokenizer, cfg)


def test_call_grammar_makes_a_random_model_call_with_valid_arguments(engine, tokenizer):
    prompt = tokenizer.encode("Call a tool.", add_special_tokens=False)
    named = call_grammar(FUNCTIONS[:1], parallel=False)
    required = call_grammar(FUNCTIONS, parallel=True)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_output=g)
              for s, g in enumerate([named, named, required, required, required, required])]
    outs = engine.generate([prompt] * len(params), params)
    schemas = {f["name"]: f["parameters"] for f in FUNCTIONS}
    for i, out in enumerate(outs):
        if out.finish_reason == "length":  # parallel calls may go on; a cut answer is not parsed
            assert i >= 2, out.text
            continue
        content, calls = parse_tool_calls(out.text, set(schemas))
        assert content is None and calls, out.text
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        if i < 2:
            assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_call_grammar_keeps_each_schema_a_root_document(engine, tokenizer):
    """`$ref`s into `$defs` and to the root (`#`, recursion) resolve inside each function's own
    schema, as `jsonschema` resolves them."""
    located = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
               "additionalProperties": False,
               "$defs": {"Place": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}},
                                   "required": ["city"], "additionalProperties": False}}}
    tree = {"type": "object", "properties": {"child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
            "required": ["child"], "additionalProperties": False}
    functions = [{"name": "locate", "parameters": located}, {"name": "tree", "parameters": tree}]
    prompt = tokenizer.encode("Call a tool.", add_special_tokens=False)
    params = [SamplingParams(max_tokens=150, temperature=1.0, seed=s, structured_output=call_grammar([f], parallel=False))
              for s in range(3) for f in functions]
    outs = engine.generate([prompt] * len(params), params)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 4, [o.text for o in outs]  # a recursion may run to max_tokens
    for out in finished:
        (call,) = parse_tool_calls(out.text, {"locate", "tree"})[1]
        schema = next(f["parameters"] for f in functions if f["name"] == call["function"]["name"])
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_tools_template_renders_like_the_models_own_without_tools(tokenizer):
    tools_template = TOOLS_TEMPLATE.read_text()
    assert template_renders_tools(tools_template) and not template_renders_tools(tokenizer.chat_template)
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]):
        own = encode_chat(tokenizer, messages)
        tokenizer.chat_template, saved = tools_template, tokenizer.chat_template
        try:
            assert encode_chat(tokenizer, messages) == own
            with_tools = tokenizer.decode(encode_chat(tokenizer, messages, tools=TOOLS))
        finally:
            tokenizer.chat_template = saved
        assert all(json.dumps(t) in with_tools for t in TOOLS)
    assert not template_renders_tools("{# tools are not rendered #}" + tools_template.replace("tools", "tool_list"))


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "max_tokens": 8} | fields)


def test_tool_requests_need_a_template_that_renders_tools(tokenizer):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    turns = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    for req, param in ((_chat(messages=turns[:1], tools=TOOLS), "tools"), (_chat(messages=turns), "messages")):
        with pytest.raises(OpenAIHTTPError) as err:
            prepare_chat(req, tokenizer, 49152, 2048)
        assert err.value.status == 400 and err.value.body()["error"]["param"] == param
    tokenizer.chat_template, saved = TOOLS_TEMPLATE.read_text(), tokenizer.chat_template
    try:
        prepared = prepare_chat(_chat(messages=turns, tools=TOOLS, tool_choice="required"), tokenizer, 49152, 2048)
    finally:
        tokenizer.chat_template = saved
    rendered = tokenizer.decode(prepared.prompt_token_ids)
    assert "<tool_response>\n3\n</tool_response>" in rendered and '"arguments": {"a": 1, "b": 2}' in rendered
    assert prepared.params.structured_output is not None and prepared.params.structured_output.kind == "lark"


@pytest.mark.parametrize("fields, message", [
    (dict(tools=TOOLS + TOOLS[:1]), "unique"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), "object schema"),
    (dict(messages=[{"role": "tool", "content": "3"}]), "tool_call_id"),
    (dict(messages=[{"role": "user", "content": None}]), "needs content"),
])
def test_malformed_tool_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _chat(**({"messages": [{"role": "user", "content": "hi"}]} | fields))


@pytest.mark.parametrize("fields, param, message", [
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "not among the tools"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format",
     "cannot be combined with tools"),
    (dict(tools=TOOLS, guided_regex="[a-z]+"), "guided_regex", "cannot be combined with tools"),  # auto, too
    (dict(tools=[{"type": "function", "function": {"name": "f", "strict": True}}]), "tools", "strict"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "nope"}}}}}]),
     "tools", "parameters of function 'f'"),
])
def test_inconsistent_tool_requests_get_a_400_naming_the_field(tokenizer, fields, param, message):
    tokenizer.chat_template, saved = TOOLS_TEMPLATE.read_text(), tokenizer.chat_template
    try:
        with pytest.raises(OpenAIHTTPError) as err:
            prepare_chat(_chat(messages=[{"role": "user", "content": "hi"}], **fields), tokenizer, 49152, 2048)
    finally:
        tokenizer.chat_template = saved
    body = err.value.body()["error"]
    assert err.value.status == 400 and body["param"] == param and message in body["message"], body
