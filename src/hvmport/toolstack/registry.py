"""The run directory: which domains exist, and where their sockets are.

``$HVMPORT_RUN_DIR``, else ``$XDG_RUNTIME_DIR/hvmport``, else ``/run/hvmport`` for root (and
``/tmp/hvmport-UID`` for others). Inside, one directory per domain, named by its id::

    lock            flock(2)ed while ids and names are handed out or entries cleaned
    next-domid      the next id to give (ids grow, as Xen's do; 0 is the host's)
    7/info.json     name, id, pid (with its start time), state, sizes, socket paths
    7/toolstack.sock  the domain's monitor: info, pause, unpause, destroy
    7/qmp.sock      QMP, served by the device model
    7/console.sock  the serial console, served by the monitor
    7/control.sock  the device models' dm_op socket
    7/log           the monitor's output when it runs in the background

An entry whose monitor is gone (killed, the machine rebooted) is stale: the pid is dead, or
is another process now (its start time differs). Whoever looks at the directory removes
stale entries under the lock, so a killed domain never blocks its name or leaves files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvmport.errors import ConfigError, HostError

INFO = "info.json"
MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1, as in Xen


def base_dir() -> Path:
    explicit = os.environ.get("HVMPORT_RUN_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "hvmport"
    if os.geteuid() == 0:
        return Path("/run/hvmport")
    return Path(f"/tmp/hvmport-{os.geteuid()}")


@dataclass(slots=True)
class DomainInfo:
    domid: int
    name: str
    pid: int
    #: The monitor's start time in clock ticks since boot (/proc/PID/stat field 22).
    pid_start: int
    memory_mib: int
    vcpus: int
    #: "running", "paused", "shutdown" (preserved after power-off), "crashed", "dying"
    state: str = "running"
    created: float = field(default_factory=time.time)
    backend: str = ""
    reason: str = ""
    dm_pids: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def dir(self, base: Path) -> Path:
        return base / str(self.domid)

    def as_json(self, base: Path) -> dict[str, Any]:
        d = self.dir(base)
        out = asdict(self)
        out.update(qmp=str(d / "qmp.sock"), console=str(d / "console.sock"),
                   toolstack=str(d / "toolstack.sock"), log=str(d / "log"))
        return out


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19])


def is_alive(info: DomainInfo) -> bool:
    start = process_start(info.pid)
    return start is not None and start == info.pid_start


class Registry:
    def __init__(self, base: Path | None = None) -> None:
        self.base = base or base_dir()

    def _ensure(self) -> None:
        try:
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create the run directory {self.base}: {e.strerror}. "
                            "Set HVMPORT_RUN_DIR or XDG_RUNTIME_DIR to a writable place") \
                from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self._ensure()
        fd = os.open(self.base / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def _read(self, path: Path) -> DomainInfo | None:
        try:
            raw = json.loads((path / INFO).read_text())
            return DomainInfo(**raw)
        except (OSError, ValueError, TypeError):
            return None

    def _scan(self) -> tuple[list[DomainInfo], list[Path]]:
        live: list[DomainInfo] = []
        stale: list[Path] = []
        if not self.base.is_dir():
            return live, stale
        for entry in self.base.iterdir():
            if not entry.name.isdigit() or not entry.is_dir():
                continue
            info = self._read(entry)
            if info is None:
                # Being created (no info yet) or half-removed: stale only once old enough,
                # so that a create in progress is never swept away.
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > 60:
                        stale.append(entry)
                continue
            if is_alive(info):
                live.append(info)
            else:
                stale.append(entry)
        live.sort(key=lambda i: i.domid)
        return live, stale

    def domains(self) -> list[DomainInfo]:
        """The live domains; stale entries are cleaned on the way."""
        with self.locked():
            live, stale = self._scan()
            for path in stale:
                self._clean(path)
        return live

    def _clean(self, path: Path) -> None:
        info = self._read(path)
        if info is not None:
            # Device models die with their monitor (PDEATHSIG); make sure of it all the same.
            for pid in info.dm_pids:
                _kill_device_model(pid, info.domid)
        shutil.rmtree(path, ignore_errors=True)

    def find(self, ref: str) -> DomainInfo:
        """A domain by name or id, as xl takes them."""
        domains = self.domains()
        for info in domains:
            if ref == info.name or (ref.isdigit() and int(ref) == info.domid):
                return info
        raise ConfigError(f"no domain {ref!r} (hvmport list shows the domains)")

    # ------------------------------------------------------------------ writing

    def allocate(self, name: str) -> tuple[int, Path]:
        """A fresh id and its directory, refusing a name already in use (as xl does)."""
        with self.locked():
            live, stale = self._scan()
            for path in stale:
                self._clean(path)
            if any(info.name == name for info in live):
                raise ConfigError(f"domain {name!r} already exists")
            counter = self.base / "next-domid"
            try:
                domid = int(counter.read_text())
            except (OSError, ValueError):
                domid = 1
            used = {int(p.name) for p in self.base.iterdir() if p.name.isdigit()}
            for _ in range(MAX_DOMID):
                if not 1 <= domid <= MAX_DOMID:
                    domid = 1
                if domid not in used:
                    break
                domid += 1
            else:
                raise HostError("no free domain id")
            path = self.base / str(domid)
            path.mkdir(mode=0o700)
            _write_atomic(counter, str(domid + 1))
        return domid, path

    def publish(self, info: DomainInfo) -> None:
        """Write (or rewrite) a domain's info file; readers never see half of it."""
        _write_atomic(info.dir(self.base) / INFO, json.dumps(asdict(info), indent=1))

    def remove(self, domid: int) -> None:
        with self.locked():
            shutil.rmtree(self.base / str(domid), ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _kill_device_model(pid: int, domid: int) -> None:
    """Kill ``pid`` only if it still is that domain's device model (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return
    if b"--domid" not in argv or str(domid).encode() not in argv:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
