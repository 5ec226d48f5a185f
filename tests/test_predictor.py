"""Output-length predictor: metric helpers (fast), and with the real all-MiniLM-L6-v2 encoder
(slow): it beats the per-task-mean baseline on held-out synthetic and demo data, falls back
to running quantiles for tasks with little history, and learns online through refit()."""

from __future__ import annotations

import numpy as np
import pytest

from inlaid_ray.sched.predictor import (
    DEFAULT_BUCKETS,
    LengthPredictor,
    PredictorConfig,
    SentenceEncoder,
    bucket_of,
    length_metrics,
    per_task_baseline,
)
from inlaid_ray.bench.synthetic_tasks import make_records

DEMO_TASKS = ("sentiment", "extract", "rewrite", "email")


def test_length_metrics_match_direct_computation():
    pred, actual = [10.0, 70.0, 300.0, 40.0], [12, 64, 900, 20]
    m = length_metrics(pred, actual)
    assert m["mae_tokens"] == pytest.approx(np.mean(np.abs(np.array(pred) - np.array(actual))))
    edges = np.array(DEFAULT_BUCKETS)
    same = [np.searchsorted(edges, p, side="right") == np.searchsorted(edges, a, side="right") for p, a in zip(pred, actual)]
    assert m["bucket_accuracy"] == pytest.approx(np.mean(same))
    assert m["log_error_std"] == pytest.approx(np.std(np.log(np.array(pred) / np.array(actual)), ddof=1))
    assert [bucket_of(x) for x in (0, 31, 32, 511, 512, 10_000)] == [0, 0, 1, 4, 5, 5]


def test_per_task_baseline_mean_and_median():
    tasks, lens = ["a", "a", "a", "b"], [1, 2, 9, 7]
    assert per_task_baseline(tasks, lens, ["a", "b", "zzz"], "mean") == [4.0, 7.0, np.mean(lens)]
    assert per_task_baseline(tasks, lens, ["a"], "median") == [2.0]


@pytest.mark.parametrize("num_tasks,rows", [(1, 30), (7, 200), (60, 150)])
def test_per_task_ridge_equals_the_dense_one_hot_ridge(num_tasks, rows):
    """The block elimination solves the same problem as ridge on explicit one-hot columns
    (a dense float64 solve), also with tasks of one row and tasks without rows."""
    import torch

    from inlaid_ray.sched.predictor import _ridge_per_task

    g = torch.Generator().manual_seed(num_tasks)
    x = torch.cat([torch.ones(rows, 1, dtype=torch.float64), torch.randn(rows, 6, generator=g, dtype=torch.float64)], 1)
    z = x[:, -1]
    task_idx = torch.randint(0, num_tasks, (rows,), generator=g)
    task_idx[0] = num_tasks - 1  # at least one row of the last task; some others may have none
    y = torch.randn(rows, generator=g, dtype=torch.float64) + task_idx.double() * 0.1
    alpha = 0.7
    onehot = torch.nn.functional.one_hot(task_idx, num_tasks).double()
    dense = torch.cat([x, onehot, onehot * z[:, None]], 1)
    reg = torch.full((dense.shape[1],), alpha, dtype=torch.float64)
    reg[0] = 0.0
    ref = torch.linalg.solve(dense.T @ dense + torch.diag(reg), dense.T @ y)
    w, coef = _ridge_per_task(x, z, task_idx, num_tasks, y, alpha)
    f = x.shape[1]
    assert torch.allclose(w, ref[:f], atol=1e-9)
    assert torch.allclose(coef[:, 0], ref[f:f + num_tasks], atol=1e-9)
    assert torch.allclose(coef[:, 1], ref[f + num_tasks:], atol=1e-9)


# -- with the real encoder -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def _fit_and_compare(encoder, train, evals) -> tuple[dict, dict]:
    pred = LengthPredictor(encoder=encoder)
    pred.observe_many([r[0] for r in train], [r[1] for r in train], [r[2] for r in train])
    pred.refit()
    actual = [r[2] for r in evals]
    model = length_metrics(pred.predict([r[0] for r in evals], [r[1] for r in evals]), actual)
    base = length_metrics(per_task_baseline([r[0] for r in train], [r[2] for r in train], [r[0] for r in evals], "mean"), actual)
    return model, base


