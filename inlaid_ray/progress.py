"""Progress bars that suit where the output goes: a live tqdm bar on a terminal; elsewhere (a log
file, CI, a Ray worker's log) a plain line when the bar starts, at most one every
`LOG_INTERVAL_S` seconds, and one when it ends: never a line per refresh."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Discard:
    """tqdm's own writes ('\\r' redraws, the closing newline) go nowhere off a terminal."""

    def write(self, _: str) -> None:
        return None

    def flush(self) -> None:
        return None


class Progress(tqdm):
    """`tqdm` with the same arguments; off a terminal it writes whole, rate-limited lines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        out = kwargs.get("file") or sys.stderr
        self._plain_out = None if getattr(out, "isatty", lambda: False)() else out
        self._last_line = float("-inf")
        self._closing = False
        if self._plain_out is not None:
            kwargs.update(file=_Discard(), mininterval=LOG_INTERVAL_S, ncols=100, ascii=True, leave=True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if self._plain_out is None:
            return super().display(msg, pos)
        now = time.monotonic()
        if self._closing or now - self._last_line >= LOG_INTERVAL_S:
            self._last_line = now
            print(self.__str__(), file=self._plain_out, flush=True)
        return None

    def close(self) -> None:
        if not self.disable:
            self._closing = True
        super().close()
