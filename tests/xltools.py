"""Driving the xl-shaped verbs from tests: the real CLI, a private run directory, a console
on a pseudo-terminal, the real qemu.qmp client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hvmport.toolstack.registry import process_start


class Xl:
    """Runs ``hvmport VERB ...`` against a private run directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.run_dir = tmp_path / "run"
        self.env = {**os.environ, "HVMPORT_RUN_DIR": str(self.run_dir)}

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hvmport.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def cfg(self, name: str, kernel: str, *lines: str) -> Path:
        path = self.tmp / f"{name}.cfg"
        path.write_text(f'name = "{name}"\ntype = "hvm"\nkernel = "{kernel}"\n'
                        + "".join(line + "\n" for line in lines))
        return path

    def create(self, cfg: Path, *extra: str) -> None:
        res = self("create", str(cfg), *extra)
        assert res.returncode == 0, res.stderr

    def domains(self) -> list[dict[str, Any]]:
        res = self("list", "-l")
        assert res.returncode == 0, res.stderr
        domains: list[dict[str, Any]] = json.loads(res.stdout)
        return domains

    def domain(self, name: str) -> dict[str, Any]:
        (d,) = [d for d in self.domains() if d["name"] == name]
        return d

    def wait_gone(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while any(d["name"] == name for d in self.domains()):
            assert time.monotonic() < deadline, f"domain {name} still there"
            time.sleep(0.1)

    def leftovers(self) -> list[str]:
        if not self.run_dir.exists():
            return []
        return sorted(p.name for p in self.run_dir.iterdir() if p.name.isdigit())


class Console:
    """``hvmport console DOM`` on a pseudo-terminal, as a user at a terminal runs it."""

    def __init__(self, xl: Xl, name: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.execve(sys.executable, [sys.executable, "-m", "hvmport.cli", "console", name],
                      xl.env)
        self.out = b""

    def read_until(self, text: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while text not in self.out:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {text!r}; got {self.out!r}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"console closed before {text!r}; got {self.out!r}"
                self.out += chunk
        return self.out

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def qmp(path: str, *commands: tuple[str, dict[str, Any] | None],
        until_event: str | None = None) -> tuple[list[Any], list[str]]:
    from qemu.qmp import QMPClient

    async def go() -> tuple[list[Any], list[str]]:
        client = QMPClient("test")
        await client.connect(path)
        answers = [await client.execute(name, args) for name, args in commands]
        events: list[str] = []
        if until_event is not None:
            async with asyncio.timeout(30):
                async for ev in client.events:
                    events.append(ev["event"])
                    if ev["event"] == until_event:
                        break
        # The device model leaves with its domain: an EOF here is the domain ending.
        with contextlib.suppress(EOFError):
            await client.disconnect()
        return answers, events

    return asyncio.run(go())


def abs_move(x: int, y: int) -> tuple[str, dict[str, Any]]:
    return ("input-send-event", {"events": [{"type": "abs", "data": {"axis": "x", "value": x}},
                                            {"type": "abs", "data": {"axis": "y", "value": y}}]})


def alive(pid: int) -> bool:
    return process_start(pid) is not None
