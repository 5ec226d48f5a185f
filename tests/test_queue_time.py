"""Queue time (issue 7, metrics): the engine records when each request first ran, its outputs
carry arrival and first-scheduled times on the engine clock, and the serving path turns them
into the `inlaid_request_queue_time_seconds` histogram. A step clock makes every time exact."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inlaid_ray.engine import EngineConfig, LLMEngine, SamplingParams
from inlaid_ray.model import load_model
from inlaid_ray.serve.metrics import ServeMetrics
from inlaid_ray.serve.replica_protocol import merge_outputs
from inlaid_ray.serve.responses import ResponseContext, StreamTracker, server_timing

# One seat: the second request waits for the first to finish.
CFG = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=48, max_num_batched_tokens=64, max_num_seqs=1)


class StepClock:
    """A clock that advances by 1.0 each time it is read, so every read is a distinct, known time."""

    def __init__(self) -> None:
        self.t = 100.0
        self.reads: list[float] = []

    def __call__(self) -> float:
        self.t += 1.0
        self.reads.append(self.t)
        return self.t


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def _run(model):
    clock = StepClock()
    engine = LLMEngine(model, None, CFG, clock=clock)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request([1, 5, 7], params, request_id="a")
    engine.add_request([4, 4, 4, 9], params, request_id="b")
    arrival = {rid: engine.get_request(rid).arrival_time for rid in ("a", "b")}
    outputs, step_starts, step_ends = [], [], []
    while engine.has_unfinished():
        step_starts.append(clock.t + 1.0)  # step() reads the clock first: that read is its `now`
        outputs.append(engine.step())
        step_ends.append(clock.t)  # ... and last after sampling: when its requests finished
    return arrival, step_starts, outputs, step_ends


def test_queue_time_is_first_scheduled_minus_arrival(model):
    arrival, step_starts, outputs, _ = _run(model)
    by_id: dict[str, list] = {"a": [], "b": []}
    first_step = {}
    for i, step in enumerate(outputs):
        for out in step:
            by_id[out.request_id].append(out)
            first_step.setdefault(out.request_id, i)
    for rid in ("a", "b"):
        outs = by_id[rid]
        expected_sched = step_starts[first_step[rid]]  # the `now` of the step that first ran it
        assert all(o.arrival_time == arrival[rid] for o in outs)
        assert all(o.first_scheduled_time == expected_sched for o in outs)
        assert outs[-1].queue_time_s == expected_sched - arrival[rid]
        assert outs[-1].first_scheduled_time >= outs[-1].arrival_time
    # With one seat, b first runs in the step after a's last one: it queued for a's whole run.
    assert first_step["b"] == first_step["a"] + 3
    assert by_id["b"][-1].queue_time_s > by_id["a"][-1].queue_time_s


def test_serving_path_records_the_engine_queue_time_in_the_histogram(model):
    _, _, outputs, _ = _run(model)
    outs_b = [o for step in outputs for o in step if o.request_id == "b"]
    metrics = ServeMetrics()
    ctx = ResponseContext(kind="completion", request_id="b", model="task-x", task=None, prompt_text="",
                          prompt_token_ids=(4, 4, 4, 9), predicted_len=None, slo_s=None, include_usage=False,
                          return_token_ids=False)
    tracker = StreamTracker(ctx, metrics)
    for o in outs_b:  # one chunk per engine delta, as the replica streams them when not coalescing
        chunk = merge_outputs([o])
        assert chunk["queue_time_s"] == o.queue_time_s
        tracker.add(chunk)
    tracker.finish()
    samples = {(s.name, s.labels.get("task")): s.value
               for fam in text_string_to_metric_families(metrics.exposition().decode())
               for s in fam.samples}
    assert samples[("inlaid_request_queue_time_seconds_count", "task-x")] == 1.0
    assert samples[("inlaid_request_queue_time_seconds_sum", "task-x")] == pytest.approx(outs_b[-1].queue_time_s)


def test_engine_time_is_finish_minus_arrival_and_only_on_the_last_output(model):
    arrival, _, outputs, step_ends = _run(model)
    for rid in ("a", "b"):
        steps = [i for i, step in enumerate(outputs) for o in step if o.request_id == rid]
        outs = [o for step in outputs for o in step if o.request_id == rid]
        assert all(o.engine_time_s is None for o in outs[:-1])
        # It finishes in the step that sampled its last token, once that token is sampled.
        assert outs[-1].engine_time_s == step_ends[steps[-1]] - arrival[rid]
        assert merge_outputs(outs)["engine_time_s"] == outs[-1].engine_time_s


def test_server_timing_names_the_router_parts_and_the_engine_time(model):
    import time

    _, _, outputs, _ = _run(model)
    outs_b = [o for step in outputs for o in step if o.request_id == "b"]
    arrival = time.perf_counter()
    ctx = ResponseContext(kind="completion", request_id="b", model="task-x", task=None, prompt_text="",
                          prompt_token_ids=(4, 4, 4, 9), predicted_len=None, slo_s=None, include_usage=False,
                          return_token_ids=False, arrival=arrival, tokenize_s=0.0012, predict_s=0.0034)
    tracker = StreamTracker(ctx, ServeMetrics())
    for o in outs_b:
        tracker.add(merge_outputs([o]))
    time.sleep(0.01)
    value = server_timing(ctx, [tracker])
    elapsed_ms = (time.perf_counter() - arrival) * 1e3
    parts = dict(p.split(";dur=") for p in value.split(", "))
    assert list(parts) == ["tokenize", "predict", "engine", "router"]
    assert float(parts["tokenize"]) == 1.2 and float(parts["predict"]) == 3.4
    assert float(parts["engine"]) == pytest.approx(outs_b[-1].engine_time_s * 1e3, abs=0.01)
    assert 10.0 <= float(parts["router"]) <= elapsed_ms
