"""Incremental detokenization with stop strings: text deltas that are never retracted.

Each step appends the new tokens and emits only text that is final:
- an incomplete UTF-8 tail (it decodes to a trailing U+FFFD) is held back until the
  token that completes it arrives;
- a tail that could be the beginning of a stop string is held back until it is clear
  whether the stop string follows; when it does, the text ends right before it.
Decoding uses vLLM's offsets (`detokenize_incrementally`): each step decodes only the
tokens since the last complete character, with a few earlier tokens as context (so
SentencePiece keeps its leading spaces); for byte-level BPE the result equals decoding
the whole output at once, which is what the tests hold it to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded as left context of the first output token (vLLM uses 5 too).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Per-request text state: feed token ids, get back safe-to-stream text deltas."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])  # context + output ids
        self._prefix_offset = 0  # decode window start
        self._read_offset = len(self._ids)  # ids before this are in `text`
        self.text = ""  # decoded output text up to the last complete character
        self.num_emitted = 0  # characters of `text` already streamed
        self.stopped = False

    @property
    def emitted_text(self) -> str:
        return self.text[: self.num_emitted]

    def update(self, new_token_ids: Sequence[int], final: bool = False, check_stop: bool = True) -> tuple[str, bool]:
        """Append tokens; return (text to stream now, True if a stop string ended the text).

        `final` flushes everything held back (the request ends for another reason).
        `check_stop=False` (before the request's min_tokens, as vLLM): stop strings neither match
        nor hold text back; text streamed then can never become part of a stop string.
        """
        assert not self.stopped, "update() after a stop string ended this request"
        self._ids.extend(new_token_ids)
        pending = self._decode_new()
        # An incomplete character at the very end stays as U+FFFD only when nothing follows.
        if pending is not None and (final or not pending.endswith(_REPLACEMENT)):
            self._commit(pending)
        if not check_stop:
            return self._emit(len(self.text)), False
        hit = self._find_stop()
        if hit is not None:
            self.stopped = True
            self.text = self.text[:hit]
            return self._emit(hit), True
        return self._emit(len(self.text) if final else self._safe_end()), False

    def _decode_new(self) -> str | None:
        """Text of the ids after `_read_offset`, or None when they add no text yet."""
        if len(self._ids) == self._read_offset:
            return None
        window = self._ids[self._prefix_offset :]
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(window)
        return full[len(prefix) :] if len(full) > len(prefix) else None

    def _commit(self, new_text: str) -> None:
        self.text += new_text
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _find_stop(self) -> int | None:
        """Start of the earliest stop string in the not yet streamed text, if any."""
        # A stop string cannot start inside streamed text: that text was never a stop prefix.
        hits = [i for s in self.stop if (i := self.text.find(s, self.num_emitted)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """End of the text that cannot turn out to be the start of a stop string."""
        n = end = len(self.text)
        for s in self.stop:
            # Longest proper prefix of `s` that the text ends with.
            for k in range(min(len(s) - 1, n - self.num_emitted), 0, -1):
                if self.text.endswith(s[:k]):
                    end = min(end, n - k)
                    break
        return max(end, self.num_emitted)

    def _emit(self, end: int) -> str:
        delta = self.text[self.num_emitted : end]
        self.num_emitted = max(self.num_emitted, end)
        return delta
