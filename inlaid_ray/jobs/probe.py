"""Step 7 of onboarding: ask the running service to answer with the staged task on every
replica before it goes live. A probe is a normal OpenAI completion sent with the admin key and
the header `x-inlaid-probe: 1`, which lets the router serve a task that is still `onboarding`
(users get 404 for it until the job marks it live). The router learns about the staged task
from the registry's pub/sub event, so 404 answers are retried until `timeout_s`; so are 503s (a
replica still loading). When the rollout brought a new base version, the answer must come from
a replica running it (response header `x-inlaid-base-version`): replicas load a new base beside
the old one and swap when it is ready, so this is retried as well.

Replicas load adapters and bases lazily, so one answer proves one replica. The job walks them:
each probe names the replicas that already answered in `x-inlaid-probe-avoid`, and the request
router (`ClusterAffinityRouter`) passes those over while any other replica runs. The walk ends
when an answer comes from a replica already seen: no other one is running.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

# The router's header names (inlaid_ray/serve/router.py), repeated so the job does not import Serve.
PROBE_HEADER = "x-inlaid-probe"
PROBE_AVOID_HEADER = "x-inlaid-probe-avoid"
BASE_VERSION_HEADER = "x-inlaid-base-version"
REPLICA_HEADER = "x-inlaid-replica"
_RETRY_STATUSES = frozenset({404, 409, 502, 503, 504})


class ProbeFailed(RuntimeError):
    """The service did not answer the probe correctly within its time."""


@dataclass(frozen=True)
class ProbeSettings:
    """How the onboarding job probes the endpoint."""

    prompt: str = "Say hello."
    max_tokens: int = 4
    timeout_s: float = 120.0  # for the whole walk over the replicas
    poll_s: float = 0.5
    request_timeout_s: float = 60.0
    max_replicas: int = 256  # the walk stops (with a warning) after this many replicas


@dataclass
class ProbeResult:
    """How the replicas answered, in the order they did (`texts[i]` is `replicas[i]`'s answer)."""

    status: int
    replicas: list[str]
    texts: list[str]
    base_version: str  # what the replicas answered on (x-inlaid-base-version), "" if not named
    attempts: int
    seconds: float


def _check_body(body: Any, task: str) -> str:
    """The completion text, after checking the OpenAI response shape; ProbeFailed otherwise."""
    try:
        choice = body["choices"][0]
        text, reason, usage = choice["text"], choice["finish_reason"], body["usage"]
        ok = (body.get("object") == "text_completion" and body.get("model") == task and isinstance(text, str)
              and reason in ("stop", "length") and usage["completion_tokens"] >= 1)
    except (KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise ProbeFailed(f"probe of task {task!r}: malformed completion {json.dumps(body)[:300]}")
    return text


def probe_task(endpoint: str, admin_key: str | None, task: str, base_version: int | None = None,
               settings: ProbeSettings = ProbeSettings()) -> ProbeResult:
    """Probe `task` on every running replica (module docstring); ProbeFailed if one cannot answer."""
    url = endpoint.rstrip("/") + "/v1/completions"
    headers = {PROBE_HEADER: "1", "Content-Type": "application/json"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    body = {"model": task, "prompt": settings.prompt, "max_tokens": settings.max_tokens, "temperature": 0}
    start = time.monotonic()
    deadline = start + settings.timeout_s
    replicas: list[str] = []
    texts: list[str] = []
    attempts, served_base = 0, ""
    with httpx.Client(timeout=settings.request_timeout_s) as client:
        while len(replicas) < settings.max_replicas:
            avoid = {PROBE_AVOID_HEADER: ",".join(replicas)} if replicas else {}
            replica, text, served_base, tries = _answer(client, url, body, headers | avoid, task, base_version,
                                                        deadline, settings)
            attempts += tries
            if replica in replicas:
                break
            replicas.append(replica)
            texts.append(text)
            if not replica:  # no replica id in the answer: the walk cannot tell replicas apart
                break
        else:
            log.warning("probe %s: stopped after %d replicas (max_replicas)", task, settings.max_replicas)
    if len(set(texts)) > 1:  # greedy on identical weights; differing hardware may still round apart
        log.warning("probe %s: replicas answered differently: %s", task, dict(zip(replicas, texts)))
    return ProbeResult(200, replicas, texts, served_base, attempts, time.monotonic() - start)


def _answer(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str], task: str,
            base_version: int | None, deadline: float, settings: ProbeSettings) -> tuple[str, str, str, int]:
    """(replica id, text, base version served, attempts) of the first correct answer, retried until
    `deadline`."""
    attempts, last = 0, "no answer"
    while True:
        attempts += 1
        try:
            response = client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            served_base = response.headers.get(BASE_VERSION_HEADER, "")
            if response.status_code == 200:
                text = _check_body(response.json(), task)
                if base_version is None or served_base == str(base_version):
                    return response.headers.get(REPLICA_HEADER, ""), text, served_base, attempts
                last = f"answered on base version {served_base or '?'}, waiting for {base_version}"
            elif response.status_code in _RETRY_STATUSES:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                raise ProbeFailed(f"probe of task {task!r} at {url}: HTTP {response.status_code}: "
                                  f"{response.text[:300]}")
        if time.monotonic() >= deadline:
            avoided = headers.get(PROBE_AVOID_HEADER)
            raise ProbeFailed(f"probe of task {task!r} at {url}: no correct answer within {settings.timeout_s:.0f}s "
                              f"after {attempts} attempts" + (f" (replicas other than {avoided})" if avoided else "")
                              + f" (last: {last})")
        log.debug("probe %s: %s; retrying", task, last)
        time.sleep(settings.poll_s)
