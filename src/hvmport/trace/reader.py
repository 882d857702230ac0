"""Reading trace files: the header, the events, and what is wrong with them.

A trace file is JSON Lines (docs/tracing.md). The reader checks every line against the
event schema it knows, so a summary or an export never meets a half-formed event; a line it
cannot accept is a ``ConfigError`` naming the file and line. The one exception is a torn
final line (no newline, not valid JSON): that is what a killed process leaves behind, so it
is skipped with a ``TraceWarning``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hvmport.errors import ConfigError

VERSION = 1
CLOCK = "CLOCK_MONOTONIC"
HEADER_EV = "trace_start"
PART_EV = "trace_part"
DROPPED_EV = "trace_dropped"

REGISTERS = ("eax", "ebx", "ecx", "edx", "esi", "edi")

# Field kinds for the schema below.
_INT = "int"
_STR = "str"
_REGS = "regs"

#: Required fields of every event kind hvmport itself writes; other names are accepted
#: with any payload (new kinds must not make old readers refuse a file).
SCHEMA: dict[str, dict[str, str]] = {
    # The hypervisor (patch 8/8's VMPORT_HANDLED, VMPORT_IGNORED, VMPORT_SEND).
    "vmport_handled": {"vcpu": _INT, "cmd": _INT, "in": _REGS, "out": _REGS, "dur": _INT},
    "vmport_ignored": {"vcpu": _INT, "port": _INT, "in": _REGS, "why": _STR},
    "vmport_send": {"vcpu": _INT, "sid": _INT, "cmd": _INT, "in": _REGS},
    "ioreq_send": {"vcpu": _INT, "sid": _INT, "type": _INT, "addr": _INT, "size": _INT,
                   "dir": _INT, "count": _INT, "data": _INT},
    "ioreq_complete": {"vcpu": _INT, "sid": _INT, "type": _INT, "data": _INT, "dur": _INT},
    "bufioreq_send": {"sid": _INT, "type": _INT, "addr": _INT, "size": _INT, "data": _INT,
                      "status": _STR},
    # The device model (patch 8/8's VMPORT_QEMU: the answer, registers and all).
    "vmport_dm": {"vcpu": _INT, "sid": _INT, "cmd": _INT, "in": _REGS, "out": _REGS,
                  "dur": _INT},
    "dm_ioreq": {"vcpu": _INT, "sid": _INT, "type": _INT, "addr": _INT, "size": _INT,
                 "dir": _INT, "data": _INT, "dur": _INT},
    "dm_bufioreq": {"sid": _INT, "type": _INT, "addr": _INT, "size": _INT, "data": _INT},
    DROPPED_EV: {"count": _INT},
    PART_EV: {"pid": _INT},
}
#: Optional fields that, when present, must have this kind.
OPTIONAL: dict[str, dict[str, str]] = {
    "ioreq_complete": {"cmd": _INT, "out": _REGS, "why": _STR},
    DROPPED_EV: {"error": _STR},
    PART_EV: {"domid": _INT, "t": _INT, "role": _STR},
}
#: Events whose ``t`` is the end of something that took ``dur`` nanoseconds.
SPANS = frozenset({"vmport_handled", "ioreq_complete", "vmport_dm", "dm_ioreq"})
KNOWN_EVENTS = frozenset(SCHEMA)


class TraceWarning(UserWarning):
    """Something in a trace file was skipped, but the rest is usable."""


@dataclass(frozen=True)
class Header:
    """Line 1 of a trace file; ``extra`` keeps fields this version does not interpret."""

    version: int
    clock: str
    pid: int
    domid: int
    wall: float
    t: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        role = self.extra.get("role")
        return role if isinstance(role, str) else None

    def as_json(self) -> dict[str, Any]:
        return {"ev": HEADER_EV, "version": self.version, "clock": self.clock, "pid": self.pid,
                "domid": self.domid, "wall": self.wall, "t": self.t, **self.extra}


@dataclass(frozen=True)
class Event:
    """One event line. ``data`` is the whole JSON object as read (``t``/``ev`` included)."""

    t: int
    ev: str
    pid: int
    line: int
    data: Mapping[str, Any]

    def num(self, name: str) -> int:
        """A field the schema guarantees to be an integer."""
        value: int = self.data[name]
        return value

    def opt_int(self, name: str) -> int | None:
        value = self.data.get(name)
        return value if _is_int(value) else None

    def regs(self, name: str) -> dict[str, int]:
        """A register set (``in``/``out``); empty when the event has none."""
        value = self.data.get(name)
        return dict(value) if isinstance(value, dict) else {}


@dataclass
class Trace:
    path: str
    header: Header
    events: list[Event]
    #: Lines skipped (torn final line); also issued as TraceWarning.
    warnings: list[str] = field(default_factory=list)

    def processes(self) -> dict[int, tuple[str | None, int]]:
        """pid -> (role, domid) for the main process and every merged part."""
        procs: dict[int, tuple[str | None, int]] = {
            self.header.pid: (self.header.role, self.header.domid)}
        for e in self.events:
            if e.ev == PART_EV and e.pid not in procs:
                role = e.data.get("role")
                domid = e.opt_int("domid")
                procs[e.pid] = (role if isinstance(role, str) else None,
                                self.header.domid if domid is None else domid)
        return procs


def _is_int(value: object) -> bool:
    # JSON true/false decode to bool, which is an int subclass; no field here is a bool.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_kind(value: object, kind: str) -> bool:
    if kind == _INT:
        return _is_int(value)
    if kind == _STR:
        return isinstance(value, str)
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_int(v) for k, v in value.items())


_KIND_TEXT = {_INT: "an integer", _STR: "a string", _REGS: "an object of integer registers"}


def check_event(obj: Mapping[str, Any]) -> str | None:
    """Why ``obj`` is not an acceptable event line, or None."""
    t = obj.get("t")
    if not _is_int(t):
        return 'no integer "t" (monotonic nanoseconds)'
    ev = obj.get("ev")
    if not isinstance(ev, str) or not ev:
        return 'no "ev" name'
    if "pid" in obj and not _is_int(obj["pid"]):
        return '"pid" is not an integer'
    for name, kind in SCHEMA.get(ev, {}).items():
        if name not in obj:
            return f'{ev} without "{name}"'
        if not _check_kind(obj[name], kind):
            return f'{ev}: "{name}" must be {_KIND_TEXT[kind]}'
    for name, kind in OPTIONAL.get(ev, {}).items():
        if name in obj and not _check_kind(obj[name], kind):
            return f'{ev}: "{name}" must be {_KIND_TEXT[kind]}'
    return None


def _header(obj: object, path: str) -> Header:
    if not isinstance(obj, dict) or obj.get("ev") != HEADER_EV:
        raise ConfigError('not an hvmport trace file (line 1 is not a "trace_start" header)',
                          path=path, line=1)
    version = obj.get("version")
    if version != VERSION:
        raise ConfigError(f"unsupported trace version {version!r} (this hvmport reads "
                          f"version {VERSION})", path=path, line=1)
    pid, domid, t, wall = obj.get("pid"), obj.get("domid"), obj.get("t"), obj.get("wall")
    clock = obj.get("clock")
    # isinstance as well as _is_int: mypy narrows on the former only.
    if not (isinstance(pid, int) and isinstance(domid, int) and isinstance(t, int)
            and _is_int(pid) and _is_int(domid) and _is_int(t) and isinstance(clock, str)
            and isinstance(wall, int | float) and not isinstance(wall, bool)):
        raise ConfigError('header needs integer "pid", "domid", "t", a "clock" name and a '
                          'number "wall"', path=path, line=1)
    known = {"ev", "version", "clock", "pid", "domid", "wall", "t"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Header(VERSION, clock, pid, domid, float(wall), t, extra)


def read(path: str | os.PathLike[str]) -> Trace:
    """Parse and check a whole trace file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read trace file: {e.strerror}", path=name) from None
    lines = raw.split(b"\n")
    # A file written completely ends with a newline, so the last element is b"" and any
    # other content there is a line cut short.
    last_complete = raw.endswith(b"\n")
    header: Header | None = None
    events: list[Event] = []
    skipped: list[str] = []
    for index, chunk in enumerate(lines):
        lineno = index + 1
        is_last = index == len(lines) - 1
        if not chunk.strip():
            continue
        try:
            obj = json.loads(chunk.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            if is_last and not last_complete and header is not None:
                note = f"{name}:{lineno}: skipped a truncated last line ({len(chunk)} bytes)"
                warnings.warn(note, TraceWarning, stacklevel=2)
                skipped.append(note)
                continue
            if header is None:
                raise ConfigError("not an hvmport trace file (line 1 is not JSON)",
                                  path=name, line=lineno) from None
            raise ConfigError(f"bad line: {_json_reason(e)}", path=name, line=lineno) from None
        if header is None:
            header = _header(obj, name)
            continue
        if not isinstance(obj, dict):
            raise ConfigError("bad line: not a JSON object", path=name, line=lineno)
        why = check_event(obj)
        if why is not None:
            raise ConfigError(f"bad line: {why}", path=name, line=lineno)
        pid = obj.get("pid", header.pid)
        events.append(Event(obj["t"], obj["ev"], pid, lineno, obj))
    if header is None:
        raise ConfigError("not an hvmport trace file (empty)", path=name, line=1)
    return Trace(name, header, events, skipped)


def _json_reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON at column {e.colno}: {e.msg}"
    return "not UTF-8"
