"""The Debian Linux test guest, built once per test session (``hvmport guest linux``)."""

from __future__ import annotations

import functools

from hvmport import linuxguest


@functools.cache
def linux_guest() -> linuxguest.LinuxGuest:
    return linuxguest.build()
