"""The hypervisor's port-I/O path: its own ports first, then the core (backdoor, ioreq
servers, null handler). This is the ``IoHandler`` every CPU backend calls on an exit.

Ports the hypervisor itself serves, as Xen and QEMU do for test guests:

* 0xe9, the debug console: bytes written go to the console sink; a read returns 0xe9
  (what QEMU's debugcon answers, so a guest can probe for it).
* 0xf4..0xf7, isa-debug-exit: a write ends the run with status ``(value << 1) | 1``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from hvmport.abi import vmware as vm
from hvmport.core.bufring import Send
from hvmport.core.domain import VMPORT_TYPES, Domain, IoResult, IoStatus, Route
from hvmport.core.slots import size_mask
from hvmport.core.vmport import BackdoorRegs, apply_in
from hvmport.cpu.base import MmioAccess, PortAccess, Regs, VcpuContext, VcpuStop
from hvmport.hv.memory import GuestMemory
from hvmport.hv.pic import PORTS as PIC_PORTS
from hvmport.hv.pic import Pic
from hvmport.hv.platform import Platform
from hvmport.trace.recorder import Regs as Regs32
from hvmport.trace.recorder import Tracer, regs32

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_END = 0xF8
#: Exit statuses of a run; even, so they never collide with isa-debug-exit's odd ones.
STATUS_HALTED = 0
STATUS_GUEST_FAULT = 4
STATUS_DOMAIN_CRASHED = 6
STATUS_HOST_ERROR = 8
STATUS_TIMEOUT = 124
#: Each vCPU's string-I/O staging window after guest RAM: one REP of up to a GuestRPC
#: message. vCPUs have their own, so concurrent REPs never share bytes.
STAGING_BYTES = 64 * 1024

#: Waits for a forwarded request to complete: (vcpu, event-channel port, registers, what
#: the access was, for messages) -> IoResult.
Waiter = Callable[[int, int, BackdoorRegs, str], IoResult]



class ConsoleSink(Protocol):
    """Where debug-console bytes go: a file, or the toolstack's console hub."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...

class DomainCrashed(VcpuStop):
    """The core crashed the domain (a device model broke the protocol)."""

    def __init__(self, reason: str) -> None:
        super().__init__(STATUS_DOMAIN_CRASHED, f"domain crashed: {reason}")


def _backdoor_regs(regs: Regs, all_gprs: bool) -> BackdoorRegs:
    if not all_gprs:
        return BackdoorRegs(regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi,
                            rbp=regs.rbp)
    # RBP and R8..R15 go along for the gpr64 transport, which carries every GPR but RSP.
    return BackdoorRegs(regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi,
                        (regs.rbp, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13,
                         regs.r14, regs.r15), rbp=regs.rbp)


class Staging:
    """Where the hypervisor stages REP INS/OUTS data for a ``data_is_ptr`` request.

    Xen hands the device model the guest's own buffer address. Our backends hand the
    hypervisor the bytes instead (KVM's exit carries them, the user backend's program
    memory is no guest-physical memory at all), so the hypervisor copies them to a
    window of the domain's memfd that no guest can reach (after its RAM) and forwards one
    request pointing there: the device model sees one request per REP, as under Xen.
    """

    def __init__(self, memory: GuestMemory, size: int = STAGING_BYTES) -> None:
        self.memory = memory
        self.size = size
        self.windows = memory.staging // size

    def gpa(self, vcpu: int) -> int:
        if not 0 <= vcpu < self.windows:
            raise ValueError(f"no staging window for vCPU {vcpu}")
        return self.memory.size + vcpu * self.size


