"""Scratch registers: a range that reads back what was last written to it.

Secondary device models and tests use them, so a guest can prove that an access to that
range (ports, or MMIO) reached that process and no other.
"""

from __future__ import annotations

#: Scratch ranges are small; a larger one is a mistake on the command line.
MAX_SCRATCH = 1 << 16


class ScratchRegisters:
    def __init__(self, first: int, last: int) -> None:
        if not 0 <= first <= last or last - first + 1 > MAX_SCRATCH:
            raise ValueError(f"bad scratch range {first:#x}-{last:#x}")
        self.first = first
        self.mem = bytearray(last - first + 1)

    def read(self, addr: int, size: int) -> int:
        off = addr - self.first
        return int.from_bytes(self.mem[off:off + size].ljust(size, b"\xff"), "little")

    def write(self, addr: int, size: int, value: int) -> None:
        off = addr - self.first
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        end = min(len(self.mem), off + size)
        self.mem[off:end] = data[: end - off]

    # The port bus calls them port_read/port_write.
    port_read = read
    port_write = write

