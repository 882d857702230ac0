"""Fixtures shared by the end-to-end tests: both CPU backends, and running `hvmport run`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.xltools import Xl


def kvm_unusable() -> str | None:
    from hvmport.cpu.kvm import probe_kvm

    return probe_kvm()


@pytest.fixture(params=["kvm", "unicorn"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs on both backends; KVM skips only where it is unusable."""
    name: str = request.param
    if name == "kvm":
        why = kvm_unusable()
        if why is not None:
            print(f"skipping KVM: {why}")
            pytest.skip(f"/dev/kvm unusable: {why}")
    return name


@dataclass
class Run:
    status: int
    console: str
    stdout: str
    stderr: str

    def lines(self, *, raw: bool = False) -> list[str]:
        """Debug-console lines; without ``raw`` the '~ ' lines of varying values are dropped."""
        return [ln for ln in self.console.splitlines() if raw or not ln.startswith("~")]


def hvmport_run(tmp_path: Path, *args: str, timeout: float = 120) -> Run:
    """Run the real CLI in a subprocess, the way a user does."""
    console = tmp_path / "debugcon.txt"
    cmd = [sys.executable, "-m", "hvmport.cli", "run", "--debugcon", str(console),
           "--timeout", "60", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    text = console.read_text(encoding="latin-1") if console.exists() else ""
    return Run(proc.returncode, text, proc.stdout, proc.stderr)


def guest(name: str, variant: str = "multiboot") -> str:
    from hvmport import guests

    return str(guests.guest_path(name, variant))


@pytest.fixture
def xl(tmp_path: Path) -> Iterator[Xl]:
    """The xl verbs against a private run directory; whatever a failing test left running
    is killed, so that nothing outlives the test."""
    from tests.xltools import Xl

    x = Xl(tmp_path)
    yield x
    if x.run_dir.exists():
        for d in x.domains():
            with contextlib.suppress(ProcessLookupError):
                os.kill(d["pid"], signal.SIGKILL)
