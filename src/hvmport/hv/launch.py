"""Starting a device-model process and making sure it ends with its domain.

The device model runs as ``python -m hvmport.dm`` with the control socket's path. It says it
is ready (its ioreq server is enabled) on a pipe; if it dies first, what it printed on stderr
is already on ours and the launcher says so. At the end it is asked to leave by closing the
control socket, and killed if it does not.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from hvmport.errors import DeviceModelFault

DEFAULT_PROGRAM = (sys.executable, "-m", "hvmport.dm")


class DeviceModelProcess:
    def __init__(self, control_path: str, domid: int, args: Sequence[str] = (),
                 ready_timeout: float = 30.0, name: str = "device model",
                 program: Sequence[str] | None = None,
                 pass_fds: Sequence[int] = ()) -> None:
        self.name = name
        read_fd, write_fd = os.pipe()
        # Any program that speaks the control protocol can be the device model; it gets
        # the same three arguments first.
        cmd = [*(program or DEFAULT_PROGRAM), "--control", control_path,
               "--domid", str(domid), "--ready-fd", str(write_fd), *args]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(write_fd, *pass_fds),
                                         stdin=subprocess.DEVNULL)
        finally:
            os.close(write_fd)
        try:
            self._await_ready(read_fd, ready_timeout)
        except BaseException:
            self.stop(grace=0)
            raise
        finally:
            os.close(read_fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _await_ready(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        got = b""
        while b"\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceModelFault(f"{self.name} (pid {self.pid}) not ready after "
                                       f"{timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 64)
                if not chunk:
                    status = self.proc.wait(timeout=5)
                    raise DeviceModelFault(f"{self.name} (pid {self.pid}) exited with "
                                           f"{describe_status(status)} before it was ready")
                got += chunk

    def describe_exit(self, wait: float = 0.5) -> str:
        """What became of the process, for a crash reason."""
        try:
            status = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return f"{self.name} (pid {self.pid}) is still running"
        return f"{self.name} (pid {self.pid}) {describe_status(status)}"

    def stop(self, grace: float = 3.0) -> None:
        """Wait for it to leave (it does once the control socket closes), then insist."""
        for action in (None, self.proc.terminate, self.proc.kill):
            if self.proc.poll() is not None:
                return
            if action is not None:
                action()
            try:
                self.proc.wait(timeout=grace if action is None else 2.0)
            except subprocess.TimeoutExpired:
                continue


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
