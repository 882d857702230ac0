"""QMP, sans-io: bytes in, bytes out, commands dispatched to a table.

The shape follows QEMU's qmp-spec: a greeting, capabilities negotiation (until
``qmp_capabilities`` every other command is ``CommandNotFound``), ``{"execute",
"arguments", "id"}`` in, ``{"return", "id"}`` or ``{"error": {"class", "desc"}, "id"}``
out, events with a timestamp, CRLF line ends. A client is not trusted: input is bounded,
malformed JSON gets a GenericError and the session resynchronises at the next newline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hvmport import __version__

#: A client may not make us hold more than this much unparsed input.
MAX_PENDING = 64 * 1024
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}

Json = dict[str, Any]
Handler = Callable[[Json], Any]


class QmpError(Exception):
    """Raised by a command handler: becomes ``{"error": {"class", "desc"}}``."""

    def __init__(self, desc: str, klass: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.klass = klass


def encode(obj: Json) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def event(name: str, data: Json | None = None, now: float | None = None) -> bytes:
    t = time.time() if now is None else now
    msg: Json = {"event": name,
                 "timestamp": {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}}
    if data is not None:
        msg["data"] = data
    return encode(msg)


@dataclass
class QmpSession:
    """One client connection's protocol state."""

    commands: dict[str, Handler]
    negotiated: bool = False
    closed: bool = False
    _pending: bytearray = field(default_factory=bytearray)
    _discarding: bool = False

    def greeting(self) -> bytes:
        return encode({"QMP": {"version": {"qemu": QEMU_VERSION,
                                           "package": f"hvmport {__version__}"},
                               "capabilities": ["oob"]}})

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the client; return the bytes to send back."""
        out = bytearray()
        self._pending += data
        while self._pending:
            if self._discarding:
                nl = self._pending.find(b"\n")
                if nl < 0:
                    self._pending.clear()
                    break
                del self._pending[:nl + 1]
                self._discarding = False
                continue
            while self._pending and self._pending[0] in b" \t\r\n":
                del self._pending[:1]
            if not self._pending:
                break
            if self._pending[0] == 0xFF:  # QEMU's resync byte: skip to the next line
                del self._pending[:1]
                self._discarding = True
                continue
            if self._pending[0] not in b"{[":
                out += self._parse_error("JSON parse error, expecting an object")
                continue
            end = split_value(self._pending)
            if end is None:
                if len(self._pending) > MAX_PENDING:
                    self._pending.clear()
                    out += self._error("input too long", None)
                break  # incomplete: wait for more
            raw = bytes(self._pending[:end])
            del self._pending[:end]
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                out += self._error(f"JSON parse error, {e}", None)
                continue
            out += self._dispatch(obj)
        return bytes(out)

    def _parse_error(self, desc: str) -> bytes:
        self._discarding = True
        return self._error(desc, None)

    @staticmethod
    def _error(desc: str, ident: Any, klass: str = "GenericError") -> bytes:
        msg: Json = {"error": {"class": klass, "desc": desc}}
        if ident is not None:
            msg["id"] = ident
        return encode(msg)

    def _dispatch(self, obj: Any) -> bytes:
        if not isinstance(obj, dict):
            return self._error("QMP input must be a JSON object", None)
        ident = obj.get("id")
        unknown = set(obj) - {"execute", "exec-oob", "arguments", "id"}
        if unknown:
            return self._error(f"QMP input member '{sorted(unknown)[0]}' is unexpected",
                               ident)
        name = obj.get("execute", obj.get("exec-oob"))
        if not isinstance(name, str):
            return self._error("QMP input lacks member 'execute'", ident)
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            return self._error("QMP input member 'arguments' must be an object", ident)
        if name == "qmp_capabilities":
            if self.negotiated:
                return self._error("Capabilities negotiation is already complete, command "
                                   "ignored", ident, "CommandNotFound")
            enable = args.get("enable", [])
            if not isinstance(enable, list) or any(c != "oob" for c in enable):
                return self._error("Invalid parameter 'enable'", ident)
            self.negotiated = True
            return self._reply({}, ident)
        if not self.negotiated:
            return self._error("Expecting capabilities negotiation with 'qmp_capabilities'",
                               ident, "CommandNotFound")
        handler = self.commands.get(name)
        if handler is None:
            return self._error(f"The command {name} has not been found", ident,
                               "CommandNotFound")
        try:
            result = handler(args)
        except QmpError as e:
            return self._error(e.desc, ident, e.klass)
        return self._reply({} if result is None else result, ident)

    @staticmethod
    def _reply(result: Any, ident: Any) -> bytes:
        msg: Json = {"return": result}
        if ident is not None:
            msg["id"] = ident
        return encode(msg)


def split_value(buf: bytearray) -> int | None:
    """End of the first complete JSON object/array in ``buf`` (which starts with one), or
    None if it is not complete yet. Strings and escapes are skipped, brackets counted."""
    depth = 0
    in_string = escaped = False
    for i, ch in enumerate(buf):
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:
                in_string = False
        elif ch == 0x22:
            in_string = True
        elif ch in (0x7B, 0x5B):
            depth += 1
        elif ch in (0x7D, 0x5D):
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def check_args(args: Json, allowed: dict[str, type | tuple[type, ...]],
               required: tuple[str, ...] = ()) -> None:
    """QMP's argument checks: no unknown keys, required ones present, right JSON types."""
    for key in args:
        if key not in allowed:
            raise QmpError(f"Parameter '{key}' is unexpected")
    for key in required:
        if key not in args:
            raise QmpError(f"Parameter '{key}' is missing")
    for key, value in args.items():
        expect = allowed[key]
        if isinstance(value, bool) and expect is not bool and not (
                isinstance(expect, tuple) and bool in expect):
            raise QmpError(f"Invalid parameter type for '{key}'")
        if not isinstance(value, expect):
            raise QmpError(f"Invalid parameter type for '{key}'")
