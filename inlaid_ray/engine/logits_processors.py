"""Per-request logits adjustments applied on the device before sampling, in vLLM's order:
logit_bias, min_tokens, then the repetition, frequency and presence penalties (temperature and
top-k/top-p follow in `sampling.py`), plus the log-probabilities a request asked for.

Every adjustment is one batched tensor operation over the rows that need it, built from host
lists with one host-to-device copy each; there is no Python loop over the vocabulary.

Penalties, for a row with generated tokens `out` and prompt tokens `prompt`:
    count[t] = occurrences of t in out
    logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)     (OpenAI)
    for t in prompt + out: logit[t] = logit[t] / r if logit[t] > 0 else logit[t] * r  (r = repetition_penalty)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inlaid_ray.engine.request import Request, TokenLogprob


def adjust_logits(logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: frozenset[int]) -> torch.Tensor:
    """`logits` [S, vocab] fp32 with each row's processors applied (rows that need none are untouched)."""
    rows = [i for i, r in enumerate(requests) if r.params.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    device, vocab = logits.device, logits.shape[1]
    _add_bias(logits, [(i, requests[i]) for i in rows], device)
    _ban_stop_tokens(logits, [(i, requests[i]) for i in rows], eos_token_ids, vocab, device)
    penalised = [i for i in rows if _penalised(requests[i])]
    if penalised:
        _apply_penalties(logits, penalised, [requests[i] for i in penalised], device)
    return logits


def _penalised(req: Request) -> bool:
    p = req.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def _add_bias(logits: torch.Tensor, rows: list[tuple[int, Request]], device: torch.device) -> None:
    pairs = [(i, tok, bias) for i, r in rows for tok, bias in r.params.logit_bias]
    if not pairs:
        return
    idx = torch.tensor([[i, t] for i, t, _ in pairs], dtype=torch.int64).to(device, non_blocking=True)
    bias = torch.tensor([b for _, _, b in pairs], dtype=logits.dtype).to(device, non_blocking=True)
    logits.index_put_((idx[:, 0], idx[:, 1]), bias, accumulate=True)


def _ban_stop_tokens(logits: torch.Tensor, rows: list[tuple[int, Request]], eos_token_ids: frozenset[int],
                     vocab: int, device: torch.device) -> None:
    """Rows below their min_tokens cannot end: EOS (unless ignored) and stop_token_ids get -inf."""
    banned = []
    for i, r in rows:
        p = r.params
        if r.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            banned.extend((i, t) for t in sorted(stops) if t < vocab)
    if banned:
        idx = torch.tensor(banned, dtype=torch.int64).to(device, non_blocking=True)
        logits[idx[:, 0], idx[:, 1]] = float("-inf")


def _apply_penalties(logits: torch.Tensor, rows: list[int], reqs: list[Request], device: torch.device) -> None:
    vocab = logits.shape[1]
    sub = logits[rows]  # [R, V]
    width = max(1, max(r.num_tokens for r in reqs))
    # Host lists -> one padded [R, width] id matrix and a flag saying which ids are outputs.
    ids, is_out = [], []
    for r in reqs:
        toks = r.prompt_token_ids + r.output_token_ids
        pad = width - len(toks)
        ids.append(toks + [vocab] * pad)  # id `vocab` lands in a spare column that is dropped
        is_out.append([0] * r.num_prompt_tokens + [1] * r.num_output_tokens + [0] * pad)
    ids_t = torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)
    out_t = torch.tensor(is_out, dtype=sub.dtype).to(device, non_blocking=True)
    counts = torch.zeros(len(rows), vocab + 1, dtype=sub.dtype, device=device)
    counts.scatter_add_(1, ids_t, out_t)  # occurrences in the output
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, ids_t, True)  # in prompt or output
    counts, seen = counts[:, :vocab], seen[:, :vocab]
    params = [r.params for r in reqs]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=sub.dtype).to(device, non_blocking=True)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=sub.dtype).to(device, non_blocking=True)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=sub.dtype).to(device, non_blocking=True)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[rows] = sub


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], requests: Sequence[Request]) -> list[TokenLogprob | None]:
    """For rows whose request asked for logprobs: the sampled token's log-probability under the raw
    `logits` and the k most likely tokens; None for the other rows. One device-to-host copy."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(requests)
    if not rows:
        return result
    logp = torch.log_softmax(logits[rows].float(), dim=-1)  # [R, V]
    k = max(requests[i].params.logprobs or 0 for i in rows)
    picked = torch.tensor([tokens[i] for i in rows], dtype=torch.int64).to(logp.device, non_blocking=True)
    chosen = logp.gather(1, picked[:, None])  # [R, 1]
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], picked[:, None][:, :0])
    host = torch.cat([chosen, top_vals, top_ids.to(logp.dtype)], dim=1).tolist()  # ids < 2**24 are exact in fp32
    for j, i in enumerate(rows):
        row, want = host[j], requests[i].params.logprobs or 0
        top = tuple((int(row[1 + k + m]), row[1 + m]) for m in range(want))
        result[i] = TokenLogprob(tokens[i], row[0], top)
    return result
