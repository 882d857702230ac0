"""A bus for MMIO devices: non-overlapping guest-physical ranges, bounds checked once."""

from __future__ import annotations

import bisect
from typing import Protocol

from hvmport.errors import ConfigError


class MmioDevice(Protocol):
    def read(self, addr: int, size: int) -> int: ...

    def write(self, addr: int, size: int, value: int) -> None: ...


class MmioBus:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, MmioDevice]] = []

    def register(self, first: int, last: int, device: MmioDevice) -> None:
        if not 0 <= first <= last < 1 << 64:
            raise ConfigError(f"bad MMIO range {first:#x}-{last:#x}")
        i = bisect.bisect_left(self._starts, first)
        for j in (i - 1, i):
            if 0 <= j < len(self._entries):
                a, b, _ = self._entries[j]
                if first <= b and a <= last:
                    raise ConfigError(f"MMIO range {first:#x}-{last:#x} overlaps "
                                      f"{a:#x}-{b:#x}")
        self._starts.insert(i, first)
        self._entries.insert(i, (first, last, device))

    def ranges(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b, _ in self._entries]

    def _find(self, addr: int, size: int) -> MmioDevice | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        _, last, device = self._entries[i]
        return device if addr + size - 1 <= last else None

    def read(self, addr: int, size: int) -> int:
        device = self._find(addr, size)
        if device is None or size not in (1, 2, 4, 8):
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0xFFFFFFFF
        return device.read(addr, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        device = self._find(addr, size)
        if device is not None and size in (1, 2, 4, 8):
            device.write(addr, size, value & ((1 << (8 * size)) - 1))
