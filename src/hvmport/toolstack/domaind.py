"""A domain's monitor process: runs the domain and answers the xl-shaped verbs about it.

``hvmport create`` starts one per domain (in the background, or in the foreground with
``-F``), as xl leaves a process behind for each domain it creates. The monitor is the
hypervisor process of its domain: it runs :func:`hvmport.hv.run.run` on its main thread
(device models die with the thread that started them), serves the toolstack socket
(``info``, ``pause``, ``unpause``, ``destroy``) and the serial console, keeps the domain's
``info.json`` current and applies ``on_poweroff``/``on_reboot``/``on_crash`` when a run
ends. When the domain is gone it removes its directory: nothing is left behind.

Usage (internal): ``python -m hvmport.toolstack.domaind --dir DIR --ready-fd FD [--paused]``
with the checked configuration in ``DIR/domain.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from hvmport import unixsock
from hvmport.errors import HvmportError
from hvmport.hv.lifecycle import Ending, Lifecycle
from hvmport.toolstack import config as domain_config
from hvmport.toolstack.config import DomainConfig
from hvmport.toolstack.console import ConsoleHub
from hvmport.toolstack.registry import DomainInfo, Registry, process_start

#: A domain that restarts this many times, each run shorter than RESTART_WINDOW seconds,
#: is left crashed instead of restarted again (a boot loop would burn the host).
MAX_QUICK_RESTARTS = 5
RESTART_WINDOW = 10.0
MAX_REQUEST = 4096


class ToolstackServer:
    """One JSON request line, one JSON reply line, per connection."""

    def __init__(self, path: str, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self.handle = handle
        self.sock = unixsock.listen(path)
        self._thread = threading.Thread(target=self._serve, name="toolstack", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.sendall(self._answer(_read_line(conn)))

    def _answer(self, line: bytes) -> bytes:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("expected {\"op\": ...}")
            reply = self.handle(request)
        except ValueError as e:
            reply = {"error": f"bad request: {e}"}
        except HvmportError as e:
            reply = {"error": str(e)}
        return json.dumps(reply).encode() + b"\n"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        unixsock.remove(self.path)


def _read_line(conn: socket.socket) -> bytes:
    data = bytearray()
    while b"\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return bytes(data).split(b"\n", 1)[0]


def request(path: str | os.PathLike[str], op: str, timeout: float = 10.0) -> dict[str, Any]:
    """Ask a domain's monitor; raises OSError if it is not there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(json.dumps({"op": op}).encode() + b"\n")
        line = _read_line(s)
    reply: dict[str, Any] = json.loads(line) if line else {"error": "no answer"}
    return reply


