"""Output-length prediction at the router, behind one small interface so the predictor is
injectable (AppArgs.predictor): a name of this module or an import path to a factory.

- "task_quantile" (default, no model): the running median of the task's recent output lengths,
  else the task's prior (registry `extra["expected_output_tokens"]`), else a default.
- "minilm": `inlaid_ray.sched.predictor.LengthPredictor` (MiniLM embeddings + per-task ridge on
  log length, docs/algorithms.md 7.2), trained online from finished requests; tasks it has seen
  fewer than `min_task_history` times use the prior like the fallback.
Predictions are clamped to [1, max_tokens] (`bounded_prediction`), since no request outruns its
budget; a prediction that fails or is not finite counts as max_tokens, so it never fails a request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from inlaid_ray.serve.imports import import_object

log = logging.getLogger(__name__)


class OutputLengthPredictor(Protocol):
    """What the router needs; `blocking` predictors are called off the event loop, on one thread
    (`PredictionBatcher`), and through `predict_many` when they have it."""

    blocking: bool

    def predict(self, task: str | None, prompt: str, prior: float | None) -> float: ...

    def observe(self, task: str | None, prompt: str, actual_len: int) -> None: ...


def bounded_prediction(predict: Callable[[], float], max_tokens: int, task: str | None) -> float:
    """`predict()` clamped to [1, max_tokens]; max_tokens (logged) when it raises or is not finite."""
    try:
        predicted = float(predict())
    except Exception:  # noqa: BLE001 - a failed prediction must not fail the request: rank it as long
        log.exception("length prediction failed for task %s; using max_tokens", task)
        return float(max_tokens)
    if not math.isfinite(predicted):
        log.warning("length prediction for task %s is %s; using max_tokens", task, predicted)
        return float(max_tokens)
    return min(max(predicted, 1.0), float(max_tokens))


class TaskQuantilePredictor:
    """Per-task running quantile of observed output lengths (the cheap fallback)."""

    blocking = False

    def __init__(self, quantile: float = 0.5, history: int = 256, default_len: float = 64.0) -> None:
        if not 0.0 <= quantile <= 1.0 or history < 1 or default_len < 1:
            raise ValueError(f"quantile={quantile} must be in [0, 1], history={history} and default_len={default_len} >= 1")
        self.quantile, self.history, self.default_len = quantile, history, default_len
        self._lengths: dict[str | None, deque[int]] = {}

    def predict(self, task: str | None, prompt: str, prior: float | None) -> float:
        lengths = self._lengths.get(task)
        if lengths:
            ordered = sorted(lengths)
            return float(ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))])
        return float(prior) if prior else self.default_len

    def observe(self, task: str | None, prompt: str, actual_len: int) -> None:
        self._lengths.setdefault(task, deque(maxlen=self.history)).append(int(actual_len))


class MiniLMPredictor:
    """The scheduler's learned predictor, trained online; the prior covers unseen tasks."""

    blocking = True

    def __init__(self, refit_every: int = 64, min_task_history: int = 8, max_records: int = 4096) -> None:
        from inlaid_ray.sched.predictor import LengthPredictor, PredictorConfig

        # The refit runs on the prediction worker, so requests queue behind it: it learns from the
        # most recent `max_records` requests, with the features kept from their prediction (no
        # second encoding). One thread, 4096 records, 512 tasks: 39 ms (a dense one-hot solve: 0.24 s).
        self._model = LengthPredictor(PredictorConfig(refit_every=refit_every, min_task_history=min_task_history,
                                                      max_records=max_records))
        self._fallback = TaskQuantilePredictor()
        self._seen: dict[str | None, int] = {}
        self.min_task_history = min_task_history

    def predict(self, task: str | None, prompt: str, prior: float | None) -> float:
        return self.predict_many([task], [prompt], [prior])[0]

    def predict_many(self, tasks: Sequence[str | None], prompts: Sequence[str],
                     priors: Sequence[float | None]) -> list[float]:
        """One encoder pass for every request of tasks with enough history; the prior-based
        fallback for the others."""
        out = [self._fallback.predict(t, p, prior) for t, p, prior in zip(tasks, prompts, priors)]
        known = [i for i, t in enumerate(tasks) if self._seen.get(t, 0) >= self.min_task_history]
        if known:
            for i, v in zip(known, self._model.predict([tasks[i] for i in known], [prompts[i] for i in known])):
                out[i] = v
        return out

    def observe(self, task: str | None, prompt: str, actual_len: int) -> None:
        self._seen[task] = self._seen.get(task, 0) + 1
        self._fallback.observe(task, prompt, actual_len)
        self._model.observe(task, prompt, max(1, actual_len))


