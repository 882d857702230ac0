"""Listening Unix sockets, made one way everywhere (QMP, console, toolstack, control)."""

from __future__ import annotations

import contextlib
import os
import socket


def listen(path: str, *, kind: int = socket.SOCK_STREAM, backlog: int = 8,
           blocking: bool = True) -> socket.socket:
    """A listener at ``path``, replacing a stale socket file; only its owner may connect."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(blocking)
    return sock


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
