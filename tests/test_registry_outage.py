"""The registry is not a single point of failure for serving: with the real embedded Redis server
killed, the router's watcher keeps the last known tasks and reports itself disconnected, a key
seen before keeps authenticating (past its cache time), an unknown key and any registry write
get OpenAI's 503 `registry_unavailable` with Retry-After, never a 500; and the serving app's
watcher, which owns the embedded server, starts it again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import psutil
import pytest
import redis

from inlaid_ray.registry import RegistryWatcher, TaskRecord, TaskRegistry, connect_redis
from inlaid_ray.registry.embedded import redis_server_executable
from inlaid_ray.serve.access import Authenticator
from inlaid_ray.serve.http_errors import REGISTRY_ERRORS, OpenAIHTTPError, from_exception
from inlaid_ray.serve.launcher import free_port

pytestmark = pytest.mark.slow  # kills and restarts redis-server processes

POLL_S, POLLS = 0.05, 600  # bounded waits for the watcher thread; never a timing assertion


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    proc = psutil.Process(pid)
    for _ in range(POLLS):
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(POLL_S)
    raise AssertionError(f"redis-server {pid} survived SIGKILL")


def test_serving_state_outlives_a_killed_registry(tmp_path):
    client = connect_redis(None, tmp_path)
    registry = TaskRegistry(client, "outage")
    registry.add_tenant("acme")
    registry.add_api_key("acme", "acme-key")
    live = registry.upsert_task(TaskRecord(name="sql", tenant="acme", adapter_uri="file:///a/sql", status="live"))
    clock = _Clock()
    auth = Authenticator(registry, cache_s=5.0, clock=clock)
    watcher = RegistryWatcher(registry, refresh_interval_s=0.2, poll_s=POLL_S).start()
    try:
        assert asyncio.run(auth.authenticate("Bearer acme-key")).tenant == "acme"
        assert watcher.connected and watcher.get_task("sql") == live

        _kill(client.server_pid)
        clock.now += 60.0  # far past the key's cache time: a lookup is due and fails
        assert asyncio.run(auth.authenticate("Bearer acme-key")).tenant == "acme"  # last known principal
        lookups = []
        lookup = registry.principal_for_key
        registry.principal_for_key = lambda key: lookups.append(key) or lookup(key)  # counts the registry calls
        clock.now += 1.0  # within cache_s of the failed lookup: answered without asking the registry again
        assert asyncio.run(auth.authenticate("Bearer acme-key")).tenant == "acme" and lookups == []
        with pytest.raises(OpenAIHTTPError) as unknown:
            asyncio.run(auth.authenticate("Bearer never-seen"))
        assert unknown.value.status == 503 and unknown.value.body()["error"]["code"] == "registry_unavailable"
        assert unknown.value.headers()["Retry-After"] == "1"

        for _ in range(POLLS):  # the watcher's next refresh fails: it says so and keeps its cache
            if not watcher.connected:
                break
            time.sleep(POLL_S)
        assert not watcher.connected and watcher.get_task("sql") == live

        with pytest.raises(REGISTRY_ERRORS) as write:  # a write (retire, onboarding) cannot happen
            registry.upsert_task(TaskRecord(name="new", tenant="acme", adapter_uri="file:///a/new"))
        err = from_exception(write.value)
        assert (err.status, err.body()["error"]["code"]) == (503, "registry_unavailable")
        assert "127.0.0.1" not in err.body()["error"]["message"] and "sock" not in err.body()["error"]["message"]
    finally:
        watcher.stop()
        client.close()


def test_the_apps_watcher_restarts_a_killed_embedded_server(tmp_path):
    """Supervision (the serving app owns the embedded server): after a SIGKILL the watcher starts
    the server again on its append-only file, nothing acknowledged is lost, writes work again,
    and a short-lived client (the CLI) that attaches and exits leaves it running."""
    client = connect_redis(None, tmp_path)
    registry = TaskRegistry(client, "supervised")
    registry.add_tenant("acme")
    live = registry.upsert_task(TaskRecord(name="sql", tenant="acme", adapter_uri="file:///a/sql", status="live"))
    watcher = RegistryWatcher(registry, refresh_interval_s=0.2, poll_s=POLL_S, supervise=True).start()
    try:
        first = client.server_pid
        _kill(first)
        for _ in range(POLLS):
            if watcher.num_server_restarts and watcher.connected:
                break
            time.sleep(POLL_S)
        assert watcher.num_server_restarts == 1 and watcher.connected
        assert client.server_pid != first
        assert registry.get_task("sql") == live  # from the append-only file
        registry.upsert_task(TaskRecord(name="new", tenant="acme", adapter_uri="file:///a/new", status="live"))
        for _ in range(POLLS):
            if watcher.get_task("new") is not None:
                break
            time.sleep(POLL_S)
        assert watcher.get_task("new") is not None
        cli = connect_redis(None, tmp_path)  # `inlaid-ray tasks list` and the like
        assert cli.ping()
        cli.close()
        assert client.ping() and client.server_pid != first
    finally:
        watcher.stop()
        client.close()
    assert _servers_of(tmp_path) == []  # the last lease stopped it


def test_every_client_takes_its_lease_again_after_a_restart(tmp_path):
    """After a supervised restart a second long-lived client (another replica or router) counts
    again: when the supervisor exits, the server keeps running for it, and its own exit stops it."""
    owner = connect_redis(None, tmp_path)
    other = connect_redis(None, tmp_path)
    other.set("k", "v")
    first = owner.server_pid
    _kill(first)
    assert owner.ensure_server()
    assert other.get("k") == "v"  # its pool reconnects to the new server, and takes its lease again
    owner.close()  # the supervisor's process exits first
    assert _servers_of(tmp_path) != [] and other.ping() and other.server_pid != first
    other.close()
    assert _servers_of(tmp_path) == []  # the last lease stopped it


def test_a_server_that_stops_answering_is_not_restarted_on_top_of_itself(tmp_path):
    """A stopped (SIGSTOP) server accepts connections but answers nothing: supervision must not
    start a second server on its append-only file; once it runs again, nothing is lost."""
    owner = connect_redis(None, tmp_path)
    try:
        owner.set("k", "v")
        pid = owner.server_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            assert owner.ensure_server() is False
            assert _servers_of(tmp_path) == [pid]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert owner.get("k") == "v" and owner.server_pid == pid
    finally:
        owner.close()
    assert _servers_of(tmp_path) == []


def test_a_server_that_stops_answering_does_not_block_the_watcher(tmp_path):
    """With the server stopped (SIGSTOP) a read gives up after the client's socket timeout
    instead of hanging: the watcher reports itself disconnected and keeps serving its cache,
    and it reconnects once the server runs again."""
    client = connect_redis(None, tmp_path, socket_timeout_s=1.0)
    registry = TaskRegistry(client, "hung")
    live = registry.upsert_task(TaskRecord(name="sql", tenant="acme", adapter_uri="file:///a/sql", status="live"))
    watcher = RegistryWatcher(registry, refresh_interval_s=0.2, poll_s=POLL_S, supervise=True).start()
    pid = client.server_pid
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(redis.TimeoutError):
                registry.snapshot()
            for _ in range(POLLS):
                if not watcher.connected:
                    break
                time.sleep(POLL_S)
            assert not watcher.connected and watcher.get_task("sql") == live
            assert _servers_of(tmp_path) == [pid]  # supervision left the stopped server alone
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(POLLS):
            if watcher.connected:
                break
            time.sleep(POLL_S)
        assert watcher.connected and watcher.num_server_restarts == 0 and client.server_pid == pid
    finally:
        watcher.stop()
        client.close()
    assert _servers_of(tmp_path) == []


def test_a_command_to_a_stopped_server_is_tried_once(tmp_path):
    """A timeout is not retried (redis-py's default retry would try 10 times, so one command to
    a stopped server would wait 10 timeouts): counted by the server itself, which accepts the
    connections queued while it was stopped once it runs again."""
    owner = connect_redis(None, tmp_path)
    client = connect_redis(owner.url, tmp_path, socket_timeout_s=0.5)  # a plain client: no lease traffic
    try:
        client.ping()
        pid = owner.server_pid
        before = int(owner.info("stats")["total_connections_received"])
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(redis.TimeoutError):
                client.get("k")
        finally:
            os.kill(pid, signal.SIGCONT)
        client.ping()  # reconnects: one more connection of its own
        after = int(owner.info("stats")["total_connections_received"])
        assert after - before <= 2, after - before  # this reconnect (+ owner's if it reconnected), not ten
    finally:
        client.close()
        owner.close()


def test_a_closed_client_used_again_takes_no_lease(tmp_path):
    """A client used after close() (a thread still running while its owner shuts down) must not
    take a lease nobody will release: the last open client's exit still stops the server."""
    closed = connect_redis(None, tmp_path)
    other = connect_redis(None, tmp_path)
    closed.close()
    closed.set("late", "write")  # a new pooled connection of a closed client
    other.close()
    assert _servers_of(tmp_path) == []
    closed.connection_pool.disconnect()


