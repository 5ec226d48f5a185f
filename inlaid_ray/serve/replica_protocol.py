"""What the router sends a replica and what the replica streams back (Ray-pickled, in-cluster).

A request names its task and carries the task's cluster as a `ClusterSpec`: the adapters a
replica must hold to serve any member of that cluster. Sending the spec with the request
keeps replicas free of registry access; the cluster id is also the request's Ray Serve
multiplexed model id, which is what the request router keys affinity on.

Chunks streamed back are plain dicts:
    {"replica": str (first chunk), "text": str, "token_ids": [int], "finish_reason": str | None,
     "num_prompt_tokens": int, "num_completion_tokens": int, "queue_time_s": float | None,
     "engine_time_s": float | None (last chunk), "stats": {...} (last chunk)}
or, for a failure, `{"error": {"status", "message", "type", "code", "param"}}` (http_errors.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from inlaid_ray.engine import RequestOutput, SamplingParams

# Registry cluster names cannot contain ':', so these never collide with a real cluster id.
ENGINE_DEPLOYMENT = "EngineReplica"  # the Serve deployment of engine replicas (its replica actors carry it)
_SOLO_PREFIX = "task:"


@dataclass(frozen=True)
class AdapterEntry:
    """One task's adapter as a replica loads it."""

    task: str
    uri: str  # PEFT directory: absolute path, file:// URI, or relative to the artifact dir
    version: int = 1
    sha256: str = ""


@dataclass(frozen=True)
class ClusterSpec:
    """The adapters that make up one cluster: raw PEFT ("peft"), or the compressed cluster bank at
    `bank_uri` ("jd_bank"; a member the bank lacks is served raw from its own entry)."""

    cluster_id: str
    version: int
    adapters: tuple[AdapterEntry, ...]
    format: Literal["peft", "jd_bank"] = "peft"
    bank_uri: str = ""  # cluster-bank directory (path, file:// URI, or relative to the artifact dir)

    @property
    def compressed_bank(self) -> str:
        """The bank to serve from, "" when served raw."""
        return self.bank_uri if self.format == "jd_bank" else ""

    def entry(self, task: str) -> AdapterEntry | None:
        return next((a for a in self.adapters if a.task == task), None)


def solo_cluster_id(task: str) -> str:
    """Cluster id of a task the registry has not put in a cluster: it travels alone."""
    return f"{_SOLO_PREFIX}{task}"


@dataclass(frozen=True)
class ReplicaRequest:
    """One generation request as the router hands it to a replica."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    task: str | None = None  # None = base model
    cluster: ClusterSpec | None = None  # required when task is set
    predicted_len: float | None = None  # predicted output tokens (scheduler and router)
    # replica ids the request router passes over while any other replica is running: the
    # onboarding probe visits every replica by avoiding those that already answered it
    avoid_replicas: tuple[str, ...] = ()
    # completions generated from this prompt (OpenAI's n, or best_of): one engine request each,
    # on the same replica; their chunks carry "index"
    num_choices: int = 1

    @property
    def predicted_work(self) -> float:
        """Tokens of work this request adds to a replica: prompt + predicted output, per choice."""
        predicted = self.predicted_len if self.predicted_len is not None else self.params.max_tokens
        return self.num_choices * (len(self.prompt_token_ids) + min(predicted, self.params.max_tokens))

    def choice(self, index: int) -> tuple[str, SamplingParams]:
        """(engine request id, params) of choice `index`: a seed moves on by one per choice (vLLM's rule)."""
        if self.num_choices == 1:
            return self.request_id, self.params
        seed = self.params.seed
        params = self.params if seed is None else dataclasses.replace(self.params, seed=seed + index)
        return f"{self.request_id}-{index}", params


def merge_outputs(outputs: Sequence[RequestOutput], index: int = 0) -> dict[str, Any]:
    """One chunk from consecutive deltas of one choice (the replica coalesces under load)."""
    assert outputs, "merge_outputs needs at least one output"
    last = outputs[-1]
    return {
        "index": index,
        "text": "".join(o.text for o in outputs),
        "token_ids": [t for o in outputs for t in o.token_ids],
        "finish_reason": last.finish_reason,
        "num_prompt_tokens": last.num_prompt_tokens,
        "num_completion_tokens": last.num_completion_tokens,
        "queue_time_s": last.queue_time_s,  # arrival at the engine -> first step (None until it ran)
        "engine_time_s": last.engine_time_s,  # arrival at the engine -> its end (None until it ended)
        # one [token id, logprob, [[alternative id, logprob], ...]] per token, when requested
        "logprobs": [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for o in outputs for lp in o.logprobs],
    }
