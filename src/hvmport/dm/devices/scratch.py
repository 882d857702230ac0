"""Scratch registers: a port range that reads back what was last written to it.

The secondary device model serves these, so a guest (and a test) can prove that an access
to that range reached that process and no other.
"""

from __future__ import annotations


class ScratchPorts:
    def __init__(self, first: int, last: int) -> None:
        if not 0 <= first <= last <= 0xFFFF:
            raise ValueError(f"bad port range {first:#x}-{last:#x}")
        self.first = first
        self.mem = bytearray(last - first + 1)

    def port_read(self, port: int, size: int) -> int:
        off = port - self.first
        return int.from_bytes(self.mem[off:off + size].ljust(size, b"\xff"), "little")

    def port_write(self, port: int, size: int, value: int) -> None:
        off = port - self.first
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        end = min(len(self.mem), off + size)
        self.mem[off:end] = data[: end - off]
