"""The xl-shaped verbs: create, list, console, destroy, pause, unpause.

They behave like xl's: ``create`` returns once the domain runs (its monitor process stays
behind, see :mod:`hvmport.toolstack.domaind`), domains are addressed by name or id, ``list``
prints ``Name ID Mem VCPUs State Time(s)`` and ``list -l`` JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from hvmport.errors import ConfigError, HostError
from hvmport.progress import Progress
from hvmport.toolstack import config as domain_config
from hvmport.toolstack import console as console_mod
from hvmport.toolstack.domaind import request
from hvmport.toolstack.registry import DomainInfo, Registry, is_alive, process_start

#: How long ``create`` waits for the domain to run, and ``destroy`` for it to be gone.
START_TIMEOUT = 120.0
DESTROY_TIMEOUT = 15.0
#: xl's state letters: running, blocked, paused, shutdown, crashed, dying.
_STATE_LETTER = {"running": "r", "paused": "p", "shutdown": "s", "crashed": "c", "dying": "d"}
_STATE_ORDER = "rbpscd"


def create(cfg_path: str | None, overrides: Sequence[str], *, paused: bool = False,
           foreground: bool = False, console: bool = False, trace: str | None = None,
           registry: Registry | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stderr
    reg = registry or Registry()
    if cfg_path is not None:
        print(f'Parsing config from {cfg_path}', file=out)
    cfg = domain_config.load(cfg_path, overrides)
    for warning in cfg.ignored:
        print(f"hvmport: warning: {warning}", file=out)
    domid, directory = reg.allocate(cfg.name)
    try:
        (directory / "domain.json").write_text(json.dumps(domain_config.to_json(cfg)))
    except OSError as e:
        reg.remove(domid)
        raise HostError(f"cannot write {directory}: {e.strerror}") from None
    args = ["--dir", str(directory)]
    if paused:
        args.append("--paused")
    if trace is not None:
        args += ["--trace", os.path.abspath(trace)]
    if foreground:
        return _foreground(args, cfg.name, domid, console, out)
    return _background(args, cfg.name, domid, directory, reg, console, out)


def _spawn(args: list[str], *, log: int | None, session: bool) -> tuple[subprocess.Popen[bytes],
                                                                       int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    cmd = [sys.executable, "-m", "hvmport.toolstack.domaind", *args,
           "--ready-fd", str(write_fd)]
    os.set_inheritable(write_fd, True)
    try:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=session)
    finally:
        os.close(write_fd)
    return proc, read_fd


def _wait_ready(read_fd: int, what: str, out: TextIO) -> str:
    """The monitor's first word: "ready", "error: ...", or "" if it died first."""
    data = bytearray()
    with Progress(f"starting domain {what}", stream=out) as progress:
        deadline = time.monotonic() + START_TIMEOUT
        while b"\n" not in data and time.monotonic() < deadline:
            import select

            ready, _, _ = select.select([read_fd], [], [], 0.2)
            if not ready:
                progress.tick()
                continue
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            data += chunk
        os.close(read_fd)
        text = data.decode(errors="replace").strip()
        if text != "ready":
            progress.finish("failed")
    return text


def _background(args: list[str], name: str, domid: int, directory: Path, reg: Registry,
                console: bool, out: TextIO) -> int:
    logs = reg.base / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"{name}.log"
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        proc, read_fd = _spawn(args, log=log, session=True)
    finally:
        os.close(log)
    answer = _wait_ready(read_fd, name, out)
    if answer != "ready":
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reg.remove(domid)
        why = answer.removeprefix("error: ") if answer else _tail(log_path)
        raise HostError(f"domain {name} did not start: {why}")
    print(f"hvmport: domain {name} is {domid} (log {log_path})", file=out)
    if console:
        return console_attach(str(domid), registry=reg)
    return 0


