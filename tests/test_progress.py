"""rerank.infra.progress: tqdm on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io
import time

from tqdm import tqdm

from rerank.infra.progress import LogBar, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_no_carriage_returns_and_few_lines():
    log = io.StringIO()  # not a terminal, like stderr redirected to a file
    bar = progress_bar(total=2000, desc="replay", unit="ev", file=log, every_s=0.2, leave=False)
    assert isinstance(bar, LogBar)
    started = time.monotonic()
    for step in range(200):  # ~1 s of updates and postfix refreshes, each of which tqdm would draw
        bar.update(10)
        bar.set_postfix(loss=f"{step / 7:.4f}")
        time.sleep(0.005)
    bar.close()
    elapsed = time.monotonic() - started
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert text.endswith("\n") and all(line.strip() for line in lines)
    assert 2 <= len(lines) <= elapsed / 0.2 + 2  # one per interval at most, plus the last
    assert lines[-1].startswith("replay: 100%") and "2000/2000" in lines[-1]  # leave=False keeps it in a log


def test_a_short_job_leaves_one_summary_line():
    log = io.StringIO()
    for _ in progress_bar(range(50), desc="evaluate", file=log):  # the default interval, 30 s
        pass
    assert log.getvalue().count("\n") == 1 and "50/50" in log.getvalue() and "\r" not in log.getvalue()


def test_disabled_draws_nothing():
    log = io.StringIO()
    assert list(progress_bar(range(3), file=log, enabled=False)) == [0, 1, 2]
    assert log.getvalue() == ""


def test_on_a_terminal_it_is_a_plain_tqdm_bar():
    terminal = FakeTerminal()
    bar = progress_bar(total=5, desc="train", file=terminal, leave=False)
    assert type(bar) is tqdm and not isinstance(bar, LogBar)
    bar.update(5)
    bar.close()
    assert "\r" in terminal.getvalue()  # tqdm's own refreshes, as before
