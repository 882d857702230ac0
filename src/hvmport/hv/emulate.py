"""The hypervisor's port-I/O path: its own ports first, then the core (backdoor, ioreq
servers, null handler). This is the ``IoHandler`` every CPU backend calls on an exit.

Ports the hypervisor itself serves, as Xen and QEMU do for test guests:

* 0xe9, the debug console: bytes written go to the console sink; a read returns 0xe9
  (what QEMU's debugcon answers, so a guest can probe for it).
* 0xf4..0xf7, isa-debug-exit: a write ends the run with status ``(value << 1) | 1``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import BinaryIO

from hvmport.core.domain import Domain, IoResult, IoStatus
from hvmport.core.slots import size_mask
from hvmport.core.vmport import BackdoorRegs, apply_in
from hvmport.cpu.base import MmioAccess, PortAccess, Regs, VcpuContext, VcpuStop
from hvmport.hv.pic import PORTS as PIC_PORTS
from hvmport.hv.pic import Pic
from hvmport.hv.platform import Platform

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_END = 0xF8
#: Exit statuses of a run; even, so they never collide with isa-debug-exit's odd ones.
STATUS_HALTED = 0
STATUS_GUEST_FAULT = 4
STATUS_DOMAIN_CRASHED = 6
STATUS_HOST_ERROR = 8
STATUS_TIMEOUT = 124

#: Waits for a forwarded request to complete: (vcpu, event-channel port, registers, what
#: the access was, for messages) -> IoResult.
Waiter = Callable[[int, int, BackdoorRegs, str], IoResult]


class DomainCrashed(VcpuStop):
    """The core crashed the domain (a device model broke the protocol)."""

    def __init__(self, reason: str) -> None:
        super().__init__(STATUS_DOMAIN_CRASHED, f"domain crashed: {reason}")


def _backdoor_regs(regs: Regs) -> BackdoorRegs:
    return BackdoorRegs(regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi)


class Emulator:
    """Glue between a CPU backend's exits and the sans-io core."""

    def __init__(self, domain: Domain, console: BinaryIO | None,
                 waiter: Waiter | None = None, pic: Pic | None = None,
                 domain_lock: threading.Lock | None = None,
                 platform: Platform | None = None) -> None:
        self.domain = domain
        self.console = console
        #: How a vCPU waits for a device model; None until a transport is attached.
        self.waiter = waiter
        #: The hypervisor's own 8259 pair, where the CPU backend has none in its kernel.
        self.pic = pic
        # The core is not thread-safe: vCPU threads and the control socket (device
        # models' dm_ops) share it under one lock. The PIC has its own, because the control
        # socket drives interrupt lines while it holds the domain lock.
        self.domain_lock = domain_lock or threading.Lock()
        self.pic_lock = threading.Lock()
        #: The whole PC platform (PIC, PIT, RTC, 0xcf9) where the backend has no irqchip;
        #: it brings its own PIC and lock.
        self.platform = platform
        if platform is not None:
            self.pic = platform.pic
            self.pic_lock = platform.lock

    def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        port = access.port
        if port == DEBUGCON_PORT:
            if access.is_write:
                if self.console is not None:
                    # Only the low byte of each element is a character.
                    self.console.write(access.data[:: access.size])
                    self.console.flush()
                return None
            return bytes([DEBUGCON_PORT]) * (access.size * access.count)
        if DEBUG_EXIT_PORT <= port < DEBUG_EXIT_END:
            if access.is_write:
                value = int.from_bytes(access.data[: access.size], "little")
                raise VcpuStop((value << 1) | 1, f"isa-debug-exit wrote {value:#x}")
            return bytes(access.size * access.count)
        if self.platform is not None and self.platform.claims(port, access.size):
            return self._platform(access)
        if self.pic is not None and port in PIC_PORTS:
            return self._pic(access)
        if access.string:
            return self._string(ctx, access)
        return self._single(ctx, access)

    def _pic(self, access: PortAccess) -> bytes | None:
        assert self.pic is not None
        out = bytearray()
        with self.pic_lock:
            for i in range(access.count):
                if access.is_write:
                    # Byte-wide registers: a wider write reaches the low byte's port only.
                    self.pic.port_write(access.port, access.data[i * access.size])
                else:
                    out += self.pic.port_read(access.port).to_bytes(1, "little")
                    out += b"\xff" * (access.size - 1)
        return None if access.is_write else bytes(out)

    def _platform(self, access: PortAccess) -> bytes | None:
        assert self.platform is not None
        out = bytearray()
        for i in range(access.count):
            # Byte-wide registers: a wider access reaches the low byte's port only.
            if access.is_write:
                self.platform.write(access.port, access.data[i * access.size])
            else:
                out.append(self.platform.read(access.port))
                out += b"\xff" * (access.size - 1)
        return None if access.is_write else bytes(out)

    def set_irq(self, irq: int, level: int) -> None:
        """An ISA interrupt line from a device model, into the hypervisor's PIC."""
        if self.platform is not None:
            self.platform.set_irq(irq, level)  # also wakes a halted full-CPU vCPU
            return
        if self.pic is not None:
            with self.pic_lock:
                self.pic.set_irq(irq, level)

    def _single(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        # Registers are only needed for the backdoor; skip fetching them otherwise.
        in_backdoor = 0x5658 <= access.port <= 0x565B and self.domain.vmware_port
        regs = ctx.get_regs() if in_backdoor else None
        bregs = _backdoor_regs(regs) if regs is not None else _NO_REGS
        value = int.from_bytes(access.data, "little") if access.is_write else 0
        cpl = ctx.cpl() if in_backdoor else 0
        with self.domain_lock:
            result = self.domain.pio(ctx.vcpu_id, access.port, access.size, access.is_write,
                                     value, bregs, cpl)
        if result.status is IoStatus.WAIT:
            result = self._wait(ctx.vcpu_id, result, bregs, f"port {access.port:#x}")
        if result.status is IoStatus.CRASHED:
            raise DomainCrashed(result.reason)
        if result.regs is not None and regs is not None:
            new = regs.copy()
            new.rbx, new.rcx, new.rdx = result.regs.rbx, result.regs.rcx, result.regs.rdx
            new.rsi, new.rdi = result.regs.rsi, result.regs.rdi
            if result.value is not None:
                # The backend applies IN data after set_regs; keep RAX consistent anyway.
                new.rax = apply_in(regs.rax, result.value, access.size)
            ctx.set_regs(new)
        if access.is_write:
            return None
        return _read_bytes(result, access.size)

    def _string(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        # Element by element: our backends hand over the data, not guest addresses.
        out = bytearray()
        for i in range(access.count):
            off = i * access.size
            value = int.from_bytes(access.data[off:off + access.size], "little") \
                if access.is_write else 0
            with self.domain_lock:
                result = self.domain.pio(ctx.vcpu_id, access.port, access.size,
                                         access.is_write, value, _NO_REGS, 0, string=True)
            if result.status is IoStatus.WAIT:
                result = self._wait(ctx.vcpu_id, result, _NO_REGS, f"port {access.port:#x}")
            if result.status is IoStatus.CRASHED:
                raise DomainCrashed(result.reason)
            if not access.is_write:
                if result.buffer:
                    out += result.buffer
                else:
                    out += _read_bytes(result, access.size)
        return None if access.is_write else bytes(out)

    def mmio(self, ctx: VcpuContext, access: MmioAccess) -> bytes | None:
        """An access to the MMIO hole: an ioreq server's MEMORY range, or the null handler."""
        value = int.from_bytes(access.data, "little") if access.is_write else 0
        with self.domain_lock:
            result = self.domain.mmio(ctx.vcpu_id, access.addr, access.size, access.is_write,
                                      value)
        if result.status is IoStatus.WAIT:
            result = self._wait(ctx.vcpu_id, result, _NO_REGS,
                                f"MMIO at {access.addr:#x}")
        if result.status is IoStatus.CRASHED:
            raise DomainCrashed(result.reason)
        if access.is_write:
            return None
        return _read_bytes(result, access.size)

    def _wait(self, vcpu: int, result: IoResult, regs: BackdoorRegs, what: str) -> IoResult:
        if self.waiter is None or result.notify is None:
            self.domain.crash("request forwarded to an ioreq server with no transport",
                              "hypervisor")
            return IoResult(IoStatus.CRASHED, reason="no device-model transport")
        return self.waiter(vcpu, result.notify, regs, what)


_NO_REGS = BackdoorRegs(0, 0, 0, 0, 0, 0)


def _read_bytes(result: IoResult, size: int) -> bytes:
    """What a read returns: the value answered, or all ones when nobody answered."""
    value = result.value if result.value is not None else size_mask(size)
    return value.to_bytes(size, "little")