@pytest.mark.slow
def test_encoder_embeds_meaning(encoder):
    e = encoder.encode(["Translate this sentence into French.", "Translate the following text to French.",
                        "Write a Python function that sorts a list."])
    assert e.shape == (3, encoder.dim)
    assert np.allclose(e.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


@pytest.mark.slow
def test_beats_per_task_mean_on_synthetic_tasks(encoder):
    train = [(r.task, r.prompt, r.output_len) for r in make_records(4, 40, seed=0)]
    evals = [(r.task, r.prompt, r.output_len) for r in make_records(4, 20, seed=1)]
    model, base = _fit_and_compare(encoder, train, evals)
    assert model["mae_tokens"] < base["mae_tokens"]
    assert model["bucket_accuracy"] > base["bucket_accuracy"]


@pytest.mark.slow
def test_beats_per_task_mean_on_demo_data(encoder):
    from inlaid_ray.demo.data import load_examples

    train = [(t, r["prompt"], r["completion_tokens"]) for t in DEMO_TASKS for r in load_examples(t, "train")[:40]]
    evals = [(t, r["prompt"], r["completion_tokens"]) for t in DEMO_TASKS for r in load_examples(t, "eval")[:25]]
    model, base = _fit_and_compare(encoder, train, evals)
    assert model["mae_tokens"] < base["mae_tokens"]
    assert model["bucket_accuracy"] >= base["bucket_accuracy"]


@pytest.mark.slow
def test_fallback_quantile_for_thin_tasks_and_online_refit(encoder):
    cfg = PredictorConfig(min_task_history=8, fallback_quantile=0.5)
    pred = LengthPredictor(cfg, encoder)
    thin = [5, 50, 7]
    pred.observe_many(["thin"] * 3, ["short prompt"] * 3, thin)
    pred.refit()
    assert pred.predict_one("thin", "anything") == pytest.approx(np.quantile(thin, 0.5))
    assert pred.predict_one("never-seen", "x") == pytest.approx(np.quantile(thin, 0.5))  # global history
    # a new task whose length is set by the prompt: before refit the quantile, after it the model
    recs = make_records(1, 40, seed=4)  # translation: output ~ 1.4 x source words
    pred.observe_many(["tr"] * 30, [r.prompt for r in recs[:30]], [r.output_len for r in recs[:30]])
    held = recs[30:]
    before = length_metrics(pred.predict(["tr"] * 10, [r.prompt for r in held]), [r.output_len for r in held])
    pred.refit()
    after = length_metrics(pred.predict(["tr"] * 10, [r.prompt for r in held]), [r.output_len for r in held])
    assert after["mae_tokens"] < before["mae_tokens"]


@pytest.mark.slow
def test_observe_rejects_bad_lengths(encoder):
    pred = LengthPredictor(encoder=encoder)
    with pytest.raises(ValueError, match="must be >= 1, got 0 for task 'a'"):
        pred.observe("a", "p", 0)


@pytest.mark.slow
def test_prompts_longer_than_any_fitted_do_not_extrapolate(encoder):
    """Served traffic fits the head on near-identical prompt lengths (a tiny log-length std); a
    long prompt once predicted ~4e4 tokens for a task whose outputs are <= 24, or overflowed exp()
    and failed the request. Prompt lengths are now clamped to the fitted range, outputs to 2x the
    longest seen."""
    rnd = np.random.default_rng(0)
    pred = LengthPredictor(PredictorConfig(min_task_history=8), encoder)
    tasks = ["sentiment", "extract", "rewrite", None]
    for i in range(128):
        if i % 37 == 5:
            pred.observe(tasks[i % 4], "Rewrite this sentence in a formal register please: hey whats up", 24)
        else:
            pred.observe(tasks[i % 4], f"Request {i}: tell me", int(rnd.integers(1, 5)))
    pred.refit()
    long = "Classify the sentiment of this review: " + "the movie was long and the plot was thin " * 30
    predicted = pred.predict(tasks, [long] * 4)
    assert all(1.0 <= p <= 2 * 24 for p in predicted), predicted
    # within the fitted range nothing changes: the short prompts still predict short outputs
    assert all(p <= 8 for p in pred.predict(tasks, ["Request 7: tell me"] * 4))


@pytest.mark.slow
def test_a_predicted_prompt_is_not_encoded_again_when_it_is_learned(encoder):
    """The refit reuses the features computed when the request was predicted, and learns the
    same head as a predictor that never predicted (it encodes every record itself)."""
    first = [(r.task, r.prompt, r.output_len) for r in make_records(4, 12, seed=0)]
    later = [(r.task, r.prompt, r.output_len) for r in make_records(4, 6, seed=2)]
    probe = [(r.task, r.prompt) for r in make_records(4, 3, seed=3)]
    reference = LengthPredictor(encoder=encoder)
    cached = LengthPredictor(encoder=encoder)
    for p in (reference, cached):
        p.observe_many([r[0] for r in first], [r[1] for r in first], [r[2] for r in first])
        p.refit()
    cached.predict([r[0] for r in later], [r[1] for r in later])  # the requests arrive ...
    encoded: list[str] = []
    encode = encoder.encode

    def counting_encode(texts, batch_size=32):
        encoded.extend(texts)
        return encode(texts, batch_size)

    encoder.encode = counting_encode
    try:
        for p in (reference, cached):  # ... and finish
            p.observe_many([r[0] for r in later], [r[1] for r in later], [r[2] for r in later])
            before = len(encoded)
            p.refit()
            if p is cached:
                assert len(encoded) == before  # every new record was predicted: nothing to encode
            else:
                assert len(encoded) - before == len(later)
    finally:
        encoder.encode = encode
    tasks, prompts = [t for t, _ in probe], [q for _, q in probe]
    assert cached.predict(tasks, prompts) == pytest.approx(reference.predict(tasks, prompts), rel=1e-4)
