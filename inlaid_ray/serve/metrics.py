"""Prometheus metrics of the serving path, vLLM's set renamed `inlaid_*` with unit suffixes, and
the same series under vLLM's names where the meaning matches (`VLLM_NAMES`), so dashboards and
alerts written for vLLM read them unchanged.

Per-request metrics carry a `task` label and are recorded by the router (it sees every
request end to end; replicas report queue time in the final chunk). Engine gauges carry a
`replica` label and come from the replicas' routing stats. One `CollectorRegistry` per
process, owned by the object that exposes /metrics (no module-level state). The vLLM-named
series are derived at scrape time from the `inlaid_*` ones (one observation, two names):
`task` becomes vLLM's `model_name` (a task is a model id of the API), `replica` becomes `engine`
(with `model_name` the base model), `finish_reason` becomes `finished_reason`.
No `_created` series (as vLLM: `disable_created_metrics`, process-wide in prometheus_client).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

# inlaid family -> vLLM family of the same meaning (vLLM v1's names).
VLLM_NAMES = {
    "inlaid_requests": "vllm:request_success",
    "inlaid_prompt_tokens": "vllm:prompt_tokens",
    "inlaid_generation_tokens": "vllm:generation_tokens",
    "inlaid_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "inlaid_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "inlaid_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "inlaid_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    "inlaid_num_requests_running": "vllm:num_requests_running",
    "inlaid_num_requests_waiting": "vllm:num_requests_waiting",
    "inlaid_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",  # vLLM's "perc" is a 0-1 fraction too
    "inlaid_lora_requests_info": "vllm:lora_requests_info",
}
_VLLM_LABELS = {"task": "model_name", "replica": "engine", "finish_reason": "finished_reason"}

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
_TOKEN_ERROR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _newer_stats(stats: dict, than: dict | None) -> bool:
    """Whether a replica's routing stats `stats` were taken after `than` (their `ts`): stats arrive
    from finished requests and from Serve's broadcast, not in order, and older ones must not win."""
    return than is None or float(stats.get("ts", 0.0)) >= float(than.get("ts", 0.0))