def _foreground(args: list[str], name: str, domid: int, attach_console: bool,
                out: TextIO) -> int:
    proc, read_fd = _spawn(args, log=None, session=False)
    try:
        answer = _wait_ready(read_fd, name, out)
        if answer != "ready":
            proc.wait()
            raise HostError(f"domain {name} did not start: "
                            f"{answer.removeprefix('error: ') or 'its monitor died'}")
        if attach_console:
            with contextlib.suppress(HostError):
                console_attach(str(domid))
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C on a foreground domain destroys it, as it does for xl create -F.
        proc.send_signal(signal.SIGTERM)
        return proc.wait()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "its monitor died"
    return " / ".join(text[-lines:]) or "its monitor died without a word"


# ------------------------------------------------------------------ list


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _state(info: DomainInfo) -> str:
    letter = _STATE_LETTER.get(info.state, "-")
    return "".join(c if c == letter else "-" for c in _STATE_ORDER)


def _fresh(info: DomainInfo, reg: Registry) -> dict[str, Any]:
    """The monitor's own view when it answers (state changes as we look), else the file's."""
    try:
        reply = request(info.dir(reg.base) / "toolstack.sock", "info", timeout=2)
        if reply.get("ok"):
            fresh: dict[str, Any] = reply["info"]
            return fresh
    except (OSError, ValueError):
        pass
    return info.as_json(reg.base)


def list_domains(refs: Sequence[str] = (), *, long: bool = False,
                 registry: Registry | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    reg = registry or Registry()
    domains = [reg.find(ref) for ref in refs] if refs else reg.domains()
    rows = []
    for info in domains:
        data = _fresh(info, reg)
        data["cpu_time"] = round(cpu_seconds(info.pid), 1)
        data["state_letters"] = _state(DomainInfo(**{k: data[k] for k in (
            "domid", "name", "pid", "pid_start", "memory_mib", "vcpus", "state")}))
        rows.append(data)
    if long:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}{'State':>11}{'Time(s)':>9}\n")
    for r in rows:
        out.write(f"{r['name']:<40}{r['domid']:>5}{r['memory_mib']:>6}{r['vcpus']:>6}"
                  f"{r['state_letters']:>11}{r['cpu_time']:>9.1f}\n")
    return 0


# ------------------------------------------------------------------ the other verbs


def _ask(ref: str, op: str, reg: Registry) -> DomainInfo:
    info = reg.find(ref)
    try:
        reply = request(info.dir(reg.base) / "toolstack.sock", op)
    except (OSError, ValueError) as e:
        raise HostError(f"domain {info.name} ({info.domid}) does not answer: {e}") from None
    if not reply.get("ok"):
        raise ConfigError(str(reply.get("error", "refused")))
    return info


def pause(ref: str, registry: Registry | None = None) -> int:
    _ask(ref, "pause", registry or Registry())
    return 0


def unpause(ref: str, registry: Registry | None = None) -> int:
    _ask(ref, "unpause", registry or Registry())
    return 0


def destroy(ref: str, registry: Registry | None = None) -> int:
    reg = registry or Registry()
    info = reg.find(ref)
    # A monitor that does not answer is killed below.
    with contextlib.suppress(OSError, ValueError):
        request(info.dir(reg.base) / "toolstack.sock", "destroy")
    deadline = time.monotonic() + DESTROY_TIMEOUT
    while is_alive(info) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(info):
        # Not answering, or stuck: the kernel ends it; its device models follow it
        # (PDEATHSIG) and its entry is cleaned as stale.
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        while process_start(info.pid) == info.pid_start:
            time.sleep(0.02)
    reg.domains()  # sweeps the entry if the monitor could not
    return 0


def console_attach(ref: str, registry: Registry | None = None) -> int:
    reg = registry or Registry()
    info = reg.find(ref)
    path = info.dir(reg.base) / "console.sock"
    if not path.exists():
        serial = info.config.get("serial", "?")
        raise ConfigError(f"domain {info.name} has no console here (serial={serial!r}; "
                          "use serial=\"pty\")")
    if os.isatty(sys.stdin.fileno()):
        print(f"hvmport: connected to {info.name}'s console; Ctrl-] detaches",
              file=sys.stderr)
    console_mod.attach(str(path))
    return 0
