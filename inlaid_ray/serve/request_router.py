"""Cluster-affinity request routing for the replica deployment (a Ray Serve `RequestRouter`,
referenced by import path in the deployment's RequestRouterConfig).

Ranking of the replicas Ray offers (only running, healthy replicas; the list is re-read on
every call, never cached here):
1. replicas holding the request's cluster (its multiplexed model id: loaded or loading per
   the replica's pushed multiplexed ids or routing stats, or sent that cluster by this router
   within `affinity_hint_s`, which covers the ~0.1 s before a new load is reported), least
   predicted outstanding work first;
2. every other replica, least outstanding work first, then fewest resident clusters (an empty
   replica takes a new cluster rather than evicting one elsewhere); when the cluster capacity
   per replica is known, replicas with a free cluster slot go before full ones unless that
   costs more than `imbalance_tokens` of outstanding work (an eviction costs a reload later).
If the best holder has more than `imbalance_tokens` more outstanding work than the best other
replica, that other replica goes first: a hot cluster spreads instead of queueing.
Each rank holds one replica, so Ray tries them strictly in this order and moves on only when
a replica's queue is full. A request's `avoid_replicas` are left out while any other replica
runs (the onboarding probe's walk over every replica; a busy unvisited replica is waited for).
Outstanding work of a replica = max(its last reported `predicted_outstanding_tokens`, what
this router sent it and has not seen complete), so a fresh burst counts before the next stats
report and other routers' load counts through stats.

Every broadcast of the running replicas (Serve sends one whenever a replica's routing stats
change, about every `request_routing_stats_period_s`) is also published on `ROUTING_STATS`, the
process's board the ingress reads for its engine gauges (`serve/routing_stats_board.py`), so
/metrics is as fresh as routing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


@dataclass(frozen=True)
class ReplicaView:
    """What the ranking needs to know about one replica."""

    replica_id: str
    clusters: frozenset[str]  # loaded or loading
    outstanding: float  # predicted tokens of work
    num_clusters: int = 0


def rank_replicas(
    views: Sequence[ReplicaView], cluster: str | None, imbalance_tokens: float, max_clusters: int | None = None
) -> list[str]:
    """Replica ids, most preferred first (see module docstring). Ties keep the input order."""
    holders = sorted((v for v in views if cluster and cluster in v.clusters), key=lambda v: v.outstanding)
    others = sorted((v for v in views if not (cluster and cluster in v.clusters)),
                    key=lambda v: (v.outstanding, v.num_clusters))
    if cluster and max_clusters is not None:
        free = [v for v in others if v.num_clusters < max_clusters]
        full = [v for v in others if v.num_clusters >= max_clusters]
        if free and full and free[0].outstanding - full[0].outstanding <= imbalance_tokens:
            others = free + full
    if holders and others and holders[0].outstanding - others[0].outstanding > imbalance_tokens:
        return [others[0].replica_id] + [v.replica_id for v in holders] + [v.replica_id for v in others[1:]]
    return [v.replica_id for v in holders] + [v.replica_id for v in others]


def unvisited(replica_ids: Sequence[str], avoid: Sequence[str]) -> list[str]:
    """The ids not in `avoid`, or all of them when every one is."""
    avoided = set(avoid)
    rest = [r for r in replica_ids if r not in avoided]
    return rest or list(replica_ids)


class ClusterAffinityRouter(RequestRouter):
    """Prefer replicas holding the cluster, then least predicted outstanding work, then any."""

    affinity_hint_s: float = 5.0
    imbalance_tokens: float = 4096.0
    stats_stale_s: float = 30.0
    max_clusters_per_replica: int | None = None

    def initialize_state(self, affinity_hint_s: float = 5.0, imbalance_tokens: float = 4096.0,
                         stats_stale_s: float = 30.0, max_clusters_per_replica: int | None = None,
                         **kwargs: Any) -> None:
        """Called by Serve with RequestRouterConfig.request_router_kwargs."""
        self.affinity_hint_s = affinity_hint_s
        self.imbalance_tokens = imbalance_tokens
        self.stats_stale_s = stats_stale_s
        self.max_clusters_per_replica = max_clusters_per_replica

    # Per-router bookkeeping, created lazily (Serve builds routers without calling __init__ hooks of ours).
    @property
    def _sent(self) -> dict[str, tuple[str, float]]:  # internal request id -> (replica id, work)
        if not hasattr(self, "_sent_store"):
            self._sent_store: dict[str, tuple[str, float]] = {}
        return self._sent_store

    @property
    def _hints(self) -> dict[str, tuple[str, float]]:  # cluster -> (replica id, time sent)
        if not hasattr(self, "_hints_store"):
            self._hints_store: dict[str, tuple[str, float]] = {}
        return self._hints_store

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        cluster = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        payload = pending_request.args[0] if pending_request is not None and pending_request.args else None
        self._forget_gone(set(by_id))
        by_id = {rid: by_id[rid] for rid in unvisited(list(by_id), getattr(payload, "avoid_replicas", ()))}
        shuffled = list(by_id.values())
        random.shuffle(shuffled)  # equal replicas share the load instead of the first one taking all
        views = [self._view(r, time.time()) for r in shuffled]
        return [[by_id[rid]] for rid in rank_replicas(views, cluster or None, self.imbalance_tokens,
                                                               self.max_clusters_per_replica)]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's broadcast of the running replicas (and their routing stats): publish the stats."""
        super().update_replicas(replicas)
        # Imported here, not at module level: Serve may hand this class over by value, with its
        # own copy of this module's globals, and the ingress must read the board it imports.
        from inlaid_ray.serve.routing_stats_board import ROUTING_STATS

        ROUTING_STATS.publish(self._deployment_id.app_name, self._deployment_id.name,
                              {r.replica_id.unique_id: dict(r.routing_stats) for r in replicas if r.routing_stats})

    def _view(self, replica: RunningReplica, now: float) -> ReplicaView:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        fresh = now - float(stats.get("ts", 0.0)) <= self.stats_stale_s
        clusters = set(replica.multiplexed_model_ids)
        reported = float(stats.get("predicted_outstanding_tokens", 0.0)) if fresh else 0.0
        if fresh:
            clusters.update(stats.get("loaded_clusters", ()))
            clusters.update(stats.get("loading_clusters", ()))
        clusters.update(c for c, (r, t) in self._hints.items() if r == rid and now - t <= self.affinity_hint_s)
        local = sum(work for r, work in self._sent.values() if r == rid)
        return ReplicaView(rid, frozenset(clusters), max(reported, local), len(clusters))

    def _forget_gone(self, live: set[str]) -> None:
        for key in [k for k, (r, _) in self._sent.items() if r not in live]:
            del self._sent[key]
        for key in [k for k, (r, _) in self._hints.items() if r not in live]:
            del self._hints[key]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = replica_id.unique_id
        payload = pending_request.args[0] if pending_request.args else None
        work = float(getattr(payload, "predicted_work", 1.0))
        self._sent[pending_request.metadata.internal_request_id] = (rid, work)
        cluster = pending_request.metadata.multiplexed_model_id
        if cluster:
            self._hints[cluster] = (rid, time.time())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._sent.pop(internal_request_id, None)
