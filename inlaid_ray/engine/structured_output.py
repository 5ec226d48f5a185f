"""Structured output in the engine: each constrained request holds an llguidance matcher (the
grammar's state after the tokens it has generated); each step the constrained rows of the batch
get a token bitmask filled on the host and applied to their logits in one tensor operation before
sampling; after sampling each matcher consumes its token. A matcher that reaches the end of its
grammar finishes the request ("stop"), as EOS would.

One owner: the engine's `StructuredOutputManager` holds the llguidance tokenizer (built once:
by `prepare()` when a replica starts, else on the first constrained request) and the bitmask
buffer, preallocated for `max_num_seqs` rows and refilled every step (vLLM's structured-output
manager does the same).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer

from inlaid_ray.engine.grammar import MAX_ERROR_CHARS, grammar_of
from inlaid_ray.engine.request import Request, StructuredOutput
from inlaid_ray.errors import InvalidRequest

log = logging.getLogger(__name__)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V/32)] int32 (bit b of word w allows token 32*w + b) -> [R, V] bool allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask[:, :, None] >> bits) & 1  # arithmetic shift; `& 1` keeps the one bit
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class StructuredOutputManager:
    """Grammar matchers for requests, and the per-step mask over the logits of constrained rows."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], max_num_seqs: int) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: LLTokenizer | None = None
        words = (vocab_size + 31) // 32
        self._bitmask = torch.zeros(max_num_seqs, words, dtype=torch.int32,
                                    pin_memory=torch.cuda.is_available())

    def matcher(self, spec: StructuredOutput) -> LLMatcher:
        """A fresh matcher for one request (InvalidRequest if the grammar does not compile)."""
        matcher = LLMatcher(self._tokenizer(), grammar_of(spec), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid {spec.kind.replace('_', ' ')}: {matcher.get_error()[:MAX_ERROR_CHARS]}")
        return matcher

    def mask(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """`logits` [S, V] with every token the row's grammar forbids at -inf (a copy when any row
        is constrained; `logits` itself is left as it is, for the raw log-probabilities)."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return logits
        # Refilled every step: safe because the previous step's copy of it has landed (sample()
        # reads its tokens back to the host, which waits for the stream). Keep that in mind if
        # sampling ever stays on the device.
        bitmask = self._bitmask[: len(rows)]
        for j, i in enumerate(rows):
            word_row = bitmask[j]
            requests[i].grammar.unsafe_compute_mask_ptr(word_row.data_ptr(), word_row.numel() * word_row.element_size())
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        out = logits.clone()
        index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        out[index] = out[index].masked_fill(~allowed, float("-inf"))
        return out

    @staticmethod
    def advance(req: Request, token: int) -> bool:
        """Feed the sampled token to the request's matcher; True when the grammar is complete.
        RuntimeError when the matcher failed (a parser limit hit while computing the mask leaves
        it allowing only EOS, which it would then accept): the engine aborts that request."""
        grammar = req.grammar
        if grammar.is_error() or not grammar.consume_token(token) or grammar.is_error():
            raise RuntimeError(f"request {req.request_id}: its grammar failed at token {token}: {grammar.get_error()}")
        return grammar.is_stopped()

    def prepare(self) -> None:
        """Build the llguidance tokenizer now (~0.4-1 s), not on the first constrained request,
        which would hold up the serving event loop that many requests share."""
        self._tokenizer()

    def _tokenizer(self) -> LLTokenizer:
        if self._ll_tokenizer is None:
            import llguidance.hf

            # n_vocab = the logits' width, so ids the tokenizer lacks (padding rows) are masked too.
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size,
                                                              eos_token=self._eos_token_ids)
        return self._ll_tokenizer