class Monitor:
    def __init__(self, cfg: DomainConfig, domid: int, directory: Path, registry: Registry,
                 *, paused: bool, ready: Callable[[str | None], None],
                 stdout: BinaryIO, trace: str | None = None) -> None:
        self.cfg = cfg
        self.domid = domid
        self.dir = directory
        self.registry = registry
        self.ready = ready
        self.stdout = stdout
        self.trace = trace
        self.lifecycle = Lifecycle(paused=paused)
        pid = os.getpid()
        self.info = DomainInfo(domid, cfg.name, pid, process_start(pid) or 0, cfg.memory_mib,
                               cfg.vcpus, state="paused" if paused else "running",
                               config=domain_config.to_json(cfg))
        self._lock = threading.Lock()
        self._destroyed = threading.Event()
        self._announced = False
        self._runs = 0
        self.hub = (ConsoleHub(str(directory / "console.sock"))
                    if cfg.serial.kind == "pty" else None)
        self.server = ToolstackServer(str(directory / "toolstack.sock"), self._request)
        self.lifecycle.on_change.append(self._state_changed)

    # -- the toolstack's requests (its own thread) --------------------------------------

    def _request(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "info":
            return {"ok": True, "info": self.info.as_json(self.registry.base)}
        if op in ("pause", "unpause"):
            with self._lock:
                state = self.info.state
            if state not in ("running", "paused"):
                return {"error": f"domain {self.cfg.name} is {state}"}
            if op == "pause":
                self.lifecycle.pause()
            else:
                self.lifecycle.unpause()
            return {"ok": True}
        if op == "destroy":
            self.destroy("the toolstack")
            return {"ok": True}
        return {"error": f"unknown request {op!r}"}

    def destroy(self, who: str) -> None:
        self._set_state("dying")
        self._destroyed.set()
        self.lifecycle.destroy(who)

    def _state_changed(self, state: str) -> None:
        self._set_state(state)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        with self._lock:
            if self.info.state == "dying" and state != "dying":
                return
            self.info.state = state
            if reason is not None:
                self.info.reason = reason
            self.registry.publish(self.info)

    # -- the domain (main thread) -------------------------------------------------------

    def run(self) -> int:
        from hvmport.hv.run import run

        quick_restarts = 0
        status = 0
        try:
            while not self._destroyed.is_set():
                started = time.monotonic()
                try:
                    result = run(self._run_config())
                except HvmportError as e:
                    if not self._announced:
                        self.ready(f"{e.party} error: {e}")
                        return 2
                    self._set_state("crashed", f"{e.party} error: {e}")
                    status = 2
                    break
                status = result.status
                self._log(f"domain {self.cfg.name} ({self.domid}): {result.ending.value}: "
                          f"{result.reason}")
                action = self._action(result.ending)
                crashed = result.ending not in (Ending.POWEROFF, Ending.REBOOT)
                if action == "restart":
                    quick = time.monotonic() - started < RESTART_WINDOW
                    quick_restarts = quick_restarts + 1 if quick else 0
                    if quick_restarts >= MAX_QUICK_RESTARTS:
                        self._log("restarting too fast; leaving the domain crashed")
                        action, crashed = "preserve", True
                    else:
                        self._set_state("running", "")
                        continue
                if action == "preserve":
                    self._set_state("crashed" if crashed else "shutdown", result.reason)
                    # Timed waits, so that SIGTERM's handler gets to run.
                    while not self._destroyed.wait(1.0):
                        pass
                break
        finally:
            self.close()
        return status

    def _action(self, ending: Ending) -> str:
        if ending is Ending.DESTROY or self._destroyed.is_set():
            return "destroy"
        if ending is Ending.POWEROFF:
            return self.cfg.on_poweroff
        if ending is Ending.REBOOT:
            return self.cfg.on_reboot
        if ending is Ending.TIMEOUT:
            return "destroy"
        return self.cfg.on_crash

    def _run_config(self) -> Any:
        from hvmport.hv.run import Image, RunConfig

        cfg = self.cfg
        console = self._debugcon()
        serial = (f"fd:{self.hub.dm_fd}" if self.hub is not None else str(cfg.serial))
        dm_args = ["--serial", "-" if serial == "stdio" else serial,
                   "--qmp", str(self.dir / "qmp.sock"), "--machine", cfg.machine_args,
                   "--uuid", cfg.uuid,
                   *(arg for k, v in cfg.guestinfo for arg in ("--guestinfo", f"{k}={v}")),
                   *cfg.device_model_args]
        extra: dict[str, Any] = {}
        if self.trace is not None:
            # Each run's trace is merged when the run ends: a restart must not overwrite
            # the one before, so runs after the first get FILE.2, FILE.3, ...
            self._runs += 1
            extra["trace"] = self.trace if self._runs == 1 else f"{self.trace}.{self._runs}"
        return RunConfig(
            Image(cfg.kernel, cmdline=cfg.cmdline, ramdisk=cfg.ramdisk),
            backend=cfg.cpu_backend, memory_mib=cfg.memory_mib, vcpus=cfg.vcpus,
            vmware_port=cfg.vmware_port, vmware_hwver=cfg.vmware_hwver, console=console,
            domid=self.domid, device_model=True, dm_args=[dm_args],
            note=self._log, lifecycle=self.lifecycle,
            control_path=str(self.dir / "control.sock"),
            dm_pass_fds=(self.hub.dm_fd,) if self.hub is not None else (),
            on_started=self._started, **extra)

    def _debugcon(self) -> Any:
        where = self.cfg.debugcon
        if where == "console":
            return self.hub if self.hub is not None else self.stdout
        if where.startswith("file:"):
            return _AppendFile(where[5:])
        return None

    def _started(self, dm_pids: list[int]) -> None:
        with self._lock:
            self.info.dm_pids = dm_pids
        self._set_state("paused" if self.lifecycle.paused else "running")
        if not self._announced:
            self._announced = True
            self.ready(None)

    def _log(self, text: str) -> None:
        if text.startswith("backend: "):
            with self._lock:
                self.info.backend = text.removeprefix("backend: ").split(" ", 1)[0]
        print(f"hvmport: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.server.close()
        if self.hub is not None:
            self.hub.close()
        self.registry.remove(self.domid)


class _AppendFile:
    """The debug console to a file, opened once per run."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the run

    def write(self, data: bytes) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvmport-domaind", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--paused", action="store_true")
    p.add_argument("--trace", metavar="FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory: Path = args.dir
    registry = Registry(directory.parent)
    ready_fd: int = args.ready_fd

    def ready(error: str | None) -> None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"ready\n" if error is None else f"error: {error}\n".encode())
            os.close(ready_fd)

    try:
        cfg = domain_config.from_json(json.loads((directory / "domain.json").read_text()))
        monitor = Monitor(cfg, int(directory.name), directory, registry, paused=args.paused,
                          ready=ready, stdout=sys.stdout.buffer, trace=args.trace)
    except (HvmportError, OSError, ValueError) as e:
        ready(f"cannot start the domain: {e}")
        registry.remove(int(directory.name))
        return 2
    # The toolstack's SIGTERM (or a logout) destroys the domain cleanly, as destroy does.
    signal.signal(signal.SIGTERM, lambda *_: monitor.destroy("SIGTERM"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return monitor.run()


if __name__ == "__main__":
    sys.exit(main())
