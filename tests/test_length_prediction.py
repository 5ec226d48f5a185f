"""The router's output-length predictors (serve/length_prediction.py): the task quantile with its
prior and default, the learned MiniLM predictor behind its warm-up fallback, lookup by name or
import path, and `bounded_prediction`, which keeps a failed or absurd prediction from failing or
mis-ranking a request."""

from __future__ import annotations

import math

import pytest

from inlaid_ray.serve.length_prediction import (
    MiniLMPredictor,
    TaskQuantilePredictor,
    bounded_prediction,
    make_predictor,
)


def _raise() -> float:
    raise RuntimeError("encoder died")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(lambda: 17.4, 17.4), (lambda: 0.2, 1.0), (lambda: -5.0, 1.0), (lambda: 1e9, 64.0),
     (lambda: math.inf, 64.0), (lambda: math.nan, 64.0), (_raise, 64.0)],
    ids=["inside", "below-1", "negative", "above-max", "inf", "nan", "raises"],
)
def test_bounded_prediction_is_always_a_rankable_length(value, expected):
    assert bounded_prediction(value, 64, "t") == expected


def test_task_quantile_uses_history_then_prior_then_default():
    p = TaskQuantilePredictor(quantile=0.5, history=4, default_len=32.0)
    assert p.predict("a", "x", None) == 32.0
    assert p.predict("a", "x", 7.0) == 7.0
    for n in (10, 1, 100, 5, 3):  # history keeps the last 4: 1, 100, 5, 3
        p.observe("a", "x", n)
    assert p.predict("a", "x", 7.0) == 5.0  # sorted [1, 3, 5, 100], index int(0.5 * 4) = 2
    assert p.predict("b", "x", None) == 32.0  # other tasks are not pooled
    with pytest.raises(ValueError, match="quantile"):
        TaskQuantilePredictor(quantile=1.5)


def test_make_predictor_by_name_and_import_path():
    assert isinstance(make_predictor("task_quantile"), TaskQuantilePredictor)
    assert isinstance(make_predictor("inlaid_ray.serve.length_prediction:TaskQuantilePredictor"), TaskQuantilePredictor)
    with pytest.raises(ValueError, match="unknown length predictor 'oracle'"):
        make_predictor("oracle")


@pytest.mark.slow
def test_minilm_predictor_warms_up_on_the_quantile_then_learns_the_prompt():
    """Below `min_task_history` observations the task quantile answers; after the refit the head
    tells a prompt that asks for a long answer from one that asks for a short one."""
    p = MiniLMPredictor(refit_every=16, min_task_history=8)
    assert p.predict("t", "anything", 12.0) == 12.0  # prior
    short, long = "Answer yes or no: is it raining?", "Write a detailed essay about the history of rain."
    for i in range(8):
        p.observe("t", short + f" ({i})", 2)
        p.observe("t", long + f" ({i})", 200)
    assert p.predict("t", short + " (42)", None) < 20 < 100 < p.predict("t", long + " (42)", None) <= 2 * 200
    # prompts shorter than any fitted one are clamped to the fitted range, not extrapolated to 1 token
    assert all(2 <= p.predict("t", prompt, None) <= 2 * 200 for prompt in (short, long))
    # one encoder pass for a batch gives each request what it gets alone (tasks below their
    # history, here "u", take the prior)
    prompts = [short + " (7)", long + " (7)", "other task"]
    alone = [p.predict(t, q, prior) for t, q, prior in zip(["t", "t", "u"], prompts, [None, None, 9.0])]
    assert p.predict_many(["t", "t", "u"], prompts, [None, None, 9.0]) == pytest.approx(alone, rel=1e-5)


class PromptLengthPredictor:
    """A blocking predictor of the kind `make_predictor` loads by import path: predicts the
    prompt's length, records which thread it ran on and the batches it was given."""

    blocking = True

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.threads, self.batches, self.observed = fail, set(), [], []

    def predict(self, task, prompt, prior):
        return self.predict_many([task], [prompt], [prior])[0]

    def predict_many(self, tasks, prompts, priors):
        import threading
        import time

        self.threads.add(threading.get_ident())
        self.batches.append(len(prompts))
        time.sleep(0.02)  # the encoder's time: the requests arriving meanwhile wait together
        if self.fail:
            raise RuntimeError("encoder died")
        return [float(len(q)) if q != "nan" else math.nan for q in prompts]

    def observe(self, task, prompt, actual_len):
        import threading

        self.threads.add(threading.get_ident())
        self.observed.append((task, actual_len))


def test_concurrent_predictions_run_together_on_one_thread_and_each_gets_its_own():
    import asyncio

    from inlaid_ray.serve.length_prediction import PredictionBatcher

    pred = PromptLengthPredictor()
    batcher = PredictionBatcher(pred, max_batch=8)
    prompts = ["x" * (i + 1) for i in range(20)] + ["nan"]

    async def run():
        return await asyncio.gather(*(batcher.predict("t", q, None, 16) for q in prompts))

    got = asyncio.run(run())
    assert got == [min(float(len(q)), 16.0) for q in prompts[:-1]] + [16.0]  # bounded; NaN -> max_tokens
    assert sum(pred.batches) == len(prompts) and max(pred.batches) > 1 and max(pred.batches) <= 8
    batcher.observe("t", "x", 5).result()
    assert pred.observed == [("t", 5)] and len(pred.threads) == 1  # predictions and learning: one thread
    batcher.shutdown()


def test_a_failing_batch_ranks_its_requests_as_long_and_the_next_one_is_served():
    import asyncio

    from inlaid_ray.serve.length_prediction import PredictionBatcher

    pred = PromptLengthPredictor(fail=True)
    batcher = PredictionBatcher(pred)

    async def run():
        return await asyncio.gather(*(batcher.predict("t", "abc", None, 32) for _ in range(3)))

    assert asyncio.run(run()) == [32.0] * 3
    pred.fail = False
    assert asyncio.run(batcher.predict("t", "abc", None, 32)) == 3.0
    batcher.shutdown()
