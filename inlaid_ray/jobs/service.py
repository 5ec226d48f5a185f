"""The serving process the onboarding job talks to, as `inlaid-ray serve` recorded it in the
registry (serve/launcher.py), with records left behind by a crashed server recognised."""

from __future__ import annotations

import logging
import socket
from typing import Any

import psutil

from inlaid_ray.registry import ServiceLocation

log = logging.getLogger(__name__)


def running_service(registry: Any) -> ServiceLocation | None:
    """The recorded service, or None when there is none or the record is stale: written on this
    host by a process that no longer runs (a server that crashed, or was killed, before it could
    remove its record). A record from another host is taken as it is."""
    location = registry.service_location()
    if location is None:
        return None
    if location.host == socket.gethostname() and not psutil.pid_exists(location.pid):
        log.warning("ignoring the service record of %s: its process %d on this host is gone", location.url,
                    location.pid)
        return None
    return location
