"""Recording trace events from the hypervisor and device-model processes.

Convention: a component takes ``tracer: Tracer | None``; None means tracing is off and the
call site is ``if tracer is not None: tracer.vmport_send(...)``, so that off costs one test.

Buffering: an event is the time and a flat tuple of its values, appended to a list under a
lock; nothing is encoded or written on the caller's thread. A writer thread wakes when
``batch`` events are waiting or every ``flush_interval`` seconds, takes the whole list,
formats it as JSON Lines and writes it with one ``write`` call sequence. The event kinds
hvmport defines (the methods below) are formatted from a per-kind ``%`` template, several
times cheaper than a JSON encoder, which matters because the writer shares the GIL with the
vCPU threads; ``emit`` takes any other event, JSON-encoded.

At most ``max_buffered`` events wait in memory: past that an event is dropped and counted,
because a vCPU must never wait for the disk (xentrace loses records the same way). Events
that a failed write (disk full) could not store are counted too; ``close`` then appends one
``{"ev": "trace_dropped", "count": N}`` line.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import json
import os
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from hvmport.errors import ConfigError
from hvmport.trace import reader

#: Indirection for the one system call that stores trace data, so that tests can make the
#: disk fill up at will.
_os_write = os.write

DEFAULT_BATCH = 1024
DEFAULT_MAX_BUFFERED = 65536
DEFAULT_FLUSH_INTERVAL = 0.25

#: The backdoor's six registers, eax, ebx, ecx, edx, esi, edi: their 32-bit halves.
Regs = tuple[int, int, int, int, int, int]
_M32 = 0xFFFFFFFF


def regs32(eax: int, ebx: int, ecx: int, edx: int, esi: int, edi: int) -> Regs:
    """A register payload: the 32-bit halves, in the order ``reader.REGISTERS`` names."""
    return (eax & _M32, ebx & _M32, ecx & _M32, edx & _M32, esi & _M32, edi & _M32)


def _fallback(value: object) -> object:
    # The writer thread must not die on a payload nobody meant to be exotic.
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return repr(value)


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_fallback)


def _line(obj: Mapping[str, object]) -> bytes:
    return (_encoder.encode(obj) + "\n").encode("utf-8")


def _template(ev: str, *names: str) -> str:
    """A ``%`` template for one event kind: ``t`` and then ``names`` in order. A name in
    ``in``/``out`` is six registers; ``why``/``status`` a string given already quoted."""
    parts = ['{"t":%d,"ev":"', ev, '"']
    for name in names:
        if name in ("in", "out"):
            parts.append(f',"{name}":{{'
                         + ",".join(f'"{r}":%d' for r in reader.REGISTERS) + "}")
        elif name in ("why", "status"):
            parts.append(f',"{name}":%s')
        else:
            parts.append(f',"{name}":%d')
    parts.append("}\n")
    return "".join(parts)


_quoted: dict[str, str] = {}


def _quote(text: str) -> str:
    """A JSON string literal; the few reasons and statuses there are, encoded once each."""
    quoted = _quoted.get(text)
    if quoted is None:
        quoted = _quoted[text] = json.dumps(text, ensure_ascii=False)
    return quoted


_HANDLED = _template("vmport_handled", "vcpu", "cmd", "dur", "in", "out")
_IGNORED = _template("vmport_ignored", "vcpu", "port", "why", "in")
_SEND = _template("vmport_send", "vcpu", "sid", "cmd", "in")
_IOREQ_SEND = _template("ioreq_send", "vcpu", "sid", "type", "addr", "size", "dir", "count",
                        "data")
_IOREQ_DONE = _template("ioreq_complete", "vcpu", "sid", "type", "data", "dur")
_IOREQ_DONE_VMPORT = _template("ioreq_complete", "vcpu", "sid", "type", "data", "dur", "cmd",
                               "out")
_BUF_SEND = _template("bufioreq_send", "sid", "type", "addr", "size", "data", "status")
_VMPORT_DM = _template("vmport_dm", "vcpu", "sid", "cmd", "dur", "in", "out")
_DM_IOREQ = _template("dm_ioreq", "vcpu", "sid", "type", "addr", "size", "dir", "data", "dur")
_DM_BUF = _template("dm_bufioreq", "sid", "type", "addr", "size", "data")


class _EventHelpers:
    """The event kinds hvmport defines, one method each (a misspelt field is then a type
    error, not a line the reader refuses). ``dur`` is in nanoseconds and the event's time
    is the end of that span."""

    def emit(self, ev: str, /, **fields: Any) -> None:
        raise NotImplementedError

    def _put(self, template: str, values: tuple[object, ...]) -> None:
        raise NotImplementedError

    # -- the hypervisor --------------------------------------------------------------------

    def vmport_handled(self, vcpu: int, cmd: int, regs_in: Regs, regs_out: Regs,
                       dur: int) -> None:
        self._put(_HANDLED, (vcpu, cmd, dur, *regs_in, *regs_out))

    def vmport_ignored(self, vcpu: int, port: int, regs_in: Regs, why: str) -> None:
        self._put(_IGNORED, (vcpu, port, _quote(why), *regs_in))

    def vmport_send(self, vcpu: int, sid: int, cmd: int, regs_in: Regs) -> None:
        self._put(_SEND, (vcpu, sid, cmd, *regs_in))

    def ioreq_send(self, vcpu: int, sid: int, type: int, addr: int, size: int, dir: int,
                   count: int, data: int) -> None:
        self._put(_IOREQ_SEND, (vcpu, sid, type, addr, size, dir, count, data))

    def ioreq_complete(self, vcpu: int, sid: int, type: int, data: int, dur: int, *,
                       cmd: int | None = None, regs_out: Regs | None = None,
                       why: str | None = None) -> None:
        if why:
            # Rare (a crash, a server gone): the general path is fast enough.
            extra: dict[str, Any] = {"why": why}
            if cmd is not None:
                extra["cmd"] = cmd
            if regs_out is not None:
                extra["out"] = dict(zip(reader.REGISTERS, regs_out, strict=True))
            self.emit("ioreq_complete", vcpu=vcpu, sid=sid, type=type, data=data, dur=dur,
                      **extra)
        elif cmd is not None and regs_out is not None:
            self._put(_IOREQ_DONE_VMPORT, (vcpu, sid, type, data, dur, cmd, *regs_out))
        else:
            self._put(_IOREQ_DONE, (vcpu, sid, type, data, dur))

    def bufioreq_send(self, sid: int, type: int, addr: int, size: int, data: int,
                      status: str) -> None:
        self._put(_BUF_SEND, (sid, type, addr, size, data, _quote(status)))

    # -- the device model ------------------------------------------------------------------

    def vmport_dm(self, vcpu: int, sid: int, cmd: int, regs_in: Regs, regs_out: Regs,
                  dur: int) -> None:
        self._put(_VMPORT_DM, (vcpu, sid, cmd, dur, *regs_in, *regs_out))

    def dm_ioreq(self, vcpu: int, sid: int, type: int, addr: int, size: int, dir: int,
                 data: int, dur: int) -> None:
        self._put(_DM_IOREQ, (vcpu, sid, type, addr, size, dir, data, dur))

    def dm_bufioreq(self, sid: int, type: int, addr: int, size: int, data: int) -> None:
        self._put(_DM_BUF, (sid, type, addr, size, data))


class Tracer(_EventHelpers):
    """Records events of one process into one trace file (see the module docstring).

    ``emit(ev, **fields)`` stamps the event with ``time.monotonic_ns()`` taken under the
    buffer lock, so the file is in time order even with many threads; a ``t`` field, if
    given, replaces the stamp. Field values are encoded later on the writer thread: do not
    mutate a dict after passing it.
    """

    def __init__(self, path: str | os.PathLike[str], *, domid: int, pid: int | None = None,
                 role: str | None = None, batch: int = DEFAULT_BATCH,
                 max_buffered: int = DEFAULT_MAX_BUFFERED,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        if batch < 1 or max_buffered < batch:
            raise ValueError("need 1 <= batch <= max_buffered")
        self.path = os.fspath(path)
        self.domid = domid
        self.pid = os.getpid() if pid is None else pid
        self.role = role
        self._batch = batch
        self._max = max_buffered
        self._interval = flush_interval
        #: The buffer's lock; the hot path takes it directly (a Condition's own
        #: ``with`` adds a Python-level call per event).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        #: (t, template, values) for the kinds above, (t, None, (ev, fields)) for emit's.
        self._buf: list[tuple[int, str | None, tuple[Any, ...]]] = []
        self._dropped = 0
        self._closed = False
        #: Held while taking a batch *and* writing it, so batches reach the file in order.
        self._io_lock = threading.Lock()
        #: The last write error; the file may miss events but never has a torn line.
        self.error: OSError | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                               | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write trace file: {e.strerror}", path=self.path) from None
        try:
            self._size = os.fstat(self._fd).st_size
        except OSError:
            self._size = 0
        header: dict[str, object] = {
            "ev": reader.HEADER_EV, "version": reader.VERSION, "clock": reader.CLOCK,
            "pid": self.pid, "domid": domid, "wall": time.time(), "t": time.monotonic_ns()}
        if role is not None:
            header["role"] = role
        #: Written before the first batch that gets through: a file without its header
        #: is unreadable, so a full disk at start must not lose it.
        self._header: bytes | None = _line(header)
        with self._io_lock:
            self._write(b"")
        self._thread = threading.Thread(target=self._run, name=f"hvmport-trace-d{domid}",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- hot path -------------------------------------------------------------------------

    def _put(self, template: str | None, values: tuple[Any, ...]) -> None:
        with self._lock:
            if self._closed:
                return
            buf = self._buf
            if len(buf) >= self._max:
                self._dropped += 1
                return
            buf.append((time.monotonic_ns(), template, values))
            if len(buf) == self._batch:
                self._cond.notify()

    def emit(self, ev: str, /, **fields: Any) -> None:
        self._put(None, (ev, fields))

    # -- state ----------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Events lost so far: buffer full, or a write that failed."""
        with self._cond:
            return self._dropped

    @property
    def buffered(self) -> int:
        """Events waiting in memory for the writer thread."""
        with self._cond:
            return len(self._buf)

    # -- writing --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._buf) < self._batch:
                    self._cond.wait(self._interval)
                closing = self._closed
            self._drain()
            if closing:
                return

    def _drain(self) -> None:
        with self._io_lock:
            with self._cond:
                batch, self._buf = self._buf, []
            if batch:
                self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[int, str | None, tuple[Any, ...]]]) -> None:
        parts: list[str] = []
        lost = 0
        for t, template, values in batch:
            try:
                if template is not None:
                    parts.append(template % (t, *values))
                else:
                    ev, fields = values
                    parts.append(_encoder.encode({"t": t, "ev": ev, **fields}) + "\n")
            except (TypeError, ValueError):
                # e.g. a circular structure; losing one event beats losing the writer.
                lost += 1
        if not self._write("".join(parts).encode("utf-8")):
            lost += len(parts)
        if lost:
            with self._cond:
                self._dropped += lost

    def _write(self, data: bytes) -> bool:
        """Append whole lines, or nothing: a failed write is cut back off the file."""
        if self._header is not None:
            data = self._header + data
        if not data:
            return True
        view = memoryview(data)
        try:
            while view:
                n = _os_write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self.error = e
            # Not a regular file (/dev/full) when this fails: no file to keep readable.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            return False
        self._size += len(data)
        self._header = None
        return True

    def flush(self) -> None:
        """Write every event emitted before this call, on the calling thread."""
        if not self._closed:
            self._drain()

    def close(self) -> None:
        """Write what is buffered, a ``trace_dropped`` line if events were lost, and close.

        Never raises for a write error (see ``error``); safe to call more than once.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._drain()
        with self._io_lock:
            if self._dropped:
                note: dict[str, object] = {"t": time.monotonic_ns(), "ev": reader.DROPPED_EV,
                                           "count": self._dropped}
                if self.error is not None:
                    note["error"] = self.error.strerror or str(self.error)
                self._write(_line(note))
            try:
                os.close(self._fd)
            except OSError as e:
                self.error = e
        atexit.unregister(self.close)

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tracer({self.path!r}, domid={self.domid}, pid={self.pid})"


# -- merging ----------------------------------------------------------------------------

def merge(main_path: str | os.PathLike[str], *other_paths: str | os.PathLike[str]) -> int:
    """Merge other processes' trace files into ``main_path``, sorted by time.

    The main header stays line 1. Each other file's header becomes a ``trace_part`` event
    (at that header's time, with its pid, domid, wall, role and file name), and its events
    get that ``pid`` when they carry none, so every event still says which process wrote
    it. Torn last lines are skipped with a ``TraceWarning``; a bad line anywhere else is a
    ``ConfigError`` and leaves every file untouched. The main file is replaced atomically.
    Returns the number of events in the merged file.
    """
    main = reader.read(main_path)
    streams: list[list[tuple[int, int, int, Mapping[str, Any]]]] = [
        [(e.t, 0, i, e.data) for i, e in enumerate(main.events)]]
    for k, other_path in enumerate(other_paths, start=1):
        other = reader.read(other_path)
        h = other.header
        if h.clock != main.header.clock:
            raise ConfigError(f"clock {h.clock!r} differs from the main trace's "
                              f"{main.header.clock!r}: times cannot be compared",
                              path=other.path, line=1)
        part: dict[str, Any] = {"t": h.t, "ev": reader.PART_EV, "pid": h.pid,
                                "domid": h.domid, "wall": h.wall,
                                "source": os.path.basename(other.path), **h.extra}
        items: list[tuple[int, int, int, Mapping[str, Any]]] = [(h.t, k, -1, part)]
        for i, e in enumerate(other.events):
            data = e.data if "pid" in e.data else {**e.data, "pid": h.pid}
            items.append((e.t, k, i, data))
        streams.append(items)
    # Files from one Tracer are in time order except for caller-given t, so sort each
    # stream (cheap when sorted) and merge; ties keep file and line order.
    for s in streams:
        s.sort(key=lambda item: (item[0], item[2]))
    merged = heapq.merge(*streams, key=lambda item: (item[0], item[1], item[2]))
    target = os.fspath(main_path)
    tmp = f"{target}.merge-{os.getpid()}.tmp"
    count = 0
    try:
        with open(tmp, "wb") as f:
            f.write(_line(main.header.as_json()))
            for _t, _k, _i, data in merged:
                f.write(_line(data))
                count += 1
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write merged trace: {e.strerror}", path=target) from None
    return count
