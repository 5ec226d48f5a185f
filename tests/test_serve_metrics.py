"""The /metrics exposition, read back with prometheus_client's own text parser: every vLLM-named
family carries exactly the samples of its inlaid_* family (labels renamed as vLLM names them), no
`_created` series, a stopped replica's gauges leave under both names, and every metric the
Grafana dashboard in deploy/ queries is exposed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from inlaid_ray.serve.metrics import VLLM_NAMES, ServeMetrics

REPO = Path(__file__).resolve().parents[1]
RENAMED = {"task": "model_name", "replica": "engine", "finish_reason": "finished_reason"}


def _families(metrics: ServeMetrics) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(metrics.exposition().decode())}


def _recorded() -> ServeMetrics:
    m = ServeMetrics(base_model="smollm2")
    m.record_finished("sentiment", "stop", 12, 5, e2e_s=0.8, ttft_s=0.2, queue_s=0.05, slo_s=1.0, predicted_len=6)
    m.record_finished("email", "length", 30, 64, e2e_s=3.1, ttft_s=0.4, queue_s=0.1, slo_s=2.0, predicted_len=40)
    m.itl.labels("email").observe(0.03)
    m.errors.labels("400").inc()
    m.record_replica_stats("r1", {"ts": 100.0, "running": 3, "waiting": 2, "kv_usage": 0.25,
                                  "distinct_adapters_last_step": 2, "loaded_clusters": ["c0"],
                                  "running_adapters": ["email", "sentiment"], "waiting_adapters": ["extract"],
                                  "max_adapters": 16})
    return m


def test_vllm_names_carry_the_inlaid_samples_and_no_created_series():
    families = _families(_recorded())
    assert not any(s.name.endswith("_created") for samples in families.values() for s in samples)
    for inlaid, vllm in VLLM_NAMES.items():
        ours, theirs = families[inlaid], families[vllm]
        assert ours, inlaid
        expected = set()
        for s in ours:
            labels = {RENAMED.get(k, k): v for k, v in s.labels.items()}
            if "replica" in s.labels:
                labels["model_name"] = "smollm2"
            expected.add((vllm + s.name[len(inlaid):], tuple(sorted(labels.items())), s.value))
        assert {(s.name, tuple(sorted(s.labels.items())), s.value) for s in theirs} == expected, vllm
    running = {s.labels["engine"]: s.value for s in families["vllm:num_requests_running"]}
    assert running == {"r1": 3.0}
    success = {(s.labels["model_name"], s.labels["finished_reason"]): s.value for s in families["vllm:request_success"]
               if s.name.endswith("_total")}
    assert success == {("sentiment", "stop"): 1.0, ("email", "length"): 1.0}


def test_a_forgotten_replica_leaves_under_both_names():
    m = _recorded()
    m.forget_replica("r1")
    families = _families(m)
    for name in ("inlaid_num_requests_running", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info"):
        assert families.get(name, []) == [], name


def test_every_metric_the_dashboard_queries_is_exposed():
    dashboard = json.loads((REPO / "deploy" / "grafana_dashboard.json").read_text())
    exposed = set(_families(_recorded()))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {re.sub(r"_(bucket|total|count|sum)$", "", n) for e in exprs for n in re.findall(r"\b(?:inlaid_|vllm:)[a-z0-9_:]+", e)}
    assert names and names <= exposed, names - exposed
    assert len({p["title"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] for t in p["targets"])


def test_older_replica_stats_do_not_replace_newer_ones():
    """Stats arrive from finished requests and from Serve's broadcast in any order: the gauges keep the newest."""
    m = ServeMetrics()
    m.record_replica_stats("r1", {"ts": 20.0, "running": 4})
    m.record_replica_stats("r1", {"ts": 10.0, "running": 1})
    assert [s.value for s in _families(m)["inlaid_num_requests_running"]] == [4.0]
    m.forget_replica("r1")
    m.record_replica_stats("r1", {"ts": 5.0, "running": 2})  # a restarted replica id starts afresh
    assert [s.value for s in _families(m)["inlaid_num_requests_running"]] == [2.0]


def test_lora_requests_info_follows_the_adapter_lists_as_vllm_reports_them():
    """vLLM's info gauge: one series per replica whose labels are the current adapter lists and
    whose value is when they were reported; a new report replaces the old series."""
    m = _recorded()
    [info] = _families(m)["vllm:lora_requests_info"]
    assert info.labels == {"engine": "r1", "model_name": "smollm2", "max_lora": "16",
                           "running_lora_adapters": "email,sentiment", "waiting_lora_adapters": "extract"}
    assert info.value == 100.0
    m.record_replica_stats("r1", {"ts": 101.0, "running_adapters": ["email"], "waiting_adapters": [], "max_adapters": 16})
    [info] = _families(m)["vllm:lora_requests_info"]
    assert (info.labels["running_lora_adapters"], info.labels["waiting_lora_adapters"], info.value) == ("email", "", 101.0)
