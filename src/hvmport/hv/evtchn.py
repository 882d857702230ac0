"""Event channels as eventfds: one per direction, so either end can notify the other.

A Xen interdomain channel is bidirectional; on Linux an eventfd is one counter, so a channel
is a pair: ``to_dm`` (the hypervisor notifies, the device model waits) and ``to_hv``.
"""

from __future__ import annotations

import contextlib
import os
import select


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def notify(fd: int) -> None:
    # A saturated counter means the peer has plenty to wake up for already.
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)


def drain(fd: int) -> bool:
    """Consume pending notifications; True if there were any."""
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False


def wait(fd: int, timeout: float) -> bool:
    """Block until ``fd`` is readable or ``timeout`` seconds pass; consumes the event."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if poller.poll(max(0, int(timeout * 1000))):
        return drain(fd)
    return False


def channel(channels: dict[int, Channel], port: int) -> Channel:
    """The channel for ``port``, made on first use (by whichever end needs it first)."""
    chan = channels.get(port)
    if chan is None:
        chan = channels[port] = Channel(port)
    return chan


class Channel:
    __slots__ = ("port", "to_dm", "to_hv")

    def __init__(self, port: int) -> None:
        self.port = port
        self.to_dm = _eventfd()
        self.to_hv = _eventfd()

    def close(self) -> None:
        for fd in (self.to_dm, self.to_hv):
            if fd >= 0:
                os.close(fd)
        self.to_dm = self.to_hv = -1
