"""Test-only helpers shared by the test modules."""

from __future__ import annotations

from hvmport.cpu.base import PortAccess, VcpuContext, VcpuStop

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4


class ConsoleIo:
    """The two ports every test guest uses, and all-ones for everything else.

    Records every access so tests can assert on what reached the host.
    """

    def __init__(self) -> None:
        self.console = bytearray()
        self.accesses: list[tuple[int, PortAccess]] = []

    def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        self.accesses.append((ctx.vcpu_id, access))
        if access.port == DEBUGCON_PORT and access.is_write:
            self.console += access.data[:: access.size]
            return None
        if access.port == DEBUG_EXIT_PORT and access.is_write:
            value = int.from_bytes(access.data[: access.size], "little")
            raise VcpuStop((value << 1) | 1, "isa-debug-exit")
        if access.is_write:
            return None
        return b"\xff" * (access.size * access.count)

    @property
    def text(self) -> str:
        return self.console.decode("latin-1")
