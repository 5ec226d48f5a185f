"""`inlaid-ray tasks list|show|retire` and the `onboard` flags, on a real embedded registry: the
commands print what the registry holds (checked against the records read back), retire moves a
live task to retired and drops it from its cluster, unknown names fail with TaskNotFound, and
unset onboard flags keep OnboardOptions' defaults."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest

from inlaid_ray.config import Settings
from inlaid_ray.errors import InvalidRequest, TaskNotFound
from inlaid_ray.jobs.cli import _options, add_keys_parser, add_onboard_parser, add_tasks_parser
from inlaid_ray.jobs.onboard_args import OnboardOptions
from inlaid_ray.registry import ClusterRecord, TaskRecord, TaskRegistry, connect_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tasks-redis")
    client = connect_redis(None, data_dir)
    yield client, data_dir
    client.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inlaid-ray")
    sub = parser.add_subparsers(dest="command", required=True)
    add_onboard_parser(sub)
    add_tasks_parser(sub)
    add_keys_parser(sub)
    return parser


def _run(argv: list[str], capsys, settings: Settings) -> str:
    args = _parser().parse_args(argv)
    assert args.func(args, settings) == 0
    return capsys.readouterr().out


def test_tasks_list_show_retire(server, capsys, tmp_path):
    client, data_dir = server
    ns = "t" + uuid.uuid4().hex[:8]
    reg = TaskRegistry(client, ns)
    for name, tenant in (("alpha", "acme"), ("beta", "acme"), ("gamma", "other")):
        reg.upsert_task(TaskRecord(name=name, tenant=tenant, adapter_uri=f"/a/{name}", status="live", cluster="c0",
                                   rank=4))
    reg.upsert_cluster(ClusterRecord("c0", members=("alpha", "beta", "gamma")))
    settings = Settings(cache_dir=tmp_path)
    common = ["tasks", "--data-dir", str(data_dir), "--namespace", ns]

    rows = json.loads(_run(common + ["--json", "list"], capsys, settings))
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]
    assert rows[0] == {f: getattr(reg.get_task("alpha"), f) for f in rows[0]}
    acme = json.loads(_run(common + ["--json", "list", "--tenant", "acme"], capsys, settings))
    assert [r["name"] for r in acme] == ["alpha", "beta"]
    table = _run(common + ["list"], capsys, settings).splitlines()
    assert table[0].split() == ["name", "tenant", "status", "cluster", "version", "rank", "updated"]
    assert [ln.split()[:4] for ln in table[1:]] == [[n, t, "live", "c0"] for n, t in
                                                    (("alpha", "acme"), ("beta", "acme"), ("gamma", "other"))]

    shown = json.loads(_run(common + ["show", "beta"], capsys, settings))
    assert shown["adapter_uri"] == "/a/beta" and shown["cluster_record"]["members"] == ["alpha", "beta", "gamma"]

    out = _run(common + ["retire", "beta"], capsys, settings)
    assert out.strip() == "task beta: retired"
    assert reg.get_task("beta").status == "retired" and reg.get_cluster("c0").members == ("alpha", "gamma")
    assert "(already)" in _run(common + ["retire", "beta"], capsys, settings)
    retired = json.loads(_run(common + ["--json", "list", "--status", "retired"], capsys, settings))
    assert [r["name"] for r in retired] == ["beta"]
    with pytest.raises(TaskNotFound, match="nope"):
        _run(common + ["show", "nope"], capsys, settings)
    with pytest.raises(TaskNotFound, match="nope"):
        _run(common + ["retire", "nope"], capsys, settings)


def test_onboard_flags_map_to_options():
    base = ["onboard", "--task", "t", "--tenant", "acme", "--adapter", "/a", "--calib", "/c.jsonl"]
    args = _parser().parse_args(base)
    assert (args.task, args.tenant, args.adapter, args.calib) == ("t", "acme", "/a", "/c.jsonl")
    assert _options(args) == OnboardOptions()  # nothing set: every default
    args = _parser().parse_args(base + ["--requantize", "never", "--endpoint", "none", "--num-cpus", "0",
                                        "--max-rank", "32", "--no-ray", "--tokens-per-task", "256"])
    opts = _options(args)
    assert opts == OnboardOptions(requantize="never", endpoint=None, num_cpus=0, max_rank=32, use_ray=False,
                                  tokens_per_task=256)
    with pytest.raises(ValueError, match="requantize"):
        _options(_parser().parse_args(base + ["--requantize", "sometimes"]))


def test_onboard_batch_file_and_its_user_errors(tmp_path):
    """`onboard --batch FILE`: tasks read from JSONL (relative paths from the file's directory);
    mixing it with --task, a missing flag, or a malformed line is a user error naming the problem;
    a submitted batch job gets the file's absolute path."""
    from inlaid_ray.jobs.cli import _check_task_args, _ONBOARD_FLAGS
    from inlaid_ray.jobs.onboard import TaskSpec, read_task_specs
    from inlaid_ray.jobs.submit import job_argv

    batch = tmp_path / "jobs" / "tasks.jsonl"
    batch.parent.mkdir()
    batch.write_text(json.dumps({"task": "a", "tenant": "acme", "adapter": "ad/a", "calib": "/abs/c.jsonl"}) + "\n\n"
                     + json.dumps({"task": "b", "tenant": "acme", "adapter": "ad/b", "calib": "c.jsonl",
                                   "eval_data": "e.jsonl"}) + "\n")
    assert read_task_specs(batch) == [
        TaskSpec("a", "acme", batch.parent / "ad/a", Path("/abs/c.jsonl")),
        TaskSpec("b", "acme", batch.parent / "ad/b", batch.parent / "c.jsonl", batch.parent / "e.jsonl")]
    args = _parser().parse_args(["onboard", "--batch", str(batch), "--no-ray"])
    _check_task_args(args)
    argv = job_argv(args, tuple(_ONBOARD_FLAGS))
    assert f"--batch={batch.resolve()}" in argv and not any(a.startswith("--task") for a in argv)
    with pytest.raises(InvalidRequest, match=r"drop \['--task'\]"):
        _check_task_args(_parser().parse_args(["onboard", "--batch", str(batch), "--task", "x"]))
    with pytest.raises(InvalidRequest, match="onboard needs --adapter, --calib"):
        _check_task_args(_parser().parse_args(["onboard", "--task", "x", "--tenant", "acme"]))
    bad = tmp_path / "bad.jsonl"
    for line, why in [("{", "not valid JSON"), (json.dumps({"task": "a"}), "expected"),
                      (json.dumps({"task": "a", "tenant": "t", "adapter": "x", "calib": "y", "extra": 1}), "expected")]:
        bad.write_text(line + "\n")
        with pytest.raises(InvalidRequest, match=f"bad.jsonl:1: {why}"):
            read_task_specs(bad)
    with pytest.raises(InvalidRequest, match="names no task"):
        bad.write_text("\n")
        read_task_specs(bad)


def test_keys_create_list_revoke(server, capsys, tmp_path):
    client, data_dir = server
    ns = "t" + uuid.uuid4().hex[:8]
    reg = TaskRegistry(client, ns)
    reg.add_tenant("acme")
    settings = Settings(cache_dir=tmp_path)
    common = ["keys", "--data-dir", str(data_dir), "--namespace", ns]
    created = json.loads(_run(common + ["create", "--tenant", "acme"], capsys, settings))
    assert reg.tenant_for_key(created["api_key"]) == "acme"  # the registry, read back, knows the new key
    listed = json.loads(_run(common + ["list"], capsys, settings))
    assert listed == [{"key_hash": created["key_hash"], "tenant": "acme", "admin": False, "label": "cli"}]
    assert created["api_key"] not in json.dumps(listed)
    assert _run(common + ["revoke", created["key_hash"]], capsys, settings).strip() == f"revoked {created['key_hash']}"
    assert reg.tenant_for_key(created["api_key"]) is None
    with pytest.raises(InvalidRequest, match="no API key has the hash"):
        _run(common + ["revoke", created["key_hash"]], capsys, settings)
    with pytest.raises(InvalidRequest, match="'ghost' does not exist"):
        _run(common + ["create", "--tenant", "ghost"], capsys, settings)


def test_serve_onboard_and_tasks_share_the_registry_namespace_by_default():
    """A regression: `inlaid-ray serve` once defaulted to another namespace than the onboarding
    job and the task CLI, so neither saw the tasks it served."""
    from inlaid_ray.jobs.onboard_args import OnboardOptions
    from inlaid_ray.serve.app_args import AppArgs
    from inlaid_ray.serve.cli_args import add_cli_arguments, app_fields_from_cli

    serve_parser = argparse.ArgumentParser()
    add_cli_arguments(serve_parser)
    serve_args = AppArgs.model_validate(app_fields_from_cli(serve_parser.parse_args([])))
    tasks_args = _parser().parse_args(["tasks", "list"])
    assert serve_args.namespace == OnboardOptions().namespace == tasks_args.namespace


def test_a_submitted_job_gets_the_same_options_without_its_secrets(tmp_path):
    """`onboard --submit` rebuilds the job's command line: parsed back it gives the same options,
    with paths made absolute and the admin key and Redis URL left out (they travel in the job's
    environment), whatever the values look like (a value starting with '-' included)."""
    from inlaid_ray.jobs.cli import _ONBOARD_FLAGS, _options
    from inlaid_ray.jobs.submit import job_argv

    given = ["onboard", "--task", "t1", "--tenant", "acme", "--adapter", "rel/adapter", "--calib", "c.jsonl",
             "--artifact-dir", "art", "--namespace=-ns", "--admin-key=-secret", "--redis-url",
             "redis://:pw@host:6379/0", "--requantize", "never", "--max-rank", "32", "--no-ray", "--submit"]
    args = _parser().parse_args(given)
    argv = job_argv(args, tuple(_ONBOARD_FLAGS))
    assert not any("secret" in a or "pw@" in a for a in argv) and "--no-progress" in argv
    back = _parser().parse_args(["onboard", *argv])
    assert back.adapter == str((Path.cwd() / "rel/adapter").resolve()) and back.tenant == "acme"
    want = _options(args).model_copy(update={"admin_key": None, "redis_url": None, "progress": False,
                                            "artifact_dir": str(Path("art").resolve())})
    assert _options(back) == want
