"""The latest routing stats of each running engine replica, as Serve last broadcast them to this
process's request router (about every `request_routing_stats_period_s`).

Process-wide because Serve builds the request router itself: the router publishes
(`request_router.ClusterAffinityRouter.update_replicas`), the ingress of the same process reads
(`Router._take_published_stats`). A publish replaces a deployment's whole mapping in one
assignment, so a reader never sees half an update.
"""

from __future__ import annotations

from typing import Any


class RoutingStatsBoard:
    """Replica stats by replica id, per (application, deployment)."""

    def __init__(self) -> None:
        self._by_deployment: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def publish(self, app: str, deployment: str, stats: dict[str, dict[str, Any]]) -> None:
        """Replace the stats of `deployment`'s running replicas (by replica id)."""
        self._by_deployment[(app, deployment)] = stats

    def read(self, app: str, deployment: str) -> dict[str, dict[str, Any]] | None:
        """The last published stats by replica id; None until a request router has published."""
        return self._by_deployment.get((app, deployment))


ROUTING_STATS = RoutingStatsBoard()
