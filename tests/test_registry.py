"""Task registry against a real embedded redis-server: CRUD, atomic transitions under
concurrency, all-or-nothing onboarding commits, ordered rollout events, API keys."""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import replace

import pytest
import redis

from inlaid_ray.errors import TaskNotFound
from inlaid_ray.registry import (
    BaseVersion,
    BaseVersionChanged,
    ClusterRecord,
    ClusterRemoved,
    ClusterUpdated,
    TaskAdded,
    TaskRecord,
    TaskRegistry,
    TaskRetired,
    TaskUpdated,
    connect_redis,
    decode_event,
    encode_event,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    client = connect_redis(None, tmp_path_factory.mktemp("registry-redis"))
    yield client
    client.close()


@pytest.fixture
def registry(server) -> TaskRegistry:
    """A registry in a fresh namespace on the shared module server."""
    return TaskRegistry(server, namespace=f"t{uuid.uuid4().hex[:10]}")


def _task(name: str = "sql", tenant: str = "acme", **kw) -> TaskRecord:
    kw.setdefault("adapter_uri", f"file:///adapters/{name}")
    return TaskRecord(name=name, tenant=tenant, base_model="SmolLM2-135M-Instruct", rank=8,
                      target_modules=("q_proj", "v_proj"), **kw)


def _drain(sub, n: int, timeout: float = 10.0) -> list:
    events = []
    for _ in range(n):
        event = sub.get(timeout=timeout)
        assert event is not None, f"expected {n} events, got {len(events)}: {events}"
        events.append(event)
    return events


def test_task_crud_round_trip(registry):
    assert registry.get_task("sql") is None
    with pytest.raises(TaskNotFound, match="sql"):
        registry.require_task("sql")
    written = registry.upsert_task(_task(extra={"source": "hub", "nested": {"k": [1, 2]}}, adapter_sha256="ab" * 32))
    assert registry.get_task("sql") == written
    assert written.revision == registry.revision()
    assert written.target_modules == ("q_proj", "v_proj") and written.extra["nested"] == {"k": [1, 2]}
    # A rewrite keeps created_at and moves updated_at/revision forward.
    again = registry.upsert_task(replace(written, rank=16, created_at=0.0))
    assert again.created_at == written.created_at and again.rank == 16 and again.revision == written.revision + 1
    registry.upsert_task(_task("chat", tenant="acme", status="live"))
    registry.upsert_task(_task("poem", tenant="other", status="failed"))
    assert [t.name for t in registry.list_tasks()] == ["chat", "poem", "sql"]
    assert [t.name for t in registry.list_tasks(tenant="acme")] == ["chat", "sql"]
    assert [t.name for t in registry.list_tasks(status="live")] == ["chat"]
    assert [t.name for t in registry.list_tasks(tenant="acme", status=["onboarding", "failed"])] == ["sql"]
    with pytest.raises(ValueError, match="bogus"):
        registry.list_tasks(status="bogus")


def test_values_are_plain_json(registry, server):
    registry.upsert_task(_task())
    raw = server.hget(f"{registry.namespace}:tasks", "sql")
    assert raw.startswith("{") and '"adapter_uri":"file:///adapters/sql"' in raw


def test_record_validation_names_the_value():
    with pytest.raises(ValueError, match="'bad name'"):
        _task("bad name")
    with pytest.raises(ValueError, match="'paused'"):
        _task(status="paused")


def test_clusters_and_base_versions_crud(registry):
    assert registry.current_base_version() is None
    c = registry.upsert_cluster(ClusterRecord("c0", bank_uri="file:///banks/c0/v1", version=1))
    assert registry.get_cluster("c0") == c and registry.list_clusters() == [c]
    b1 = registry.add_base_version(BaseVersion(1, "file:///base/v1"))
    b2 = registry.add_base_version(BaseVersion(2, "file:///base/v2"), make_current=False)
    assert registry.current_base_version() == b1
    assert registry.get_base_version(2) == b2 and [b.version for b in registry.list_base_versions()] == [1, 2]
    with pytest.raises(ValueError, match="base version 1 already exists"):
        registry.add_base_version(BaseVersion(1, "file:///other"))
    assert registry.set_current_base_version(2).uri == "file:///base/v2"
    assert registry.current_base_version().version == 2
    assert registry.delete_cluster("c0") is True and registry.get_cluster("c0") is None
    assert registry.delete_cluster("c0") is False


def test_transition_rules(registry):
    with pytest.raises(TaskNotFound):
        registry.transition("nope", ("onboarding",), "live")
    registry.upsert_task(_task())
    assert registry.transition("sql", ("live",), "failed") is None  # precondition not met
    assert registry.get_task("sql").status == "onboarding"
    moved = registry.transition("sql", ("onboarding",), "live", rank=4)
    assert moved.status == "live" and moved.rank == 4 and registry.get_task("sql") == moved
    with pytest.raises(ValueError, match="name"):
        registry.transition("sql", ("live",), "failed", name="other")
    with pytest.raises(ValueError, match="paused"):
        registry.transition("sql", ("live",), "paused")


@pytest.mark.parametrize("rounds", [20])
def test_concurrent_transitions_exactly_one_wins(registry, server, rounds):
    """Two clients race the same transition from two threads; exactly one succeeds."""
    clients = [redis.Redis(unix_socket_path=server.paths.socket.as_posix(), decode_responses=True) for _ in range(2)]
    racers = [TaskRegistry(c, namespace=registry.namespace) for c in clients]
    for i in range(rounds):
        name = f"task{i}"
        registry.upsert_task(_task(name))
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def race(k: int) -> None:
            barrier.wait(timeout=10)
            results[k] = racers[k].transition(name, ("onboarding",), "live" if k == 0 else "failed")

        threads = [threading.Thread(target=race, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, f"round {i}: {results}"
        assert registry.get_task(name).status == winners[0].status
    for c in clients:
        c.close()


class _Rendezvous(TaskRegistry):
    """Holds each transaction between its reads and EXEC until the other racer got there
    too, so both read the same state and one EXEC must abort (the WATCH path, always)."""

    def __init__(self, client, namespace: str, barrier: threading.Barrier) -> None:
        super().__init__(client, namespace=namespace)
        self.barrier, self.calls = barrier, 0

    def _before_exec(self, op: str) -> None:
        self.calls += 1
        if self.calls == 1:
            self.barrier.wait(timeout=10)


def test_interleaved_transitions_conflict_and_one_wins(registry, server):
    registry.upsert_task(_task())
    barrier = threading.Barrier(2)
    racers = [_Rendezvous(server, registry.namespace, barrier) for _ in range(2)]
    results: list = [None, None]
    def race(k: int) -> None:
        results[k] = racers[k].transition("sql", ("onboarding",), "live")

    threads = [threading.Thread(target=race, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(r is not None for r in results) == 1, results
    # Both passed their reads with the same state; the loser's EXEC aborted and its retry saw "live".
    assert [r.calls for r in racers] == [1, 1]
    assert registry.revision() == 2


class _InjectWrite(TaskRegistry):
    """Runs `inject()` (a write through another client) between reads and EXEC, once."""

    def __init__(self, client, namespace: str, inject, max_attempts: int = 100) -> None:
        super().__init__(client, namespace=namespace, max_attempts=max_attempts)
        self.inject, self.injected = inject, False

    def _before_exec(self, op: str) -> None:
        if not self.injected:
            self.injected = True
            self.inject()


def _setup_onboarding(registry):
    registry.add_base_version(BaseVersion(1, "file:///base/v1"))
    registry.upsert_cluster(ClusterRecord("c0", bank_uri="file:///banks/c0/v1", version=1, members=("old",)))
    return registry.begin_onboarding(_task())


def test_commit_onboarding_is_one_transaction(registry):
    task = _setup_onboarding(registry)
    sub = registry.subscribe()
    committed = registry.commit_onboarding(
        task, ClusterRecord("c0", bank_uri="file:///banks/c0/v2", version=2, members=("old",)),
        BaseVersion(2, "file:///base/v2"),
    )
    assert committed.status == "live" and committed.cluster == "c0"
    snap = registry.snapshot()
    # Task, cluster and base version all carry the one revision of the commit.
    assert snap.revision == committed.revision
    assert snap.tasks["sql"] == committed
    assert snap.clusters["c0"].members == ("old", "sql") and snap.clusters["c0"].version == 2
    assert snap.clusters["c0"].revision == committed.revision == snap.base_version.revision
    assert snap.base_version.uri == "file:///base/v2"
    events = _drain(sub, 3)
    assert [type(e) for e in events] == [BaseVersionChanged, ClusterUpdated, TaskAdded]
    assert {e.revision for e in events} == {committed.revision}
    assert events[2].task == committed and events[1].cluster == snap.clusters["c0"]
    sub.close()
    # A second commit of the same task finds it live, not onboarding: refused, nothing written.
    assert registry.commit_onboarding(task, ClusterRecord("c0", version=3), BaseVersion(2, "file:///base/v2")) is None
    assert registry.revision() == committed.revision


def test_commit_onboarding_aborts_whole_when_watched_key_changes(registry, server):
    """A concurrent write lands between the commit's reads and EXEC; with no retry allowed,
    none of the commit's writes or events may be visible."""
    task = _setup_onboarding(registry)
    other = TaskRegistry(redis.Redis(unix_socket_path=server.paths.socket.as_posix(), decode_responses=True),
                         namespace=registry.namespace)
    concurrent = ClusterRecord("c0", bank_uri="file:///banks/c0/v1b", version=1, members=("old",))
    committer = _InjectWrite(server, registry.namespace, lambda: other.upsert_cluster(concurrent), max_attempts=1)
    before = registry.snapshot()
    sub = registry.subscribe()
    with pytest.raises(redis.WatchError):
        committer.commit_onboarding(
            task, ClusterRecord("c0", bank_uri="file:///banks/c0/v2", version=2, members=("old",)),
        BaseVersion(2, "file:///base/v2"),
        )
    after = registry.snapshot()
    assert after.revision == before.revision + 1  # only the concurrent write
    assert after.tasks == before.tasks  # still onboarding, untouched
    assert after.base_version == before.base_version
    assert after.clusters["c0"].bank_uri == "file:///banks/c0/v1b" and after.clusters["c0"].members == ("old",)
    # Events: only the concurrent write's, then our sentinel; no event of the aborted commit.
    registry.publish(ClusterRemoved(cluster_id="sentinel", revision=-1))
    events = _drain(sub, 2)
    assert isinstance(events[0], ClusterUpdated) and events[0].cluster.bank_uri == "file:///banks/c0/v1b"
    assert events[1] == ClusterRemoved(cluster_id="sentinel", revision=-1)
    sub.close()
    other.client.close()


def test_commit_onboarding_retries_without_losing_the_concurrent_write(registry, server):
    task = _setup_onboarding(registry)
    other = TaskRegistry(redis.Redis(unix_socket_path=server.paths.socket.as_posix(), decode_responses=True),
                         namespace=registry.namespace)
    committer = _InjectWrite(server, registry.namespace, lambda: other.upsert_task(_task("chat", status="live")))
    committed = committer.commit_onboarding(
        task, ClusterRecord("c0", bank_uri="file:///banks/c0/v2", version=2, members=("old",)),
        BaseVersion(2, "file:///base/v2"),
    )
    assert committer.injected and committed is not None
    snap = registry.snapshot()
    assert snap.tasks["chat"].status == "live" and snap.tasks["sql"] == committed
    assert snap.tasks["chat"].revision == committed.revision - 1
    other.client.close()


def test_commit_onboarding_refuses_stale_cluster_or_base_and_writes_nothing(registry):
    task = _setup_onboarding(registry)
    rev = registry.revision()
    with pytest.raises(ValueError, match="commit version 1 is not newer than stored version 1"):
        registry.commit_onboarding(task, ClusterRecord("c0", version=1), BaseVersion(1, "file:///base/v1"))
    with pytest.raises(ValueError, match="base version 0 is older than current 1"):
        registry.commit_onboarding(task, ClusterRecord("c0", version=2), BaseVersion(0, "file:///base/v0"))
    with pytest.raises(ValueError, match="differs from stored"):
        registry.commit_onboarding(task, ClusterRecord("c0", version=2), BaseVersion(1, "file:///elsewhere"))
    assert registry.revision() == rev and registry.get_task("sql").status == "onboarding"


def test_onboarding_lifecycle_and_retire(registry):
    task = registry.begin_onboarding(_task())
    assert task.status == "onboarding" and task.version == 1
    assert registry.begin_onboarding(_task()) is None  # someone is already onboarding it
    with pytest.raises(PermissionError, match="belongs to tenant 'acme'"):
        registry.begin_onboarding(_task(tenant="mallory"))
    failed = registry.fail_onboarding("sql", "calibration data empty")
    assert failed.status == "failed" and failed.extra["error"] == "calibration data empty"
    task = registry.begin_onboarding(_task())
    assert task.version == 2 and task.created_at == failed.created_at
    live = registry.commit_onboarding(task, ClusterRecord("c1", version=1), BaseVersion(1, "file:///base/v1"))
    assert registry.get_cluster("c1").members == ("sql",)
    retired = registry.retire("sql")
    assert retired.status == "retired" and retired.revision > live.revision
    assert registry.get_cluster("c1").members == ()
    assert registry.retire("sql") is None


def test_events_delivered_in_order_with_revisions(registry):
    sub = registry.subscribe()
    expected = []
    t = registry.begin_onboarding(_task())
    expected.append((TaskUpdated, t.revision))
    c = registry.upsert_cluster(ClusterRecord("c0", version=1))
    expected.append((ClusterUpdated, c.revision))
    live = registry.commit_onboarding(t, ClusterRecord("c0", version=2), BaseVersion(1, "file:///b1"))
    expected += [(BaseVersionChanged, live.revision), (ClusterUpdated, live.revision), (TaskAdded, live.revision)]
    retired = registry.retire("sql")
    expected += [(TaskRetired, retired.revision), (ClusterUpdated, retired.revision)]
    removed = registry.delete_cluster("c0")
    assert removed
    expected.append((ClusterRemoved, registry.revision()))
    events = _drain(sub, len(expected))
    assert [(type(e), e.revision) for e in events] == expected
    assert events[5].task == registry.get_task("sql")
    assert sub.get(timeout=0.05) is None  # nothing else was published
    sub.close()


def test_event_json_round_trip():
    task = _task()
    for event in (TaskAdded(task=task, revision=3), ClusterRemoved(cluster_id="c0", revision=4),
                  BaseVersionChanged(base=BaseVersion(1, "u"), revision=5)):
        text = encode_event(event)
        assert decode_event(text) == event and f'"type":"{event.type}"' in text
    with pytest.raises(ValueError, match="unknown registry event type 'nope'"):
        decode_event('{"type":"nope","revision":1}')


def test_api_keys_store_only_hashes(registry, server):
    registry.add_tenant("acme")
    registry.add_tenant("root", admin=True)
    digest = registry.add_api_key("acme", "sk-acme-secret")
    registry.add_api_key("root", "sk-root-secret")
    assert digest == hashlib.sha256(b"sk-acme-secret").hexdigest()
    dump = {k: server.dump(k) for k in server.scan_iter(f"{registry.namespace}:*")}
    assert not any(b"sk-acme-secret" in v or b"sk-root-secret" in v for v in dump.values())
    assert registry.tenant_for_key("sk-acme-secret") == "acme"
    assert registry.tenant_for_key("sk-acme-secreT") is None
    assert registry.tenant_for_key("") is None and registry.tenant_for_key(None) is None
    assert registry.is_admin_key("sk-root-secret") and not registry.is_admin_key("sk-acme-secret")
    assert registry.add_api_key("acme", "sk-acme-secret") == digest  # idempotent
    with pytest.raises(ValueError, match="another tenant"):
        registry.add_api_key("root", "sk-acme-secret")
    with pytest.raises(ValueError, match="'ghost' does not exist"):
        registry.add_api_key("ghost", "sk-ghost")
    assert registry.revoke_api_key("sk-acme-secret") and registry.tenant_for_key("sk-acme-secret") is None
    registry.bootstrap_keys("demo", admin_key="let-me-in", tenant="demo")
    assert registry.bootstrap_keys("demo", admin_key="let-me-in", tenant="demo") == []  # idempotent
    assert registry.tenant_for_key("demo") == "demo" and registry.is_admin_key("let-me-in")
    assert [t.name for t in registry.list_tenants()] == ["acme", "admin", "demo", "root"]
    # A restart with other configured keys: the old ones stop working, API-added keys stay.
    revoked = registry.bootstrap_keys("demo-2", admin_key="rotated-admin", tenant="demo")
    assert sorted(revoked) == sorted(hashlib.sha256(k).hexdigest() for k in (b"demo", b"let-me-in"))
    assert registry.tenant_for_key("demo") is None and not registry.is_admin_key("let-me-in")
    assert registry.tenant_for_key("demo-2") == "demo" and registry.is_admin_key("rotated-admin")
    assert registry.is_admin_key("sk-root-secret")
    assert registry.bootstrap_keys(None) == []  # nothing configured (no environment): nothing revoked
    assert registry.tenant_for_key("demo-2") == "demo" and registry.is_admin_key("rotated-admin")
    assert [t.name for t in registry.list_tenants()] == ["acme", "admin", "demo", "root"]
    # The same configured key for another tenant (`serve` then `serve --demo`): it moves.
    assert registry.bootstrap_keys("demo-2", tenant="default") == []
    assert registry.tenant_for_key("demo-2") == "default" and registry.is_admin_key("rotated-admin")


def test_subscription_reports_a_silent_reconnect(registry, server):
    from inlaid_ray.registry import EventsMissed

    sub = registry.subscribe()
    assert server.client_kill_filter(_type="pubsub") >= 1
    with pytest.raises(EventsMissed, match=registry.channel):
        sub.get(timeout=10)
    registry.upsert_cluster(ClusterRecord("c0"))  # usable again afterwards
    assert isinstance(sub.get(timeout=10), ClusterUpdated)
    sub.close()


def test_create_task_is_atomic_and_replaces_only_retired(registry):
    """Of concurrent creators of one name exactly one wins; a retired record is replaced with a
    higher version; a live or onboarding one is never overwritten."""

    results = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        results.append(registry.create_task(TaskRecord(name="racy", tenant="t", adapter_uri=f"file:///{i}",
                                                        status="live")))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and registry.get_task("racy").adapter_uri == winners[0].adapter_uri
    onboarding = registry.upsert_task(TaskRecord(name="job", tenant="t", adapter_uri="file:///job"))
    assert registry.create_task(TaskRecord(name="job", tenant="t", adapter_uri="file:///x", status="live")) is None
    assert registry.get_task("job") == onboarding
    registry.retire("racy")
    again = registry.create_task(TaskRecord(name="racy", tenant="t", adapter_uri="file:///new", status="live"))
    assert again is not None and again.version == winners[0].version + 1 and again.status == "live"


def test_a_service_record_left_by_a_dead_process_is_ignored(registry):
    """`inlaid-ray serve` records where it answers; the onboarding job trusts a record from a
    live process (or from another host) and falls back when its writer on this host is gone."""
    import os
    import socket
    import subprocess
    import sys

    from inlaid_ray.jobs.onboard_args import AUTO_ENDPOINT, FALLBACK_ENDPOINT, probe_endpoint
    from inlaid_ray.jobs.service import running_service
    from inlaid_ray.registry import ServiceLocation

    assert running_service(registry) is None and probe_endpoint(AUTO_ENDPOINT, registry) == FALLBACK_ENDPOINT
    live = ServiceLocation(url="http://127.0.0.1:8123", ray_dashboard="http://127.0.0.1:8265", pid=os.getpid(),
                           host=socket.gethostname())
    registry.set_service_location(live)
    assert running_service(registry) == live and probe_endpoint(AUTO_ENDPOINT, registry) == live.url
    assert probe_endpoint("http://elsewhere:9000", registry) == "http://elsewhere:9000"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    registry.set_service_location(replace(live, pid=int(gone.stdout)))
    assert running_service(registry) is None and probe_endpoint(AUTO_ENDPOINT, registry) == FALLBACK_ENDPOINT
    remote = replace(live, pid=int(gone.stdout), host="another-host")
    registry.set_service_location(remote)
    assert running_service(registry) == remote  # its process cannot be checked from here
    registry.set_service_location(None)
    assert registry.service_location() is None
