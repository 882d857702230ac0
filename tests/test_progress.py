"""Progress output: plain lines off a terminal, one redrawn line on a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import time

from hvmport.progress import Progress


def test_plain_output_is_a_start_line_and_an_end_line() -> None:
    out = io.StringIO()
    with Progress("building things", total=3, stream=out) as p:
        for _ in range(3):
            p.advance(note="x")
    lines = out.getvalue().splitlines()
    assert lines[0] == "hvmport: building things..."
    assert lines[1].startswith("hvmport: building things: done (")
    assert len(lines) == 2 and "\r" not in out.getvalue()


def test_a_failure_says_so() -> None:
    out = io.StringIO()
    try:
        with Progress("waiting", stream=out):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert out.getvalue().splitlines()[-1].startswith("hvmport: waiting: failed (")


def test_on_a_terminal_the_line_is_redrawn_with_a_bar() -> None:
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            p = Progress("copying", total=4, stream=tty)
            time.sleep(0.15)  # redraws are throttled
            p.advance(2)
            p.finish()
        data = ""
        while "done (" not in data:  # a pty hands the bytes over in pieces
            ready, _, _ = select.select([master], [], [], 5)
            assert ready, f"no more output after {data!r}"
            data += os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "\x1b[K" in data  # redrawn in place, not scrolled
    assert "0/4" in data and "[" + "#" * 12 + " " * 12 + "] 2/4" in data
    assert data.rstrip().endswith(")") and "copying: done (" in data
