"""Progress off a terminal: whole lines, no carriage-return redraws, no line per refresh."""

from __future__ import annotations

import io

from inlaid_ray.progress import Progress


def test_off_a_terminal_progress_writes_a_start_and_an_end_line_only():
    out = io.StringIO()  # not a TTY, like a log file or CI
    bar = Progress(total=500, desc="work", unit="step", file=out)
    for _ in range(500):
        bar.update(1)
        bar.set_postfix_str("task")  # forces a refresh each step, as callers do
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2, lines  # start and end; the 30 s interval never elapsed
    assert lines[0].startswith("work:   0%") and lines[1].startswith("work: 100%") and "500/500" in lines[1]


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    for _ in Progress(range(10), file=out, disable=True):
        pass
    assert out.getvalue() == ""