class PredictionBatcher:
    """Runs a blocking predictor on one worker thread, every request waiting when the worker
    frees up in one call (at most `max_batch`): MiniLM on one thread takes 14 ms for one prompt
    and 26 ms for eight, so under concurrency the router predicts 4x more requests per second,
    while a lone request waits no longer. `observe` runs on the same thread (the predictor is
    not thread-safe). A failing batch, or a value that is not finite, counts as max_tokens."""

    def __init__(self, predictor: OutputLengthPredictor, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.predictor, self.max_batch = predictor, max_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inlaid-predictor")
        self._lock = threading.Lock()
        self._pending: list[tuple[str | None, str, float | None, int, asyncio.Future[float]]] = []
        self._draining = False
        many = getattr(predictor, "predict_many", None)
        self._predict_many: Callable[..., list[float]] = many if many is not None else (
            lambda tasks, prompts, priors: [predictor.predict(*args) for args in zip(tasks, prompts, priors)])

    async def predict(self, task: str | None, prompt: str, prior: float | None, max_tokens: int) -> float:
        """The bounded prediction of one request (see `bounded_prediction`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        with self._lock:
            self._pending.append((task, prompt, prior, max_tokens, future))
            start, self._draining = not self._draining, True
        if start:
            self._pool.submit(self._drain, loop)
        return await future

    def observe(self, task: str | None, prompt: str, actual_len: int) -> Future:
        """Learn from a finished request, on the predictor's thread; the future holds any error."""
        return self._pool.submit(self.predictor.observe, task, prompt, actual_len)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                if not batch:
                    self._draining = False
                    return
            try:
                values = self._predict_many([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
            except Exception:  # noqa: BLE001 - a failed prediction must not fail requests: rank them as long
                log.exception("length prediction failed for a batch of %d; using max_tokens", len(batch))
                values = [math.nan] * len(batch)
            for (task, _, _, max_tokens, future), value in zip(batch, values):
                bounded = bounded_prediction(lambda v=value: v, max_tokens, task)
                loop.call_soon_threadsafe(_resolve, future, bounded)


def _resolve(future: asyncio.Future[float], value: float) -> None:
    if not future.done():  # the request may have been cancelled meanwhile
        future.set_result(value)


_PREDICTORS: dict[str, Callable[[], OutputLengthPredictor]] = {
    "task_quantile": TaskQuantilePredictor,
    "minilm": MiniLMPredictor,
}


def default_predictor() -> str:
    """"minilm" (the learned predictor) when its encoder package is installed, else "task_quantile"."""
    from inlaid_ray.sched.predictor import MINILM_PACKAGE  # torch + transformers, already loaded by serving

    return "minilm" if importlib.util.find_spec(MINILM_PACKAGE) is not None else "task_quantile"


def make_predictor(name: str) -> OutputLengthPredictor:
    """A predictor by registered name or `module:factory` import path; ValueError otherwise."""
    if name in _PREDICTORS:
        return _PREDICTORS[name]()
    if ":" in name:
        return import_object(name)()
    raise ValueError(f"unknown length predictor {name!r}; known: {sorted(_PREDICTORS)} or a 'module:factory' path")
