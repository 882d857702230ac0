"""Seconds from start to the Linux guest's shell: hvmport on Unicorn against QEMU's TCG.

Both boot the same Debian kernel, initramfs and command line (``hvmport guest linux``):
hvmport loads the vmlinux the recipe extracted, QEMU its own way from the bzImage. The clock
starts when the process is started and stops when the serial console shows /init's first
line (``hvmport-init: started``), so the figure includes everything a user waits for:
process start-up, loading, the kernel's boot and the start of user space.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from hvmport.errors import HostError

MARKER = b"hvmport-init: started"
TIMEOUT_S = 300.0


def seconds_to_shell(command: list[str]) -> float:
    """Run ``command`` until its stdout shows MARKER; the seconds that took."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    tail = b""
    try:
        for line in proc.stdout:
            if MARKER in line:
                return time.perf_counter() - started
            tail = (tail + line)[-400:]
            if time.perf_counter() - started > TIMEOUT_S:
                break
    finally:
        proc.kill()
        proc.wait()
    raise RuntimeError(f"{command[0]}: no {MARKER.decode()!r} on the console; it ended with "
                       f"{tail.decode(errors='replace')!r}")


def scenarios() -> tuple[list[tuple[str, Callable[[], float], str | None]], str | None]:
    """(name, measure, reason to skip) for each boot scenario, or a reason for all."""
    from hvmport import linuxguest

    try:
        guest = linuxguest.build()
    except HostError as e:
        return [], f"no Linux guest: {e}"
    hvmport = [sys.executable, "-m", "hvmport.cli", "run", "--backend", "unicorn",
               "--memory", "256", "--kernel", str(guest.vmlinux), "--ramdisk",
               str(guest.initrd), "--cmdline", guest.cmdline, "--debugcon", "/dev/null"]
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "256",
            "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(guest.bzimage), "-initrd", str(guest.initrd),
            "-append", guest.cmdline]
    no_qemu = None if shutil.which(qemu[0]) else "qemu-system-x86_64 not installed"
    return [
        ("linux_boot_unicorn", lambda: seconds_to_shell(hvmport), None),
        ("qemu_tcg_linux_boot", lambda: seconds_to_shell(qemu), no_qemu),
    ], None