def _servers_of(data_dir) -> list[int]:
    """Live (not zombie) redis-server processes started for `data_dir`."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "redis-server" in proc.name() and \
                    str(data_dir) in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _start_tcp_redis(data_dir, port: int) -> subprocess.Popen:
    """A standalone redis-server on 127.0.0.1:port (an operator's Redis behind REDIS_URL), append-only."""
    proc = subprocess.Popen([redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = redis.Redis(port=port, socket_connect_timeout=1)
    for _ in range(POLLS):
        try:
            if probe.ping():
                return proc
        except redis.ConnectionError:
            time.sleep(POLL_S)
    proc.kill()
    raise AssertionError("redis-server did not start")


def test_an_external_redis_restart_is_ridden_out_without_loss_or_duplicates(tmp_path):
    """REDIS_URL: the operator's Redis is killed and started again on its append-only file. While it
    is down the watcher serves its last state and writes fail as 503s; once it is back the same
    client reconnects by itself, writes work, and no task is lost or duplicated."""
    port = free_port()
    server = _start_tcp_redis(tmp_path, port)
    client = connect_redis(f"redis://127.0.0.1:{port}/0", tmp_path / "unused")
    registry = TaskRegistry(client, "external")
    registry.add_tenant("acme")
    live = registry.upsert_task(TaskRecord(name="sql", tenant="acme", adapter_uri="file:///a/sql", status="live"))
    watcher = RegistryWatcher(registry, refresh_interval_s=0.2, poll_s=POLL_S).start()
    try:
        _kill(server.pid)
        server.wait()
        for _ in range(POLLS):
            if not watcher.connected:
                break
            time.sleep(POLL_S)
        assert not watcher.connected and watcher.get_task("sql") == live
        with pytest.raises(REGISTRY_ERRORS) as write:
            registry.upsert_task(TaskRecord(name="new", tenant="acme", adapter_uri="file:///a/new", status="live"))
        assert from_exception(write.value).status == 503

        server = _start_tcp_redis(tmp_path, port)
        for _ in range(POLLS):  # the same client object: redis-py reconnects on the next command
            try:
                registry.upsert_task(TaskRecord(name="new", tenant="acme", adapter_uri="file:///a/new", status="live"))
                break
            except REGISTRY_ERRORS:
                time.sleep(POLL_S)
        for _ in range(POLLS):
            if watcher.connected and watcher.get_task("new") is not None:
                break
            time.sleep(POLL_S)
        assert watcher.connected and watcher.get_task("new") is not None
        assert registry.get_task("sql") == live  # acknowledged before the kill: on the append-only file
        assert sorted(t.name for t in registry.list_tasks()) == ["new", "sql"]
    finally:
        watcher.stop()
        client.close()
        server.kill()
        server.wait()
