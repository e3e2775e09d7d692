"""Progress bars that behave in logs.

On a terminal `progress_bar(...)` is a plain tqdm bar. When its stream is not a terminal (a log
file, a pipe, Ray's captured stderr) tqdm would write every refresh as `\\r` + bar, which a log
keeps as one ever-growing line (20 KB per training run in `rerank up`'s log). There the bar
is a `LogBar`: the same tqdm bar, drawn as plain newline-terminated lines, at most one per
`every_s` seconds (default 30, `$RERANK_PROGRESS_EVERY_S`) and a last one when it closes: a
long job still shows every 30 s that it moves, a short one leaves one summary line (count,
elapsed time, rate). Bars that would vanish on a terminal (`leave=False`) keep that line.

In Jupyter (stderr not a terminal either) `tqdm.auto` picks the notebook widget, which is used.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import IO, Iterable

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm  # imports tqdm.autonotebook with its notebook warning silenced
from tqdm.autonotebook import tqdm as notebook_tqdm  # tqdm itself outside a notebook

DEFAULT_EVERY_S = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("RERANK_PROGRESS_EVERY_S", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


class _Lines:
    """A file for tqdm: keeps the newest status tqdm drew (`\\r`, cursor moves and blanks
    dropped) and writes it as one line on flush, at most one line per `every_s` counted from
    the bar's start."""

    def __init__(self, stream: IO[str], every_s: float) -> None:
        self.stream, self.every_s = stream, every_s
        self.pending: str | None = None
        self.last = time.monotonic()  # the first line once every_s has passed (or at the close)

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _ANSI.sub("", text)):
            if part.strip():
                self.pending = part.rstrip()
        return len(text)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.pending is not None and (force or now - self.last >= self.every_s):
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.pending, self.last = None, now


class LogBar(tqdm):
    """tqdm drawn as plain lines, at most one per `every_s` seconds, and a last one on close."""

    def __init__(self, *args, file: IO[str] | None = None, every_s: float | None = None, **kwargs) -> None:
        every_s = _every_s() if every_s is None else every_s
        self._lines = _Lines(file if file is not None else sys.stderr, every_s)
        kwargs.update(leave=True, dynamic_ncols=False, ascii=True, mininterval=every_s,
                      maxinterval=max(every_s, kwargs.get("maxinterval", 10.0)))
        super().__init__(*args, file=self._lines, **kwargs)

    def close(self) -> None:
        super().close()
        self._lines.flush(force=True)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", enabled: bool = True, file: IO[str] | None = None, every_s: float | None = None,
             **tqdm_kwargs) -> tqdm:
    """A progress bar over `iterable` (or `total` steps, advanced with `.update(n)`) on `file`
    (default: sys.stderr at the call): tqdm on a terminal, a `LogBar` elsewhere (see the module
    docstring); `enabled=False` gives a disabled bar (iterates, draws nothing). Other keyword
    arguments go to tqdm (on a terminal all of them; a LogBar sets its own interval and leave)."""
    stream = file if file is not None else sys.stderr
    kwargs = dict(total=total, desc=desc, unit=unit, disable=not enabled, **tqdm_kwargs)
    if not enabled or _is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    if notebook_tqdm is not tqdm:  # in a notebook: the widget
        return auto_tqdm(iterable, **kwargs)
    return LogBar(iterable, file=stream, every_s=every_s, **kwargs)
