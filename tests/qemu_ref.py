"""Run a Multiboot guest under QEMU (TCG, vmport on): the reference our backends are compared
with.

The command line is the one the guests are written for:

    qemu-system-x86_64 -accel tcg -machine pc,vmport=on -debugcon file:OUT
        -device isa-debug-exit,iobase=0xf4,iosize=4 -display none -kernel GUEST.elf

plus -nodefaults (no NIC, VGA or serial to slow things down or print), -no-reboot (a
triple fault ends the run with status 0 instead of looping) and a fixed -m. A guest's exit
status is QEMU's: (value written to 0xf4 << 1) | 1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

QEMU = "qemu-system-x86_64"
#: Generous: a guest run takes well under a second under TCG; this only stops a hang.
DEFAULT_TIMEOUT = 120.0


class QemuRun(NamedTuple):
    text: str
    status: int

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @property
    def stable_lines(self) -> list[str]:
        """The lines comparisons use: without the "~ " lines of time-varying raw values."""
        return [line for line in self.lines if not line.startswith("~ ")]


class QemuTimeout(AssertionError):
    pass


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def require_qemu() -> str:
    """The QEMU binary, or skip the calling test with the reason printed."""
    binary = qemu_binary()
    if binary is None:
        reason = f"{QEMU} not found on PATH (Debian package qemu-system-x86): QEMU tests skipped"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    return binary


def run_multiboot(
    kernel: Path,
    *,
    cmdline: str | None = None,
    memory_mib: int = 64,
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> QemuRun:
    """Boot ``kernel`` with QEMU's Multiboot loader; return (debugcon text, exit status).

    Skips the test if QEMU is missing. Raises QemuTimeout (with the output so far) if the
    guest has not exited after ``timeout`` seconds.
    """
    binary = require_qemu()
    with tempfile.TemporaryDirectory(prefix="hvmport-qemu-") as tmp:
        out = Path(tmp) / "debugcon.txt"
        cmd = [
            binary, "-accel", "tcg", "-machine", "pc,vmport=on", "-m", str(memory_mib),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-debugcon", f"file:{out}",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(kernel),
            *extra_args,
        ]
        if cmdline is not None:
            cmd += ["-append", cmdline]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            so_far = out.read_text("latin-1") if out.exists() else ""
            raise QemuTimeout(
                f"{kernel.name} did not exit within {timeout:g} s under QEMU; "
                f"debugcon so far:\n{so_far}"
            ) from None
        if proc.stderr:
            print(proc.stderr, file=sys.stderr)
        text = out.read_text("latin-1") if out.exists() else ""
    return QemuRun(text, proc.returncode)