class Emulator:
    """Glue between a CPU backend's exits and the sans-io core."""

    def __init__(self, domain: Domain, console: ConsoleSink | None,
                 waiter: Waiter | None = None, pic: Pic | None = None,
                 domain_lock: threading.Lock | None = None,
                 tracer: Tracer | None = None,
                 staging: Staging | None = None,
                 platform: Platform | None = None) -> None:
        self.domain = domain
        #: Where trace events go; None (tracing off) costs an ``is not None`` test or two
        #: per access.
        self.tracer = tracer
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
        self.staging = staging
        #: (route, backdoor command or None) -> how many accesses took that way.
        self.routes: Counter[tuple[str, int | None]] = Counter()
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
        tracer = self.tracer
        t0 = time.monotonic_ns() if tracer is not None else 0
        # Registers are only needed for the backdoor; skip fetching them otherwise.
        in_backdoor = 0x5658 <= access.port <= 0x565B and self.domain.vmware_port
        regs = ctx.get_regs() if in_backdoor else None
        bregs = (_backdoor_regs(regs, self.domain.wants_all_gprs) if regs is not None
                 else _NO_REGS)
        value = int.from_bytes(access.data, "little") if access.is_write else 0
        cpl = ctx.cpl() if in_backdoor else 0
        with self.domain_lock:
            result = self.domain.pio(ctx.vcpu_id, access.port, access.size, access.is_write,
                                     value, bregs, cpl)
        if tracer is not None and in_backdoor:
            _trace_backdoor(tracer, ctx.vcpu_id, access, bregs, result, t0)
        command = result.command  # the forwarded request's completion does not carry it
        if result.status is IoStatus.WAIT:
            result = self._wait(ctx.vcpu_id, result, bregs, f"port {access.port:#x}")
        if result.status is IoStatus.CRASHED:
            raise DomainCrashed(result.reason)
        if in_backdoor:
            self.routes[(result.route.value, command)] += 1
        if result.regs is not None and regs is not None:
            new = regs.copy()
            new.rbx, new.rcx, new.rdx = result.regs.rbx, result.regs.rcx, result.regs.rdx
            new.rsi, new.rdi = result.regs.rsi, result.regs.rdi
            if len(result.regs.others) == 9:
                (new.rbp, new.r8, new.r9, new.r10, new.r11, new.r12, new.r13, new.r14,
                 new.r15) = result.regs.others
            if result.value is not None:
                # The backend applies IN data after set_regs; keep RAX consistent anyway.
                new.rax = apply_in(regs.rax, result.value, access.size)
            ctx.set_regs(new)
        if access.is_write:
            return None
        return _read_bytes(result, access.size)

    def _string(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        staging = self.staging
        span = access.size * access.count
        if staging is not None and span <= staging.size:
            return self._string_staged(ctx, access, staging)
        # Element by element: no staging area to point a data_is_ptr request at.
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

    def _string_staged(self, ctx: VcpuContext, access: PortAccess,
                       staging: Staging) -> bytes | None:
        span = access.size * access.count
        # The high-bandwidth backdoor's registers travel with its string I/O.
        hb = access.port == vm.BDOORHB_PORT and self.domain.vmware_port
        regs = ctx.get_regs() if hb else None
        bregs = _backdoor_regs(regs, False) if regs is not None else _NO_REGS
        # Elements are staged in the order the instruction moves them, so the request
        # always steps upwards (df = 0) whatever the guest's direction flag.
        gpa = staging.gpa(ctx.vcpu_id)
        staging.memory.write(gpa, access.data if access.is_write else b"\xff" * span)
        with self.domain_lock:
            result = self.domain.pio(ctx.vcpu_id, access.port, access.size, access.is_write,
                                     0, bregs, ctx.cpl() if hb else 0, string=True,
                                     count=access.count, buffer_gpa=gpa)
        if result.status is IoStatus.WAIT:
            result = self._wait(ctx.vcpu_id, result, bregs, f"port {access.port:#x}")
        if result.status is IoStatus.CRASHED:
            raise DomainCrashed(result.reason)
        self.routes[(result.route.value, None)] += 1
        if result.regs is not None and regs is not None and result.regs != bregs:
            new = regs.copy()
            new.rbx, new.rcx, new.rdx = result.regs.rbx, result.regs.rcx, result.regs.rdx
            new.rsi, new.rdi = result.regs.rsi, result.regs.rdi
            ctx.set_regs(new)
        if access.is_write:
            return None
        if result.route is Route.NULL:
            return b"\xff" * span
        return staging.memory.read(gpa, span)

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

    def send_buffered(self, sid: int, ioreq_type: int, addr: int, size: int,
                      data: int) -> tuple[Send, int | None]:
        """Queue a write on a server's buffered ring (the core, under the domain lock);
        returns the status and the event-channel port to notify, as the core does."""
        with self.domain_lock:
            status, port = self.domain.send_buffered(sid, ioreq_type, addr, size, data)
        if self.tracer is not None:
            self.tracer.bufioreq_send(sid, ioreq_type, addr, size, data, status.value)
        return status, port

    def _wait(self, vcpu: int, result: IoResult, regs: BackdoorRegs, what: str) -> IoResult:
        if self.waiter is None or result.notify is None:
            self.domain.crash("request forwarded to an ioreq server with no transport",
                              "hypervisor")
            return IoResult(IoStatus.CRASHED, reason="no device-model transport")
        tracer = self.tracer
        req = result.request
        if tracer is None or req is None:
            return self.waiter(vcpu, result.notify, regs, what)
        sid = -1 if result.server is None else result.server
        tracer.ioreq_send(vcpu, sid, req.type, req.addr, req.size, req.dir, req.count,
                          req.data)
        t_send = time.monotonic_ns()
        done = self.waiter(vcpu, result.notify, regs, what)
        dur = time.monotonic_ns() - t_send
        data = req.data if done.value is None else done.value
        is_vmport = req.type in VMPORT_TYPES
        out = None
        if is_vmport and done.regs is not None:
            r = done.regs
            rax = regs.rax if done.value is None else apply_in(regs.rax, done.value, req.size)
            out = regs32(rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi)
        tracer.ioreq_complete(vcpu, sid, req.type, data, dur,
                              cmd=result.command if is_vmport else None, regs_out=out,
                              why=done.reason or None)
        return done


_NO_REGS = BackdoorRegs(0, 0, 0, 0, 0, 0)


def _regs_in(r: BackdoorRegs) -> Regs32:
    return regs32(r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi)


def _trace_backdoor(tracer: Tracer, vcpu: int, access: PortAccess, regs: BackdoorRegs,
                    result: IoResult, t0: int) -> None:
    """Patch 8/8's trace points, from what the core decided about a backdoor access."""
    route = result.route
    if route is Route.INTERNAL and result.command is not None:
        out = result.regs or regs
        rax = regs.rax if result.value is None else apply_in(regs.rax, result.value,
                                                            access.size)
        tracer.vmport_handled(vcpu, result.command, _regs_in(regs),
                              regs32(rax, out.rbx, out.rcx, out.rdx, out.rsi, out.rdi),
                              time.monotonic_ns() - t0)
    elif route is Route.IGNORED:
        why = "port" if access.port != vm.BDOOR_PORT else "magic"
        tracer.vmport_ignored(vcpu, access.port, _regs_in(regs), why)
    elif route is Route.NULL and result.command is not None:
        tracer.vmport_ignored(vcpu, access.port, _regs_in(regs), "no server")
    elif route is Route.SERVER and result.ioreq_type in VMPORT_TYPES \
            and result.command is not None and result.server is not None:
        tracer.vmport_send(vcpu, result.server, result.command, _regs_in(regs))


def _read_bytes(result: IoResult, size: int) -> bytes:
    """What a read returns: the value answered, or all ones when nobody answered."""
    value = result.value if result.value is not None else size_mask(size)
    return value.to_bytes(size, "little")
