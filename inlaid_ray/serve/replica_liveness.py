"""Which engine replicas are alive, so the router drops a dead replica's gauges and routing stats.

Ray Serve names every replica actor `SERVE_REPLICA::<app>#<deployment>#<replica id>` (ReplicaID in
ray/serve/_private/common.py), and Ray lists only live named actors. Blocking (a GCS call): run it
off the event loop.
"""

from __future__ import annotations

import ray

REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


def live_replica_ids(app: str, deployment: str) -> set[str]:
    """The replica ids (the `replica` of routing stats) of `deployment`'s live replicas in `app`."""
    prefix = f"{REPLICA_ACTOR_PREFIX}{app}#{deployment}#"
    names = (actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True))
    return {name[len(prefix):] for name in names if name.startswith(prefix)}
