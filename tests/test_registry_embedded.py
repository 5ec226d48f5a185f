"""The embedded redis-server: data survives restarts (clean and SIGKILL), processes on one
machine share one server, concurrent first starts do not race, the last lease stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import redis

from inlaid_ray.registry import ClusterRecord, EmbeddedRedis, TaskRecord, TaskRegistry, connect_redis
from inlaid_ray.registry.embedded import AOF_FILENAME, DB_FILENAME, LEASE_PREFIX

# A second process: connect to the shared server of argv[1], report, then obey stdin lines.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from inlaid_ray.registry import TaskRecord, TaskRegistry, connect_redis
    client = connect_redis(None, Path(sys.argv[1]))
    registry = TaskRegistry(client, namespace="shared")
    print(json.dumps({"pid": client.server_pid}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "put":
            registry.upsert_task(TaskRecord(name=cmd[1], tenant="acme", adapter_uri="file:///" + cmd[1]))
            print(json.dumps({"ok": True}), flush=True)
        elif cmd[0] == "get":
            task = registry.get_task(cmd[1])
            print(json.dumps({"uri": None if task is None else task.adapter_uri}), flush=True)
        elif cmd[0] == "close":
            client.close()
            print(json.dumps({"closed": True}), flush=True)
            break
    """
)


class _Child:
    """A helper process holding a connection to the embedded server of `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(data_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"child exited early with {self.proc.wait(timeout=30)}"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        assert self.ask("close") == {"closed": True}
        assert self.proc.wait(timeout=60) == 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid):
        assert time.monotonic() < deadline, f"redis-server pid {pid} still running after {timeout_s}s"
        time.sleep(0.02)


def _task(name: str) -> TaskRecord:
    return TaskRecord(name=name, tenant="acme", adapter_uri=f"file:///{name}")


def test_data_survives_clean_restart(tmp_path):
    client = connect_redis(None, tmp_path)
    pid = client.server_pid
    written = TaskRegistry(client).upsert_task(_task("sql"))
    client.close()
    assert _gone(pid)  # close() of the last lease waited for the server to exit
    assert (tmp_path / AOF_FILENAME).exists()
    client = connect_redis(None, tmp_path)
    assert client.server_pid != pid
    assert TaskRegistry(client).get_task("sql") == written
    client.close()


def test_data_survives_killed_server(tmp_path):
    client = connect_redis(None, tmp_path)
    written = TaskRegistry(client).upsert_cluster(ClusterRecord("c0", bank_uri="file:///bank"))
    pid = client.server_pid
    os.kill(pid, signal.SIGKILL)  # no shutdown hook runs: only the fsynced AOF remains
    _wait_gone(pid)
    client.close()  # the lease release finds the server gone and only logs it
    client = connect_redis(None, tmp_path)
    assert TaskRegistry(client).get_cluster("c0") == written
    client.close()


def test_rdb_only_data_dir_is_loaded_and_converted(tmp_path):
    client = connect_redis(None, tmp_path)
    TaskRegistry(client).upsert_task(_task("old"))
    client.save()  # write registry.rdb next to the AOF
    client.close()
    (tmp_path / AOF_FILENAME).unlink()
    assert (tmp_path / DB_FILENAME).exists()
    client = connect_redis(None, tmp_path)
    assert TaskRegistry(client).get_task("old") is not None
    assert client.config_get("appendonly")["appendonly"] == "yes"
    client.close()


def test_two_processes_share_one_server(tmp_path):
    """The first process starts the server; the second attaches; the server outlives the
    first process and stops only when the last lease is released."""
    child = _Child(tmp_path)
    child_pid = child.read()["pid"]
    parent = connect_redis(None, tmp_path)
    assert parent.server_pid == child_pid
    registry = TaskRegistry(parent, namespace="shared")
    assert child.ask("put from-child") == {"ok": True}
    assert registry.get_task("from-child").adapter_uri == "file:///from-child"
    registry.upsert_task(_task("from-parent"))
    assert child.ask("get from-parent") == {"uri": "file:///from-parent"}
    leases = [c["name"] for c in parent.client_list() if c["name"].startswith(LEASE_PREFIX)]
    assert len(leases) == 2
    child.close()  # not the last lease: the server keeps running
    assert parent.server_pid == child_pid
    assert registry.get_task("from-child") is not None
    parent.close()  # last lease: the server stops
    assert _gone(child_pid)  # close() of the last lease waited for the server to exit


def test_concurrent_first_starts_share_one_server(tmp_path):
    children = [_Child(tmp_path) for _ in range(3)]  # all race to start the server
    pids = {child.read()["pid"] for child in children}
    assert len(pids) == 1, pids
    for child in children:
        child.close()
    _wait_gone(pids.pop())
    assert not (tmp_path / "redis.sock").exists()


def test_long_data_dir_uses_short_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    a = connect_redis(None, deep)
    b = connect_redis(None, deep)
    assert a.paths.socket == b.paths.socket and len(str(a.paths.socket)) < 100
    assert a.server_pid == b.server_pid
    a.set("k", "v")
    assert b.get("k") == "v"
    pid = a.server_pid
    b.close()  # right away: the next release must not still count b's lease
    assert a.get("k") == "v"
    a.close()
    assert _gone(pid)


def test_threads_starting_at_once_share_one_server(tmp_path):
    barrier = threading.Barrier(4)
    clients: list = [None] * 4

    def start(k: int) -> None:
        barrier.wait(timeout=10)
        clients[k] = connect_redis(None, tmp_path)

    threads = [threading.Thread(target=start, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    pids = {c.server_pid for c in clients}
    assert len(pids) == 1, pids
    for c in clients:
        c.close()
    assert _gone(pids.pop())


def test_url_connects_to_the_same_server(tmp_path):
    embedded = connect_redis(None, tmp_path)
    assert isinstance(embedded, EmbeddedRedis)
    plain = connect_redis(embedded.url, tmp_path / "unused")
    assert not isinstance(plain, EmbeddedRedis) and isinstance(plain, redis.Redis)
    assert plain.info("server")["process_id"] == embedded.server_pid
    assert not (tmp_path / "unused").exists()
    plain.close()
    embedded.close()
