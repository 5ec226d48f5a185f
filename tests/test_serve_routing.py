"""Cluster-affinity ranking of replicas (pure logic of ClusterAffinityRouter): holders first by
outstanding work, then the rest by work and resident clusters, spill-over past the imbalance
threshold, base-model requests by work alone, and the probe walk's avoided replicas.
Expected orders are derived from the inputs."""

from __future__ import annotations

import itertools

import pytest

from inlaid_ray.serve.request_router import ReplicaView, rank_replicas, unvisited


def _views(spec: dict[str, tuple[set[str], float]]) -> list[ReplicaView]:
    return [ReplicaView(rid, frozenset(clusters), work, len(clusters)) for rid, (clusters, work) in spec.items()]


def test_holder_wins_even_when_busier_within_threshold():
    views = _views({"a": ({"c1"}, 300.0), "b": (set(), 0.0), "c": ({"c2"}, 10.0)})
    ranked = rank_replicas(views, "c1", imbalance_tokens=1000)
    assert ranked[0] == "a"
    assert sorted(ranked) == ["a", "b", "c"]  # every replica stays reachable ("then any")


def test_holders_ordered_by_outstanding_work():
    views = _views({"a": ({"c1"}, 50.0), "b": ({"c1"}, 5.0), "c": (set(), 0.0)})
    assert rank_replicas(views, "c1", imbalance_tokens=1000) == ["b", "a", "c"]


def test_new_cluster_prefers_idle_replica_with_fewest_clusters():
    views = _views({"a": ({"c1"}, 0.0), "b": (set(), 0.0)})
    assert rank_replicas(views, "c2", imbalance_tokens=1000) == ["b", "a"]


def test_spill_over_when_holder_is_far_busier():
    views = _views({"a": ({"c1"}, 5000.0), "b": (set(), 100.0), "c": (set(), 900.0)})
    threshold = 1000.0
    assert 5000.0 - 100.0 > threshold
    assert rank_replicas(views, "c1", threshold) == ["b", "a", "c"]
    # Just under the threshold the holder keeps the request.
    assert rank_replicas(views, "c1", 5000.0 - 100.0)[0] == "a"


def test_a_free_cluster_slot_beats_evicting_unless_it_costs_more_than_the_imbalance():
    # b holds c2 and is full (1 cluster per replica); c is empty but slightly busier.
    views = _views({"b": ({"c2"}, 0.0), "c": (set(), 50.0)})
    assert rank_replicas(views, "c1", imbalance_tokens=100.0, max_clusters=1) == ["c", "b"]
    assert rank_replicas(views, "c1", imbalance_tokens=100.0) == ["b", "c"]  # capacity unknown: work only
    assert rank_replicas(views, "c1", imbalance_tokens=10.0, max_clusters=1) == ["b", "c"]  # too costly


def test_base_model_requests_rank_by_work_only():
    views = _views({"a": ({"c1"}, 30.0), "b": ({"c2", "c3"}, 10.0), "c": (set(), 20.0)})
    assert rank_replicas(views, None, imbalance_tokens=0) == ["b", "c", "a"]


@pytest.mark.parametrize("cluster", ["c1", "c2", None])
def test_ranking_is_a_permutation_and_respects_order_rules(cluster):
    works = [0.0, 10.0, 10.0, 40.0]
    clusters = [{"c1"}, set(), {"c1", "c2"}, {"c2"}]
    for perm in itertools.permutations(range(4)):
        views = [ReplicaView(f"r{i}", frozenset(clusters[i]), works[i], len(clusters[i])) for i in perm]
        ranked = rank_replicas(views, cluster, imbalance_tokens=1e9)
        assert sorted(ranked) == sorted(v.replica_id for v in views)
        by_id = {v.replica_id: v for v in views}
        holders = [r for r in ranked if cluster in by_id[r].clusters]
        assert ranked[: len(holders)] == holders  # holders strictly first
        for group in (holders, ranked[len(holders):]):
            loads = [by_id[r].outstanding for r in group]
            assert loads == sorted(loads)


def test_avoided_replicas_are_passed_over_until_none_is_left():
    ids = ["r0", "r1", "r2"]
    assert unvisited(ids, ()) == ids
    assert unvisited(ids, ("r1",)) == ["r0", "r2"]
    assert unvisited(ids, ("r0", "r2", "gone")) == ["r1"]  # a replica that left does not matter
    # every one visited: all are candidates again, so the answer repeats a seen replica and the walk ends
    assert unvisited(ids, ("r2", "r0", "r1")) == ids
