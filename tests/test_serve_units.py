"""Serve pieces that need no Ray cluster: the deploy YAML and the app builder, response assembly
(SSE shape, usage, errors after the stream started), AppArgs validation, and the idempotent
registry seeding from a manifest against a real embedded redis-server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
import json
import uuid
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from inlaid_ray.registry import TaskRecord, TaskRegistry, connect_redis
from inlaid_ray.serve.app import AppArgs, build_app
from inlaid_ray.demo.manifest import DEMO_CLUSTERS, DEMO_TENANT, write_demo_manifest
from inlaid_ray.serve.seed import RegistrySeed, seed_registry
from inlaid_ray.serve.http_errors import OpenAIHTTPError
from inlaid_ray.serve.metrics import ServeMetrics
from inlaid_ray.serve.responses import Choice, ChoiceStreams, DONE, ResponseContext, StreamTracker, collect, next_chunk, sse_events
from inlaid_ray.serve.tool_calls import ToolCallParsing

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config


def test_deploy_yaml_is_a_valid_serve_config_and_builds(smollm2_dir):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "inlaid_ray.serve.app:build_app"
    args = AppArgs.model_validate(app.args)  # every YAML key is a known field
    assert set(app.args) <= set(AppArgs.model_fields)
    built = build_app(app.args | {"model_dir": str(smollm2_dir)})
    assert isinstance(built, Application)
    assert args.num_replicas == 2 and args.seed_manifest is None  # starts with no task


def test_every_app_arg_has_a_default_and_a_description():
    for name, field in AppArgs.model_fields.items():
        assert not field.is_required(), name
        assert field.description, name


def test_every_policy_app_args_allows_is_registered():
    from typing import get_args

    from inlaid_ray.sched import make_policy

    for name in get_args(AppArgs.model_fields["policy"].annotation):
        assert make_policy(name).name == name


def test_deployment_specs_carry_every_app_arg(smollm2_dir, tmp_path):
    """Each spec field with an AppArgs namesake carries the value given (none restates a default),
    and the few resolved ones follow their rules."""
    from inlaid_ray.config import Settings
    from inlaid_ray.serve.app import app_specs

    given = dict(block_size=8, num_kv_blocks=77, kv_memory_fraction=0.3, max_num_seqs=5, max_num_batched_tokens=1024,
                 policy="mlfq", seed=7, max_adapters_per_replica=5, max_lora_rank=8, max_clusters_per_replica=3,
                 drain_timeout_s=9.0, max_cluster_rank=4, max_cluster_size=3, adapter_format="jd_bank",
                 namespace="ns", predictor="task_quantile", default_slo_s=3.0, auth_cache_s=1.0,
                 registry_refresh_s=2.0, max_request_bytes=4096, max_json_depth=8, metrics_need_admin_key=False,
                 dtype="float16", num_cpus_per_replica=3, redis_url="redis://example.invalid:1/0")
    args = AppArgs(model_dir=str(smollm2_dir), **given)
    specs = app_specs(args, Settings(cache_dir=tmp_path))
    engine, replica, router = specs.replica.engine, specs.replica, specs.router
    expected = [
        (engine, ("block_size", "num_kv_blocks", "kv_memory_fraction", "max_num_seqs", "max_num_batched_tokens",
                 "policy", "seed")),
        (replica, ("max_adapters_per_replica", "max_lora_rank", "max_clusters_per_replica", "drain_timeout_s",
                  "max_cluster_rank", "max_cluster_size", "dtype")),
        (router, ("namespace", "predictor", "default_slo_s", "auth_cache_s", "registry_refresh_s",
                 "max_request_bytes", "max_json_depth", "metrics_need_admin_key", "max_lora_rank", "redis_url")),
    ]
    for spec, names in expected:
        assert {n: getattr(spec, n) for n in names} == {n: given[n] for n in names}, type(spec).__name__
    assert replica.compressed_cluster_slots == 4  # jd_bank: one slot per resident cluster plus one draining
    assert engine.max_model_len == router.max_model_len == 1024  # a prompt is prefilled in one step
    assert engine.dtype is None and engine.device is None  # the engine takes the model's
    assert replica.device == "auto" and replica.torch_threads == 3  # no GPU given: the replica picks
    on_gpu = app_specs(args.model_copy(update={"num_gpus_per_replica": 1.0}), Settings(cache_dir=tmp_path))
    assert on_gpu.replica.device == "cuda"
    assert router.base_model_id == smollm2_dir.name and router.registry_seed.base_model == smollm2_dir.name
    assert replica.artifact_dir == str(tmp_path / "artifacts") and router.data_dir == str(tmp_path / "registry")


def test_engine_replicas_are_a_fixed_count_or_serve_autoscaling():
    """A fixed num_replicas, or Ray Serve's autoscaling config (validated by Ray's own model),
    never both."""
    from ray.serve.config import AutoscalingConfig

    from inlaid_ray.serve.app import engine_deployment_options

    fixed = engine_deployment_options(AppArgs(num_replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    scaled = engine_deployment_options(AppArgs(autoscaling={"min_replicas": 1, "max_replicas": 2,
                                                            "target_ongoing_requests": 2}))
    assert "num_replicas" not in scaled
    ray_config = AutoscalingConfig(**scaled["autoscaling_config"])
    assert (ray_config.min_replicas, ray_config.max_replicas, ray_config.target_ongoing_requests) == (1, 2, 2.0)
    with pytest.raises(ValidationError, match="num_replicas and autoscaling both given"):
        AppArgs(num_replicas=2, autoscaling={"max_replicas": 4})
    with pytest.raises(ValidationError, match="max_replicas=1 < min_replicas=2"):
        AppArgs(autoscaling={"min_replicas": 2, "max_replicas": 1})


def test_serve_flags_default_to_app_args():
    """`inlaid-ray serve` with no flag is AppArgs' defaults but for the CLI's KV cap; a flag given wins."""
    import argparse

    from inlaid_ray.serve.cli_args import CLI_NUM_KV_BLOCKS, add_cli_arguments, app_fields_from_cli

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    assert AppArgs.model_validate(app_fields_from_cli(parser.parse_args([]))) == AppArgs(num_kv_blocks=CLI_NUM_KV_BLOCKS)
    flags = ["--num-kv-blocks", "0", "--policy", "fifo", "--num-gpus-per-replica", "1", "--dtype", "float16"]
    args = AppArgs.model_validate(app_fields_from_cli(parser.parse_args(flags)))
    assert (args.num_kv_blocks, args.policy, args.num_gpus_per_replica, args.dtype) == (None, "fifo", 1.0, "float16")
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "lottery"])  # choices come from AppArgs' Literal
    scaled = AppArgs.model_validate(app_fields_from_cli(parser.parse_args(["--arg", 'autoscaling={"max_replicas": 4}'])))
    assert scaled.autoscaling.max_replicas == 4 and "num_replicas" not in scaled.model_fields_set


@pytest.mark.parametrize("bad", [
    dict(max_model_len=4096, max_num_batched_tokens=2048),
    dict(device="cuda", num_gpus_per_replica=0),
    dict(max_adapters_per_replica=1, max_clusters_per_replica=2),
    dict(policy="lottery"),
    dict(policy_options={"no_such_knob": 1}),
    dict(step_cost_model="/no/such/cost_model.json"),
    dict(chat_template="/no/such/template.jinja"),
    dict(no_such_field=1),
])
def test_app_args_reject_inconsistent_values(bad):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(bad)
    shown = str(info.value)
    assert all(str(v) in shown or k in shown for k, v in bad.items())


# ----------------------------------------------------------------------------- responses


def _ctx(kind: str, include_usage: bool = False, return_ids: bool = False) -> ResponseContext:
    return ResponseContext(kind=kind, request_id="r1", model="sentiment", task="sentiment", prompt_text="hi",
                           prompt_token_ids=(5, 6, 7), predicted_len=3.0, slo_s=10.0, include_usage=include_usage,
                           return_token_ids=return_ids)


async def _stream(chunks: list[dict]):
    for chunk in chunks:
        yield chunk


def _chunk(text: str, ids: list[int], n: int, finish: str | None = None) -> dict:
    return {"replica": "rep-a", "text": text, "token_ids": ids, "finish_reason": finish, "num_prompt_tokens": 3,
            "num_completion_tokens": n}


CHUNKS = [_chunk("Hel", [1], 1), _chunk("lo", [2, 3], 3), _chunk("!", [4], 4, "stop")]


class _ReplicaStream:
    """Chunks as a replica streams them (an async iterator with Ray's `cancel()`)."""

    def __init__(self, chunks: list[dict]) -> None:
        self._chunks = iter(chunks)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        await asyncio.sleep(0)
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


async def _choices(ctx: ResponseContext, chunks: list[dict], num_choices: int, metrics: ServeMetrics) -> list[Choice]:
    stream = _ReplicaStream(chunks)
    streams = ChoiceStreams(await next_chunk(stream), stream, num_choices)
    return [Choice(streams.choice(i), StreamTracker(ctx, metrics)) for i in range(num_choices)]


def _run_sse(ctx: ResponseContext, chunks: list[dict], metrics: ServeMetrics) -> list[str]:
    async def main():
        return [e async for e in sse_events(await _choices(ctx, chunks, 1, metrics))]

    return asyncio.run(main())


def _data(events: list[str]) -> list[dict]:
    assert events[-1] == DONE
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def test_chat_stream_shape_and_usage():
    metrics = ServeMetrics()
    events = _data(_run_sse(_ctx("chat", include_usage=True), CHUNKS, metrics))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert content == "".join(c["text"] for c in CHUNKS)
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["choices"][0]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert all(e["usage"] is None for e in events[:-1])
    exposition = metrics.exposition().decode()
    assert 'inlaid_requests_total{finish_reason="stop",task="sentiment"} 1.0' in exposition


def test_a_chat_stream_that_may_call_tools_streams_its_content_and_holds_back_only_calls():
    """Content streams as it comes, except a suffix that could start `<tool_call>`; a call is
    sent once complete, in OpenAI's delta shape; text that only looked like a call start is
    sent as content in the end, so the content streamed equals the whole answer."""
    ctx = replace(_ctx("chat"), tool_calls=ToolCallParsing(frozenset({"f"}), parallel=True))
    call = '\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    chunks = [_chunk("Sure, ", [1], 1), _chunk("let me <to", [2], 2), _chunk("ol_call>" + call, [3], 3, "stop")]
    events = _data(_run_sse(ctx, chunks, ServeMetrics()))
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    assert [d["content"] for d in deltas[:2]] == ["Sure, ", "let me "]  # before the answer ended
    (sent,) = deltas[2]["tool_calls"]
    assert sent["index"] == 0 and sent["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = [_chunk("a <", [1], 1), _chunk("b <tool", [2], 2), _chunk("kit>", [3], 3, "stop")]
    events = _data(_run_sse(ctx, plain, ServeMetrics()))
    content = [e["choices"][0]["delta"].get("content", "") for e in events[1:]]
    assert content[:2] == ["a ", "<b "] and "".join(content) == "a <b <toolkit>"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream_carries_finish_in_last_text_chunk_and_token_ids():
    events = _data(_run_sse(_ctx("completion", return_ids=True), CHUNKS, ServeMetrics()))
    assert [e["choices"][0]["text"] for e in events] == [c["text"] for c in CHUNKS]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "stop"]
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == [1, 2, 3, 4]


def test_error_after_the_stream_started_is_an_error_event():
    metrics = ServeMetrics()
    failure = {"error": {"status": 503, "message": "no slot", "type": "server_error", "code": "no_free_slot", "param": None}}
    events = _data(_run_sse(_ctx("completion"), [CHUNKS[0], failure], metrics))
    assert events[0]["choices"][0]["text"] == "Hel"
    assert events[-1]["error"]["code"] == "no_free_slot" and events[-1]["status"] == 503
    exposition = metrics.exposition().decode()
    assert 'inlaid_requests_total{finish_reason="error",task="sentiment"} 1.0' in exposition
    assert 'inlaid_request_errors_total{status="503"} 1.0' in exposition


def test_error_before_the_first_token_raises_http_error_and_collect_builds_the_body():
    async def main():
        with pytest.raises(OpenAIHTTPError) as info:
            await next_chunk(_stream([{"error": {"status": 404, "message": "gone", "code": "model_not_found"}}]))
        assert info.value.status == 404 and info.value.body()["error"]["code"] == "model_not_found"
        return await collect(await _choices(_ctx("chat"), CHUNKS, 1, ServeMetrics()), 1)

    body = asyncio.run(main())
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def _tagged(index: int, chunks: list[dict]) -> list[dict]:
    return [c | {"index": index} for c in chunks]


def _candidate(index: int, text: str, logprobs: list[float]) -> list[dict]:
    entries = [[i, lp, []] for i, lp in enumerate(logprobs)]
    return _tagged(index, [_chunk(text, list(range(len(logprobs))), len(logprobs), "stop") | {"logprobs": entries}])


def test_choices_of_one_replica_stream_interleave_by_index_and_best_of_keeps_the_most_likely():
    async def main(chunks: list[dict], num_choices: int, n: int, stream: bool):
        choices = await _choices(_ctx("completion"), chunks, num_choices, ServeMetrics())
        if stream:
            return _data([e async for e in sse_events(choices)])
        return await collect(choices, n)

    a, b, c = _tagged(0, CHUNKS), _tagged(1, [_chunk("a", [9], 1), _chunk("b", [8], 2, "length")]), \
        _tagged(2, [_chunk("z", [7], 1, "stop")])
    interleaved = [a[0], b[0], c[0], a[1], b[1], a[2]]  # as the replica coalesces them
    events = asyncio.run(main(interleaved, 3, 3, True))
    by_index: dict[int, str] = {}
    for e in events:
        ch = e["choices"][0]
        by_index[ch["index"]] = by_index.get(ch["index"], "") + ch["text"]
    assert by_index == {0: "Hello!", 1: "ab", 2: "z"}
    # best_of 3, n 2: the two highest cumulative log-probabilities (-1.0 and -1.5), best first.
    cands = _candidate(0, "low", [-2.0, -1.0]) + _candidate(1, "best", [-0.5, -0.5]) + _candidate(2, "mid", [-1.5])
    body = asyncio.run(main(cands, 3, 2, False))
    assert [(ch["index"], ch["text"]) for ch in body["choices"]] == [(0, "best"), (1, "mid")]
    assert body["usage"]["completion_tokens"] == 5  # every candidate generated counts
# ----------------------------------------------------------------------------- registry seeding


def _fake_adapters(root: Path) -> Path:
    """Adapter directories as seeding reads them (config + weights file bytes)."""
    for names in DEMO_CLUSTERS.values():
        for name in names:
            d = root / name
            d.mkdir(parents=True)
            (d / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj", "v_proj"]}))
            (d / "adapter_model.safetensors").write_bytes(name.encode() * 10)
    return root


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    client = connect_redis(None, tmp_path_factory.mktemp("seed-redis"))
    yield client
    client.close()


def test_seeding_is_idempotent_and_follows_adapter_changes(redis_client, tmp_path):
    registry = TaskRegistry(redis_client, namespace="b" + uuid.uuid4().hex[:8])
    adapters = _fake_adapters(tmp_path / "adapters")
    (adapters / "email" / "adapter_model.safetensors").unlink()  # not trained yet
    manifest = write_demo_manifest(tmp_path / "manifest.json", adapters)
    boot = RegistrySeed(api_key="k-demo", admin_key="k-admin", manifest=str(manifest), base_model="base")
    first = seed_registry(registry, boot)
    expected = sorted(n for names in DEMO_CLUSTERS.values() for n in names if n != "email")
    assert first == expected
    assert registry.tenant_for_key("k-demo") == DEMO_TENANT and registry.is_admin_key("k-admin")
    for cluster, names in DEMO_CLUSTERS.items():
        record = registry.get_cluster(cluster)
        assert set(record.members) == {n for n in names if n != "email"}
        assert all(registry.get_task(n).cluster == cluster and registry.get_task(n).status == "live"
                   for n in record.members)
    revision = registry.revision()
    assert seed_registry(registry, boot) == first and registry.revision() == revision  # a restart changes nothing

    (adapters / "sentiment" / "adapter_model.safetensors").write_bytes(b"retrained")
    (adapters / "email" / "adapter_model.safetensors").write_bytes(b"trained at last")
    seed_registry(registry, boot)
    assert registry.get_task("sentiment").version == 2 and registry.get_task("extract").version == 1
    assert "email" in registry.get_cluster("demo-long").members


def test_seeding_leaves_another_tenants_task_alone(redis_client, tmp_path):
    registry = TaskRegistry(redis_client, namespace="b" + uuid.uuid4().hex[:8])
    registry.upsert_task(TaskRecord(name="extract", tenant="acme", adapter_uri="/elsewhere", status="live"))
    manifest = write_demo_manifest(tmp_path / "manifest.json", _fake_adapters(tmp_path / "a"))
    names = seed_registry(registry, RegistrySeed(api_key="k-demo", manifest=str(manifest)))
    assert "extract" not in names
    assert registry.get_task("extract").tenant == "acme" and registry.get_task("extract").adapter_uri == "/elsewhere"


def _depth(value) -> int:
    """Nesting depth of a JSON value, counted the plain recursive way (the reference)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("depth", [1, 5, 31, 32, 33, 64])
def test_json_depth_limit_matches_recursive_depth(depth):
    from inlaid_ray.serve.request_body import check_json_value

    value = json.loads('{"a": ' * (depth - 1) + "[1]" + "}" * (depth - 1))
    assert _depth(value) == depth
    if depth <= 32:
        check_json_value(value, max_depth=32)
    else:
        with pytest.raises(OpenAIHTTPError) as err:
            check_json_value(value, max_depth=32)
        assert err.value.status == 400 and err.value.code == "too_deep"


def test_json_strings_must_be_valid_unicode_keys_included():
    from inlaid_ray.serve.request_body import check_json_value

    good = json.loads('{"prompt": "ok \\ud83d\\ude00", "x": ["\\u00e9"]}')  # a surrogate pair is one code point
    assert good["prompt"].encode("utf-8")  # the reference: Python's own UTF-8 codec accepts it
    check_json_value(good, max_depth=8)
    for raw, param in [('{"prompt": "a\\ud800"}', "prompt"), ('{"m": [{"c": "\\udfff"}]}', "m[0].c"),
                       ('{"\\ud800": 1}', None)]:
        value = json.loads(raw)
        with pytest.raises(OpenAIHTTPError) as err:
            check_json_value(value, max_depth=8)
        assert err.value.code == "invalid_unicode" and err.value.param == param


def test_replica_failures_are_503_with_retry_after_and_no_internals():
    """Ray's own exception objects, as a dead or restarting replica raises them (their text carries
    actor ids, pids and node addresses): a retryable 503 whose body names none of that."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    from inlaid_ray.serve.http_errors import REPLICA_UNAVAILABLE, from_exception

    internals = "actor_id=6aa36be9c78c77746a7a0043 pid=4077 ip=192.0.2.2"
    shed = from_exception(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert shed.status == 503 and shed.code == "overloaded" and shed.headers() == {"Retry-After": "1"}
    for exc in (ActorDiedError(), ActorUnavailableError(internals, None)):
        err = from_exception(exc)
        assert err.status == 503 and err.code == REPLICA_UNAVAILABLE and err.headers() == {"Retry-After": "1"}
        assert "192.0.2.2" not in json.dumps(err.body()) and "pid" not in json.dumps(err.body())
        assert OpenAIHTTPError.from_chunk(err.to_chunk()) == err  # the replica-to-router form keeps it
    other = from_exception(RuntimeError(internals))
    assert other.status == 500 and other.headers() is None
    assert "192.0.2.2" not in other.message and other.message.startswith("internal error (reference ")


@pytest.mark.parametrize("argv,why", [(["--arg", "foo=1"], "foo: Extra inputs are not permitted"),
                                      (["--arg", "nope"], "expected KEY=VALUE"),
                                      (["--arg", "num_replicas=0"], "num_replicas")])
def test_serve_cli_user_errors_are_one_line_and_exit_2(capsys, argv, why):
    from inlaid_ray.cli import main

    assert main(["serve", *argv]) == 2  # before Ray, Redis or the model are touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], err


@pytest.mark.parametrize("header,key", [("Bearer sk-1", "sk-1"), ("bearer   sk-2  ", "sk-2"), ("BEARER sk-3", "sk-3"),
                                        (None, None), ("", None), ("Bearer", None), ("Bearer   ", None),
                                        ("Basic sk-4", None), ("sk-5", None)])
def test_the_bearer_scheme_is_case_insensitive_and_anything_else_is_a_401(header, key):
    """RFC 6750 / 7235: the scheme is case-insensitive; a missing or other scheme is refused."""
    from inlaid_ray.serve.access import _bearer
    from inlaid_ray.serve.http_errors import OpenAIHTTPError

    if key is not None:
        assert _bearer(header) == key
    else:
        with pytest.raises(OpenAIHTTPError) as err:
            _bearer(header)
        assert err.value.status == 401


def _openai_sse_events(text: str) -> list[str]:
    """The events the official openai SDK's SSE decoder reads from `text` (its data fields)."""
    from openai._streaming import SSEDecoder

    decoder, out = SSEDecoder(), []
    for line in text.split("\n"):
        sse = decoder.decode(line)
        if sse is not None:
            out.append(sse.data)
    return out


def test_a_silent_stream_gets_keepalive_comments_that_the_openai_client_skips():
    """The source stays silent until two keep-alives went out (no wall-clock assumption)."""
    from inlaid_ray.serve.responses import KEEPALIVE, with_keepalive

    async def run(interval: float, silent_until_keepalives: int) -> list[str]:
        release = asyncio.Event()

        async def source():
            yield 'data: {"a":1}\n\n'
            await release.wait()  # queued or paused: nothing to send
            yield 'data: {"b":2}\n\n'
            yield "data: [DONE]\n\n"

        out = []
        if silent_until_keepalives == 0:
            release.set()
        async for event in with_keepalive(source(), interval):
            out.append(event)
            if out.count(KEEPALIVE) == silent_until_keepalives:
                release.set()
        return out

    plain = asyncio.run(run(10.0, 0))
    padded = asyncio.run(run(0.01, 2))
    assert KEEPALIVE not in plain and padded.count(KEEPALIVE) >= 2
    assert [e for e in padded if e != KEEPALIVE] == plain  # nothing lost, reordered or cut
    assert _openai_sse_events("".join(padded)) == _openai_sse_events("".join(plain)) == ['{"a":1}', '{"b":2}', "[DONE]"]


def test_a_client_leaving_during_a_silence_stops_the_source():
    from inlaid_ray.serve.responses import with_keepalive

    cleaned = []

    async def source():
        try:
            yield "data: 1\n\n"
            await asyncio.sleep(60)
            yield "data: 2\n\n"
        finally:
            cleaned.append(True)  # sse_events' finally records the request's end here

    async def client():
        stream = with_keepalive(source(), 0.05)
        assert await stream.__anext__() == "data: 1\n\n"
        assert (await stream.__anext__()).startswith(":")
        await stream.aclose()  # what Starlette does when the client disconnects

    asyncio.run(asyncio.wait_for(client(), 5))
    assert cleaned == [True]
