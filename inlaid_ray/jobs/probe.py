"""Step 7 of onboarding: ask the running service to answer with the staged task before it goes
live. The probe is a normal OpenAI completion sent with the admin key and the header
`x-inlaid-probe: 1`, which lets the router serve a task that is still `onboarding` (users get
404 for it until the job marks it live). The router learns about the staged task from the
registry's pub/sub event, so 404 answers are retried until `timeout_s`; so are 503s (a replica
still loading). When the rollout brought a new base version, the answer must come from a
replica running it (response header `x-inlaid-base-version`): replicas load a new base beside
the old one and swap when it is ready, so this is retried as well.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger(__name__)

# The router's header names (inlaid_ray/serve/router.py), repeated so the job does not import Serve.
PROBE_HEADER = "x-inlaid-probe"
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
    timeout_s: float = 120.0
    poll_s: float = 0.5
    request_timeout_s: float = 60.0


@dataclass
class ProbeResult:
    status: int
    text: str
    replica: str
    base_version: str
    attempts: int
    seconds: float
    body: dict[str, Any] = field(default_factory=dict)


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
    """POST one greedy completion for `task` until it succeeds (see module docstring)."""
    url = endpoint.rstrip("/") + "/v1/completions"
    headers = {PROBE_HEADER: "1", "Content-Type": "application/json"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    body = {"model": task, "prompt": settings.prompt, "max_tokens": settings.max_tokens, "temperature": 0}
    start = time.monotonic()
    deadline = start + settings.timeout_s
    attempts, last = 0, "no answer"
    with httpx.Client(timeout=settings.request_timeout_s) as client:
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
                        return ProbeResult(200, text, response.headers.get(REPLICA_HEADER, ""), served_base,
                                           attempts, time.monotonic() - start, response.json())
                    last = f"answered on base version {served_base or '?'}, waiting for {base_version}"
                elif response.status_code in _RETRY_STATUSES:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    raise ProbeFailed(f"probe of task {task!r} at {url}: HTTP {response.status_code}: "
                                      f"{response.text[:300]}")
            if time.monotonic() >= deadline:
                raise ProbeFailed(f"probe of task {task!r} at {url}: no correct answer within "
                                  f"{settings.timeout_s:.0f}s after {attempts} attempts (last: {last})")
            log.debug("probe %s: %s; retrying", task, last)
            time.sleep(settings.poll_s)