class ServeMetrics:
    """All serving metrics in one registry."""

    def __init__(self, base_model: str = "base") -> None:
        disable_created_metrics()
        self._inlaid = CollectorRegistry()  # the series recorded here
        self.registry = CollectorRegistry()  # what /metrics exposes: those plus their vLLM names
        self.registry.register(_WithVllmNames(self._inlaid, base_model))
        r = self._inlaid
        self.requests = Counter("inlaid_requests", "Finished requests by finish reason", ["task", "finish_reason"], registry=r)
        self.errors = Counter("inlaid_request_errors", "Rejected or failed requests by HTTP status", ["status"], registry=r)
        self.ttft = Histogram("inlaid_time_to_first_token_seconds", "Time to first token", ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("inlaid_inter_token_latency_seconds", "Time between streamed tokens", ["task"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("inlaid_e2e_request_latency_seconds", "End-to-end request latency", ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("inlaid_request_queue_time_seconds", "Time from arrival at the replica to first schedule", ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("inlaid_prompt_tokens", "Prompt tokens processed", ["task"], registry=r)
        self.generation_tokens = Counter("inlaid_generation_tokens", "Tokens generated", ["task"], registry=r)
        self.slo = Counter("inlaid_slo_requests", "Finished requests by whether they met their SLO", ["task", "attained"], registry=r)
        self.length_error = Histogram("inlaid_output_length_prediction_error_tokens", "|predicted - actual| output length", ["task"], buckets=_TOKEN_ERROR_BUCKETS, registry=r)
        self.running = Gauge("inlaid_num_requests_running", "Requests running on a replica", ["replica"], registry=r)
        self.waiting = Gauge("inlaid_num_requests_waiting", "Requests waiting on a replica", ["replica"], registry=r)
        self.kv_usage = Gauge("inlaid_kv_cache_usage_ratio", "Fraction of KV blocks in use", ["replica"], registry=r)
        self.adapters_per_step = Gauge("inlaid_distinct_adapters_per_step", "Distinct adapters in the replica's last step", ["replica"], registry=r)
        self.loaded_clusters = Gauge("inlaid_loaded_clusters", "Adapter clusters resident on a replica", ["replica"], registry=r)
        # vLLM's info-style gauge: the labels carry the adapter lists, the value is when they were reported.
        self.lora_info = Gauge("inlaid_lora_requests_info", "Adapters (tasks) of a replica's running and waiting requests",
                               ["replica", "max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        # The newest routing stats of each replica: what its engine gauges and /v1/admin/replicas show.
        self.replica_stats: dict[str, dict] = {}
        self._lora_labels: dict[str, tuple[str, ...]] = {}  # each replica's current lora_info label values

    def record_finished(
        self,
        task: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float,
        ttft_s: float | None,
        queue_s: float | None,
        slo_s: float | None,
        predicted_len: float | None,
    ) -> None:
        """Record one finished request."""
        self.requests.labels(task, finish_reason).inc()
        self.prompt_tokens.labels(task).inc(prompt_tokens)
        self.generation_tokens.labels(task).inc(completion_tokens)
        self.e2e.labels(task).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(task).observe(ttft_s)
        if queue_s is not None:
            self.queue_time.labels(task).observe(queue_s)
        if slo_s is not None:
            self.slo.labels(task, str(e2e_s <= slo_s).lower()).inc()
        if predicted_len is not None:
            self.length_error.labels(task).observe(abs(predicted_len - completion_tokens))

    def record_replica_stats(self, replica: str, stats: dict) -> None:
        """Engine gauges from a replica's routing stats, unless newer ones are already shown."""
        if not _newer_stats(stats, self.replica_stats.get(replica)):
            return
        self.replica_stats[replica] = stats
        self.running.labels(replica).set(stats.get("running", 0))
        self.waiting.labels(replica).set(stats.get("waiting", 0))
        self.kv_usage.labels(replica).set(stats.get("kv_usage", 0.0))
        self.adapters_per_step.labels(replica).set(stats.get("distinct_adapters_last_step", 0))
        self.loaded_clusters.labels(replica).set(len(stats.get("loaded_clusters", ())))
        self._remove_lora_info(replica)
        labels = (replica, str(stats.get("max_adapters", "")), ",".join(stats.get("running_adapters", ())),
                  ",".join(stats.get("waiting_adapters", ())))
        self.lora_info.labels(*labels).set(float(stats.get("ts", 0.0)))
        self._lora_labels[replica] = labels

    def forget_replica(self, replica: str) -> None:
        """Drop a stopped replica's engine gauges (a dead replica's last values would read as live)."""
        self.replica_stats.pop(replica, None)
        for gauge in (self.running, self.waiting, self.kv_usage, self.adapters_per_step, self.loaded_clusters):
            try:
                gauge.remove(replica)
            except KeyError:  # no stats had arrived from it for this gauge
                pass
        self._remove_lora_info(replica)

    def _remove_lora_info(self, replica: str) -> None:
        """Drop `replica`'s lora_info series (its labels change with the adapter lists)."""
        labels = self._lora_labels.pop(replica, None)
        if labels is not None:
            self.lora_info.remove(*labels)

    def exposition(self) -> bytes:
        """Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _WithVllmNames:
    """A collector exposing every family of `source`, and a copy under its vLLM name where one exists."""

    def __init__(self, source: CollectorRegistry, base_model: str) -> None:
        self._source, self._base_model = source, base_model

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            yield family
            name = VLLM_NAMES.get(family.name)
            if name is None:
                continue
            copy = Metric(name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {_VLLM_LABELS.get(k, k): v for k, v in sample.labels.items()}
                if "replica" in sample.labels:
                    labels["model_name"] = self._base_model
                copy.samples.append(Sample(name + sample.name[len(family.name):], labels, sample.value,
                                           sample.timestamp, sample.exemplar))
            yield copy
