"""The serial console: a hub in the domain's monitor, and the client ``hvmport console``.

The hub plays xenconsoled. The device model's UART talks to it over a socket pair (the
device model gets one end as ``--serial fd:N``); the hypervisor's debug console (port
0xe9) can write into it too. It keeps the last ``BACKLOG`` bytes, so a console attached
late sees what the guest said before, and serves any number of clients on a Unix socket:
each gets the backlog and then everything live; what any client types goes to the UART.
Nothing here ever blocks the guest: a client that does not read is dropped once its
queue is full, and output with no UART reader is discarded.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import threading
import tty
from collections import deque
from typing import BinaryIO

from hvmport import unixsock

BACKLOG = 64 * 1024
MAX_CLIENT_QUEUE = 1 << 20
#: Ctrl-], as in xl console, telnet and virsh.
ESCAPE = 0x1D


class ConsoleHub:
    def __init__(self, path: str) -> None:
        self.path = path
        self._uart, self.dm_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._uart.setblocking(False)
        self.dm_end.set_inheritable(True)
        self._listener = unixsock.listen(path, blocking=False)
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self._backlog_size = 0
        self._clients: dict[socket.socket, bytearray] = {}
        self._to_uart = bytearray()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="console", daemon=True)
        self._thread.start()

    @property
    def dm_fd(self) -> int:
        return self.dm_end.fileno()

    # -- from the domain ----------------------------------------------------------------

    def write(self, data: bytes) -> int:
        """Guest output from this process (the debug console); any thread."""
        self._output(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def _output(self, data: bytes) -> None:
        with self._lock:
            self._backlog.append(data)
            self._backlog_size += len(data)
            while self._backlog_size - len(self._backlog[0]) >= BACKLOG:
                self._backlog_size -= len(self._backlog.popleft())
            for queue in self._clients.values():
                queue += data
        self._wake()

    def backlog(self) -> bytes:
        with self._lock:
            return b"".join(self._backlog)[-BACKLOG:]

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    # -- the hub's thread ---------------------------------------------------------------

    def _serve(self) -> None:
        sel: selectors.BaseSelector = selectors.DefaultSelector()
        while not self._closed:
            sel = self._selector(sel)
            for key, events in sel.select(timeout=1.0):
                if self._closed:
                    break
                self._ready(key.fileobj, events)
        sel.close()

    def _selector(self, old: selectors.BaseSelector) -> selectors.BaseSelector:
        old.close()
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self._listener, selectors.EVENT_READ)
        uart_events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._to_uart else 0)
        sel.register(self._uart, uart_events)
        with self._lock:
            for client, queue in self._clients.items():
                sel.register(client, selectors.EVENT_READ
                             | (selectors.EVENT_WRITE if queue else 0))
        return sel

    def _ready(self, obj: object, events: int) -> None:
        if obj == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        elif obj is self._listener:
            self._accept()
        elif obj is self._uart:
            if events & selectors.EVENT_READ:
                self._from_uart()
            if events & selectors.EVENT_WRITE:
                self._flush_uart()
        elif isinstance(obj, socket.socket):
            if events & selectors.EVENT_READ:
                self._from_client(obj)
            if events & selectors.EVENT_WRITE:
                self._flush_client(obj)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        with self._lock:
            self._clients[client] = bytearray(b"".join(self._backlog))
        self._flush_client(client)

    def _from_uart(self) -> None:
        try:
            data = self._uart.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._output(data)

    def _flush_uart(self) -> None:
        try:
            sent = self._uart.send(self._to_uart)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._to_uart)  # the device model is gone: nobody to type to
        del self._to_uart[:sent]

    def _from_client(self, client: socket.socket) -> None:
        try:
            data = client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        # A guest that does not read its UART does not get an unbounded queue.
        if len(self._to_uart) < MAX_CLIENT_QUEUE:
            self._to_uart += data
            self._flush_uart()

    def _flush_client(self, client: socket.socket) -> None:
        with self._lock:
            queue = self._clients.get(client)
            if queue is None:
                return
            try:
                while queue:
                    del queue[:client.send(queue)]
            except BlockingIOError:
                if len(queue) <= MAX_CLIENT_QUEUE:
                    return
            except OSError:
                pass
            else:
                return
        self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.pop(client, None)
        client.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        self._listener.close()
        self._uart.close()
        self.dm_end.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        unixsock.remove(self.path)


def attach(path: str, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Relay a terminal to a domain's console until Ctrl-] or the domain ends.

    Returns 0 when the user detached, 1 when the domain went away.
    """
    sin = stdin or sys.stdin.buffer
    sout = stdout or sys.stdout.buffer
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        from hvmport.errors import HostError

        raise HostError(f"cannot reach the console at {path}: {e.strerror}") from None
    in_fd = sin.fileno()
    saved = None
    if os.isatty(in_fd):
        saved = termios.tcgetattr(in_fd)
        tty.setraw(in_fd)
    try:
        return _relay(sock, in_fd, sout)
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        sock.close()


def _relay(sock: socket.socket, in_fd: int, sout: BinaryIO) -> int:
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    # A regular file or /dev/null cannot be watched: nothing will be typed, just show.
    with contextlib.suppress(PermissionError):
        sel.register(in_fd, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return 1
                    sout.write(data)
                    sout.flush()
                else:
                    typed = os.read(in_fd, 4096)
                    if not typed:
                        # Input closed (not a terminal): keep showing output until the end.
                        sel.unregister(in_fd)
                        continue
                    cut = typed.find(ESCAPE)
                    if cut >= 0:
                        if cut:
                            sock.sendall(typed[:cut])
                        return 0
                    sock.sendall(typed)
    finally:
        sel.close()
