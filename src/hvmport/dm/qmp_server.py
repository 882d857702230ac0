"""QMP over a Unix socket, served from the device model's select loop (no threads).

Sockets are non-blocking; a client that stops reading while replies pile up past a bound,
or sends more than it may, is disconnected. At most ``max_clients`` at once.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from hvmport import unixsock
from hvmport.dm.qmp import Handler, QmpSession

MAX_OUTPUT = 1 << 20


@dataclass
class _Client:
    sock: socket.socket
    session: QmpSession
    out: bytearray = field(default_factory=bytearray)


class QmpServer:
    def __init__(self, path: str, commands: dict[str, Handler], max_clients: int = 64,
                 after_reply: Callable[[], None] | None = None) -> None:
        self.path = path
        self.commands = commands
        #: Runs once a batch of replies is on its way (what must happen after answering,
        #: e.g. powering off, which ends this process).
        self.after_reply = after_reply
        self.max_clients = max_clients
        self.listener = unixsock.listen(path, backlog=16, blocking=False)
        self._clients: dict[int, _Client] = {}

    def watch(self) -> dict[int, Callable[[], bool]]:
        """Descriptors for the select loop, with what to do when readable."""
        if self.listener.fileno() < 0:
            return {}
        fds: dict[int, Callable[[], bool]] = {self.listener.fileno(): self._accept}
        for fd, client in self._clients.items():
            fds[fd] = functools.partial(self._read, client)
        return fds

    def broadcast(self, data: bytes) -> None:
        for client in list(self._clients.values()):
            if client.session.negotiated:
                self._send(client, data)

    def close(self) -> None:
        if self.listener.fileno() < 0:
            return
        for client in list(self._clients.values()):
            self._drop(client)
        self.listener.close()
        unixsock.remove(self.path)

    def _accept(self) -> bool:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return True
        if len(self._clients) >= self.max_clients:
            sock.close()
            return True
        sock.setblocking(False)
        client = _Client(sock, QmpSession(self.commands))
        self._clients[sock.fileno()] = client
        self._send(client, client.session.greeting())
        return True

    def _read(self, client: _Client) -> bool:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return True
        self._send(client, client.session.receive(data))
        if self.after_reply is not None:
            self.after_reply()
        return True

    def _send(self, client: _Client, data: bytes) -> None:
        client.out += data
        try:
            while client.out:
                sent = client.sock.send(client.out)
                del client.out[:sent]
        except BlockingIOError:
            if len(client.out) > MAX_OUTPUT:
                self._drop(client)
        except OSError:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        client.sock.close()
