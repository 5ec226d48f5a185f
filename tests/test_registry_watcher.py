"""RegistryWatcher against a real embedded redis-server: the cache follows events, repairs
itself by snapshots, never resurrects a retired task, and survives a dropped connection."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from inlaid_ray.registry import (
    BaseVersion,
    ClusterRecord,
    RegistryWatcher,
    TaskRecord,
    TaskRegistry,
    connect_redis,
)
from inlaid_ray.registry.records import to_json

WAIT_S = 20.0  # upper bound for a background update to land; never a timing assertion


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    client = connect_redis(None, tmp_path_factory.mktemp("watcher-redis"))
    yield client
    client.close()


@pytest.fixture
def registry(server) -> TaskRegistry:
    return TaskRegistry(server, namespace=f"w{uuid.uuid4().hex[:10]}")


def _task(name: str = "sql", tenant: str = "acme") -> TaskRecord:
    return TaskRecord(name=name, tenant=tenant, adapter_uri=f"file:///adapters/{name}")


def _onboard(registry: TaskRegistry, name: str, cluster_version: int) -> TaskRecord:
    """Onboard `name` into cluster c0, whose bank moves to `cluster_version`."""
    task = registry.begin_onboarding(_task(name))
    members = registry.get_cluster("c0").members if cluster_version > 1 else ()
    cluster = ClusterRecord("c0", version=cluster_version, members=members)
    return registry.commit_onboarding(task, cluster, BaseVersion(1, "file:///base/v1"))


def test_cache_follows_events(registry):
    seen = []
    with RegistryWatcher(registry, refresh_interval_s=3600, on_event=seen.append) as watcher:
        assert watcher.tasks() == [] and watcher.base_version is None
        live = _onboard(registry, "sql", 1)
        assert watcher.wait_for(lambda w: w.live_task("sql") is not None, WAIT_S)
        assert watcher.get_task("sql") == live == registry.get_task("sql")
        assert watcher.get_cluster("c0") == registry.get_cluster("c0")
        assert watcher.base_version == registry.current_base_version()
        retired = registry.retire("sql")
        assert watcher.wait_for(lambda w: w.revision >= retired.revision, WAIT_S)
        assert watcher.live_task("sql") is None and watcher.get_task("sql") == retired
        assert watcher.get_cluster("c0").members == ()
        assert watcher.num_refreshes == 1  # everything above came from events
        assert [e.revision for e in seen] == sorted(e.revision for e in seen)


def test_retired_is_never_undone_by_an_older_snapshot(registry):
    live = _onboard(registry, "sql", 1)
    watcher = RegistryWatcher(registry, refresh_interval_s=3600)
    stale = registry.snapshot()  # taken while "sql" is live
    with watcher:
        assert watcher.live_task("sql") == live
        retired = registry.retire("sql")
        assert watcher.wait_for(lambda w: w.get_task("sql").status == "retired", WAIT_S)
        watcher.apply_snapshot(stale)  # a refresh that was read before the retire lands late
        assert watcher.live_task("sql") is None and watcher.get_task("sql") == retired
        # Re-applying the old live event is ignored as well.
        from inlaid_ray.registry import TaskAdded

        assert watcher.apply(TaskAdded(task=live, revision=live.revision)) is False
        assert watcher.live_task("sql") is None


def test_removed_cluster_is_not_resurrected_by_older_snapshot(registry):
    registry.upsert_cluster(ClusterRecord("c9", version=1))
    stale = registry.snapshot()
    with RegistryWatcher(registry, refresh_interval_s=3600) as watcher:
        assert watcher.get_cluster("c9") is not None
        registry.delete_cluster("c9")
        assert watcher.wait_for(lambda w: w.get_cluster("c9") is None, WAIT_S)
        watcher.apply_snapshot(stale)
        assert watcher.get_cluster("c9") is None
        watcher.refresh()  # a current snapshot clears the tombstone and agrees
        assert watcher.get_cluster("c9") is None and watcher.clusters() == registry.list_clusters()


def test_refresh_repairs_missed_events(registry, server):
    """A write that published no event (an external tool, or a lost message) shows up after
    the next periodic snapshot."""
    with RegistryWatcher(registry, refresh_interval_s=0.2) as watcher:
        rev = server.incr(f"{registry.namespace}:rev")
        silent = replace(_task("quiet"), status="live", revision=rev)
        server.hset(f"{registry.namespace}:tasks", "quiet", to_json(silent))
        assert watcher.wait_for(lambda w: w.live_task("quiet") is not None, WAIT_S)
        assert watcher.get_task("quiet") == silent and watcher.num_events == 0
        # And removal behind its back: a snapshot no longer holding the task drops it.
        server.hdel(f"{registry.namespace}:tasks", "quiet")
        server.incr(f"{registry.namespace}:rev")
        assert watcher.wait_for(lambda w: w.get_task("quiet") is None, WAIT_S)


def test_manual_refresh_without_thread(registry):
    watcher = RegistryWatcher(registry)
    _onboard(registry, "sql", 1)
    assert watcher.get_task("sql") is None
    assert watcher.refresh() == registry.revision()
    assert watcher.tasks() == registry.list_tasks() and watcher.base_version == registry.current_base_version()


def test_watcher_resubscribes_after_connection_is_killed(registry, server):
    with RegistryWatcher(registry, refresh_interval_s=3600, poll_s=0.05) as watcher:
        _onboard(registry, "a", 1)
        assert watcher.wait_for(lambda w: w.live_task("a") is not None, WAIT_S)
        killed = server.client_kill_filter(_type="pubsub")
        assert killed >= 1
        # Events published while it is down are recovered by the refresh after resubscribing.
        _onboard(registry, "b", 2)
        assert watcher.wait_for(lambda w: w.live_task("b") is not None, WAIT_S)
        assert watcher.num_resyncs + watcher.num_errors >= 1
        _onboard(registry, "c", 3)  # and events flow again afterwards
        assert watcher.wait_for(lambda w: w.live_task("c") is not None, WAIT_S)
        assert watcher.tasks() == registry.list_tasks()
