"""Progress for long work (building guests, waiting for a domain, downloads).

On a terminal: one line redrawn in place, with a bar when the total is known and a spinner
when it is not. Anywhere else (a pipe, a log, CI): plain lines, one when the work starts
and one when it ends, so that logs stay readable and diffable.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

_SPINNER = "|/-\\"
BAR_WIDTH = 24
#: A terminal line is redrawn at most this often.
REDRAW_INTERVAL = 0.1


class Progress:
    def __init__(self, what: str, total: int | None = None, *, stream: TextIO | None = None,
                 prefix: str = "hvmport: ") -> None:
        self.what = what
        self.total = total
        self.done_count = 0
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.tty = _isatty(self.stream)
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._spin = 0
        self._ended = False
        if self.tty:
            self._draw(force=True)
        else:
            self._line(f"{what}...")

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done_count += n
        if self.tty:
            self._draw(note)

    def tick(self, note: str = "") -> None:
        """Nothing measurable happened, but the work goes on (spinner)."""
        if self.tty:
            self._draw(note)

    def finish(self, result: str = "done") -> None:
        if self._ended:
            return
        self._ended = True
        elapsed = time.monotonic() - self._start
        text = f"{self.what}: {result} ({elapsed:.1f} s)"
        if self.tty:
            self.stream.write("\r\x1b[K" + self.prefix + text + "\n")
            self.stream.flush()
        else:
            self._line(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish("done" if exc is None else "failed")

    def _line(self, text: str) -> None:
        self.stream.write(self.prefix + text + "\n")
        self.stream.flush()

    def _draw(self, note: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._last_draw = now
        if self.total:
            frac = min(1.0, self.done_count / self.total)
            filled = int(frac * BAR_WIDTH)
            status = (f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}] "
                      f"{self.done_count}/{self.total}")
        else:
            self._spin = (self._spin + 1) % len(_SPINNER)
            status = f"{_SPINNER[self._spin]} {now - self._start:.0f} s"
        line = f"{self.prefix}{self.what} {status}"
        if note:
            line += f" {note}"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
