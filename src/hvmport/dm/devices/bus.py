"""Routing of port I/O (PIO ioreqs with count 1) to the device models.

The bus checks an access once, so devices only ever see accesses that lie wholly inside a
range they claimed and have a size of 1, 2 or 4: an access that is unclaimed, sticks out
of its device's range or has any other size reads all ones and drops its write, as an
unclaimed ISA port does. Write values are masked to the access size before dispatch and
read results after, so a device bug cannot leak wider values to the guest.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from hvmport.errors import ConfigError

PORT_MAX = 0xFFFF
ACCESS_SIZES = (1, 2, 4)


def all_ones(size: int) -> int:
    """What an unclaimed read of ``size`` bytes returns; 32 bits for a size PIO never uses."""
    return (1 << (8 * size)) - 1 if size in ACCESS_SIZES else 0xFFFFFFFF


class PortDevice(Protocol):
    """A device model reachable by port I/O; ``port`` is the absolute port number."""

    def port_read(self, port: int, size: int) -> int: ...

    def port_write(self, port: int, size: int, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int  # inclusive
    device: PortDevice
    name: str


class PortBus:
    """Inclusive, non-overlapping port ranges, each owned by one device."""

    def __init__(self) -> None:
        self._ranges: list[PortRange] = []
        self._firsts: list[int] = []  # parallel to _ranges, for bisect

    def register(self, first: int, last: int, device: PortDevice, name: str = "") -> None:
        """Claim ports ``first..last`` (inclusive) for ``device``.

        One device may own several ranges (the i8042 owns 0x60 and 0x64). Raises
        ConfigError for an empty or out-of-range span or an overlap, naming both owners.
        """
        label = name or type(device).__name__
        if not (0 <= first <= PORT_MAX and 0 <= last <= PORT_MAX):
            raise ConfigError(
                f"port range {first:#x}..{last:#x} for {label} lies outside 0..{PORT_MAX:#x}")
        if last < first:
            raise ConfigError(f"port range {first:#x}..{last:#x} for {label} is empty")
        i = bisect.bisect_left(self._firsts, first)
        for j in (i - 1, i):
            if 0 <= j < len(self._ranges):
                r = self._ranges[j]
                if r.first <= last and first <= r.last:
                    raise ConfigError(
                        f"port range {first:#x}..{last:#x} for {label} overlaps "
                        f"{r.first:#x}..{r.last:#x} owned by {r.name}")
        self._ranges.insert(i, PortRange(first, last, device, label))
        self._firsts.insert(i, first)

    def ranges(self) -> tuple[PortRange, ...]:
        return tuple(self._ranges)

    def _find(self, port: int, size: int) -> PortDevice | None:
        if size not in ACCESS_SIZES or port < 0 or port + size - 1 > PORT_MAX:
            return None
        i = bisect.bisect_right(self._firsts, port) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if port + size - 1 > r.last:
            return None
        return r.device

    def read(self, port: int, size: int) -> int:
        dev = self._find(port, size)
        if dev is None:
            return all_ones(size)
        return dev.port_read(port, size) & all_ones(size)

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._find(port, size)
        if dev is not None:
            dev.port_write(port, size, value & all_ones(size))
