"""The device model's ioreq loop: take a request from a slot, emulate it, answer.

Each request is copied out of the shared slot once (``slots.take``) and checked before it is
used: the hypervisor is trusted more than the guest, but the loop still refuses a port
above 0xFFFF, an odd size, an unknown type or a ``data_is_ptr`` buffer outside guest memory
(XSA-199-style), logs it and answers all ones rather than index anything with it. Only
``data`` (and for VMWARE_PORT the registers page entry) is written back.

The backdoor's registers arrive in one of four transports, chosen when the server was
created (issue 6): v14's registers page, inside ``ioreq_t`` (ioreq-union), a page of 64-bit
GPRs (gpr64), or a plain PIO request plus a fetch and a store through the hypervisor
(three-exchange).

Waiting mirrors the hypervisor's: after any work, spin over the slots for a moment, then
block on the event channels. Each round of the spin yields the CPU: on a machine with more
runnable threads than cores, a pure spin takes the core from the very process it waits
for (see docs/performance.md).
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import bufring, slots
from hvmport.dm.client import EventChannel
from hvmport.errors import DmOpError
from hvmport.hv import evtchn

if TYPE_CHECKING:
    # Only for annotations: a device model that does not trace never imports the tracer
    # (its start-up time is how long the hypervisor waits for it).
    from hvmport.trace.recorder import Regs, Tracer

MASK32 = 0xFFFFFFFF
HIGH32 = 0xFFFFFFFF00000000
_FIVE = struct.Struct("<5Q")
BACKDOOR_PORTS = range(0x5658, 0x565C)
#: An ioreq-union answer: (addr, data, count, size) all carry registers back.
Fields = tuple[int, int, int, int]


class RegisterExchange(Protocol):
    """The three-exchange transport's two extra calls to the hypervisor."""

    def get(self, vcpu: int) -> tuple[int, abi.VmwareRegs]: ...

    def set(self, vcpu: int, regs: abi.VmwareRegs) -> None: ...


class PortDevices(Protocol):
    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


#: Runs one backdoor access: (registers eax..edi as a 6-list, is_write, size) -> value read.
#: It updates the list in place with the registers to hand back.
VmportHandler = Callable[[list[int], bool, int], int]
#: Runs one string access that carries registers (the high-bandwidth backdoor):
#: ([ebx, ecx, edx, esi, edi, ebp], guest_to_host, the guest buffer); updates the list.
StringHandler = Callable[[list[int], bool, memoryview], None]


@dataclass(slots=True)
class Stats:
    requests: int = 0
    vmport: int = 0
    buffered: int = 0
    rejected: int = 0


@dataclass
class IoreqLoop:
    nr_vcpus: int
    ioreq_page: mmap.mmap
    channels: list[EventChannel]
    devices: PortDevices
    vmport: VmportHandler | None = None
    memory_devices: PortDevices | None = None
    vmport_page: mmap.mmap | None = None
    buf_page: mmap.mmap | None = None
    buf_channel: EventChannel | None = None
    guest_memory: mmap.mmap | None = None
    vmport_types: tuple[int, ...] = (abi.IOREQ_TYPE_VMWARE_PORT,)
    transport: int = dmop.HVMPORT_VMPORT_TRANSPORT_REGS_PAGE
    #: gpr64 with more than 32 vCPUs: the registers frames after ``vmport_page``.
    more_vmport_pages: list[mmap.mmap] = field(default_factory=list)
    exchange: RegisterExchange | None = None
    spin_us: float = 100.0
    log: TextIO = sys.stderr
    add32: bufring.Add32 = bufring.plain_add32
    #: Other file descriptors to watch, with what to do when they are readable; a callback
    #: returning False ends the loop (e.g. the hypervisor's socket closed). Providers are
    #: asked again before every wait, so the set may change (QMP clients come and go).
    watch: dict[int, Callable[[], bool]] = field(default_factory=dict)
    watch_providers: list[Callable[[], dict[int, Callable[[], bool]]]] = field(
        default_factory=list)
    stats: Stats = field(default_factory=Stats)
    #: Where trace events go (None: off), and the server id they name.
    tracer: Tracer | None = None
    server_id: int = 0
    #: Ports whose string I/O comes with registers in the vmport page (hvmport extension).
    string_ports: dict[int, StringHandler] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._slots = memoryview(self.ioreq_page)
        self._consumer = (bufring.Consumer(memoryview(self.buf_page), self.add32)
                          if self.buf_page is not None else None)
        self._ring_broken = False

    # ------------------------------------------------------------------ serving

    def serve_once(self) -> bool:
        """Handle whatever is ready now; True if anything was."""
        did = False
        for vcpu in range(self.nr_vcpus):
            if slots.read_state(self._slots, vcpu) == abi.STATE_IOREQ_READY:
                req = slots.take(self._slots, vcpu)
                if req is not None:
                    if self.tracer is None:
                        answer = self._handle(vcpu, req)
                    else:
                        answer = self._traced(self.tracer, vcpu, req)
                    if isinstance(answer, tuple):
                        slots.respond_fields(self._slots, vcpu, *answer)
                    else:
                        slots.respond(self._slots, vcpu, answer)
                    self.channels[vcpu].notify()
                    did = True
        if self._consumer is not None and not self._ring_broken:
            try:
                for write in self._consumer.drain():
                    self.stats.buffered += 1
                    if self.tracer is not None:
                        self.tracer.dm_bufioreq(self.server_id, write.type, write.addr,
                                                write.size, write.data)
                    if write.type == abi.IOREQ_TYPE_PIO and write.addr <= 0xFFFF:
                        self.devices.write(write.addr, write.size, write.data)
                    did = True
            except ValueError as e:
                self._ring_broken = True
                self._reject(f"buffered ring: {e}; not serving it any more")
        return did

    def run(self) -> None:
        """Serve until a watched descriptor says stop."""
        wakeups = [c.fd for c in self.channels]
        if self.buf_channel is not None:
            wakeups.append(self.buf_channel.fd)
        spin = self.spin_us / 1e6
        last = time.monotonic()
        while True:
            if self.serve_once():
                last = time.monotonic()
                continue
            if time.monotonic() - last < spin:
                os.sched_yield()
                continue
            watch = dict(self.watch)
            for provider in self.watch_providers:
                watch.update(provider())
            ready, _, _ = select.select([*wakeups, *watch], [], [], 1.0)
            for fd in ready:
                callback = watch.get(fd)
                if callback is not None:
                    if not callback():
                        return
                else:
                    # Just a wake-up; the slots say what to do.
                    evtchn.drain(fd)
            last = time.monotonic()

    # ------------------------------------------------------------------ requests

    def _reject(self, why: str) -> None:
        self.stats.rejected += 1
        print(f"hvmport-dm: rejected: {why}", file=self.log, flush=True)

    def _traced(self, tracer: Tracer, vcpu: int, req: abi.IoReq) -> int | Fields | None:
        # VMWARE_PORT requests are traced inside _vmport, where the registers are.
        if req.type in self.vmport_types:
            return self._handle(vcpu, req)
        t0 = time.monotonic_ns()
        data = self._handle(vcpu, req)
        tracer.dm_ioreq(vcpu, self.server_id, req.type, req.addr, req.size, req.dir,
                        data if isinstance(data, int) else req.data,
                        time.monotonic_ns() - t0)
        return data

    def _handle(self, vcpu: int, req: abi.IoReq) -> int | Fields | None:
        self.stats.requests += 1
        union = self.transport == dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION
        if union and req.type in self.vmport_types:
            # size is EDI here, not an access size.
            return self._vmport_union(vcpu, req)
        ones = slots.size_mask(req.size) if req.size in (1, 2, 4, 8) else MASK32
        if req.size not in (1, 2, 4, 8):
            self._reject(f"vCPU {vcpu}: size {req.size}")
            return ones
        if req.type in self.vmport_types:
            return self._vmport(vcpu, req, ones)
        if req.type == abi.IOREQ_TYPE_PIO:
            if req.addr > 0xFFFF or req.size == 8:
                self._reject(f"vCPU {vcpu}: port {req.addr:#x} size {req.size}")
                return ones
            if req.data_is_ptr:
                return self._pio_string(vcpu, req, ones)
            if self.exchange is not None and req.addr in BACKDOOR_PORTS:
                value = self._vmport_three(vcpu, req, ones)
                if value is not False:
                    return value
            if req.dir == abi.IOREQ_READ:
                return self.devices.read(req.addr, req.size) & ones
            self.devices.write(req.addr, req.size, req.data & ones)
            return None
        if req.type in (abi.IOREQ_TYPE_TIMEOFFSET, abi.IOREQ_TYPE_INVALIDATE):
            return None  # no RTC offset to track, no map cache to flush
        if req.type == abi.IOREQ_TYPE_COPY and self.memory_devices is not None:
            if req.data_is_ptr:
                return self._copy_string(vcpu, req, ones)
            if req.dir == abi.IOREQ_READ:
                return self.memory_devices.read(req.addr, req.size) & ones
            self.memory_devices.write(req.addr, req.size, req.data & ones)
            return None
        if req.type in (abi.IOREQ_TYPE_COPY, abi.IOREQ_TYPE_PCI_CONFIG):
            return ones if req.dir == abi.IOREQ_READ else None  # no such device here
        self._reject(f"vCPU {vcpu}: unknown ioreq type {req.type}")
        return ones

    def _vmport(self, vcpu: int, req: abi.IoReq, ones: int) -> int | None:
        """v14's registers page, or gpr64's page of 64-bit registers."""
        if self.vmport is None or self.vmport_page is None or req.addr > 0xFFFF \
                or req.count != 1 or req.data_is_ptr:
            self._reject(f"vCPU {vcpu}: VMWARE_PORT request this device model cannot serve")
            return ones
        self.stats.vmport += 1
        if self.transport == dmop.HVMPORT_VMPORT_TRANSPORT_GPR64:
            return self._vmport_gpr64(vcpu, req, ones)
        t0 = time.monotonic_ns() if self.tracer is not None else 0
        off = vcpu * abi.VMWARE_REGS_SIZE
        if off + abi.VMWARE_REGS_SIZE > len(self.vmport_page):
            self._reject(f"vCPU {vcpu}: beyond the vmport registers page")
            return ones
        vr = abi.VmwareRegs.unpack(self.vmport_page, off)
        regs = [req.data & MASK32, vr.ebx, vr.ecx, vr.edx, vr.esi, vr.edi]
        regs_in = _regs32(regs) if self.tracer is not None else None
        value = self.vmport(regs, req.dir == abi.IOREQ_WRITE, req.size)
        self.vmport_page[off:off + abi.VMWARE_REGS_SIZE] = abi.VmwareRegs(
            regs[4] & MASK32, regs[5] & MASK32, regs[1] & MASK32, regs[2] & MASK32,
            regs[3] & MASK32).pack()
        if self.tracer is not None and regs_in is not None:
            # EAX as the guest sees it: an IN loads the value read into AL/AX/EAX, an OUT
            # leaves EAX alone.
            eax = regs_in[0]
            if req.dir == abi.IOREQ_READ:
                eax = (eax & ~ones & MASK32) | (value & ones)
            self.tracer.vmport_dm(vcpu, self.server_id, regs_in[2] & 0xFFFF, regs_in,
                                  _regs32([eax, *regs[1:]]), time.monotonic_ns() - t0)
        return value & ones

    def _string_with_regs(self, vcpu: int, req: abi.IoReq, mem: mmap.mmap,
                          handler: StringHandler) -> None:
        page = self.vmport_page
        off = vcpu * abi.VMWARE_REGS_SIZE
        ebp_off = abi.HVMPORT_VMPORT_EBP_OFFSET + 4 * vcpu
        # The high-bandwidth registers extension lives in v14's registers page layout only.
        if page is None or self.transport != dmop.HVMPORT_VMPORT_TRANSPORT_REGS_PAGE \
                or req.df or req.size != 1 or ebp_off + 4 > len(page):
            self._reject(f"vCPU {vcpu}: string I/O on {req.addr:#x} this device model "
                         "cannot serve")
            return
        self.stats.vmport += 1
        vr = abi.VmwareRegs.unpack(page, off)
        regs = [vr.ebx, vr.ecx, vr.edx, vr.esi, vr.edi,
                int.from_bytes(page[ebp_off:ebp_off + 4], "little")]
        with memoryview(mem) as view, view[req.data:req.data + req.count] as buffer:
            handler(regs, req.dir == abi.IOREQ_WRITE, buffer)
        page[off:off + abi.VMWARE_REGS_SIZE] = abi.VmwareRegs(
            regs[3] & MASK32, regs[4] & MASK32, regs[0] & MASK32, regs[1] & MASK32,
            regs[2] & MASK32).pack()

    def _vmport_gpr64(self, vcpu: int, req: abi.IoReq, ones: int) -> int | None:
        assert self.vmport is not None and self.vmport_page is not None
        frame, index = divmod(vcpu, abi.VMPORT_GPR64_PER_PAGE)
        pages = [self.vmport_page, *self.more_vmport_pages]
        if frame >= len(pages):
            self._reject(f"vCPU {vcpu}: beyond the gpr64 registers frames")
            return ones
        page, off = pages[frame], index * abi.VMPORT_GPR64_ENTRY_SIZE
        wide = abi.unpack_gpr64(page, off)
        # The devices are VMware's 32-bit ones: they see and change the low halves; the
        # upper halves go back as they came. Only RBX..RDI (bytes 8-48) are written back.
        rbx, rcx, rdx, rsi, rdi = wide[1:6]
        regs = [req.data & MASK32, rbx & MASK32, rcx & MASK32, rdx & MASK32, rsi & MASK32,
                rdi & MASK32]
        value = self.vmport(regs, req.dir == abi.IOREQ_WRITE, req.size)
        page[off + 8:off + 48] = _FIVE.pack(
            rbx & HIGH32 | regs[1] & MASK32, rcx & HIGH32 | regs[2] & MASK32,
            rdx & HIGH32 | regs[3] & MASK32, rsi & HIGH32 | regs[4] & MASK32,
            rdi & HIGH32 | regs[5] & MASK32)
        return value & ones

    def _vmport_union(self, vcpu: int, req: abi.IoReq) -> Fields:
        port, size = abi.union_port_size(req.pad0)
        if self.vmport is None or port not in BACKDOOR_PORTS or size not in (1, 2, 4) \
                or req.data_is_ptr:
            self._reject(f"vCPU {vcpu}: ioreq-union VMWARE_PORT request this device model "
                         f"cannot serve (port {port:#x} size {size})")
            return req.addr, req.data | MASK32, req.count, req.size
        self.stats.vmport += 1
        # abi.UnionRegs' layout, spelt out: this is the hot path of the transport.
        addr, data = req.addr, req.data
        regs = [data & MASK32, addr & MASK32, addr >> 32 & MASK32, data >> 32 & MASK32,
                req.count & MASK32, req.size & MASK32]
        value = self.vmport(regs, req.dir == abi.IOREQ_WRITE, size) & slots.size_mask(size)
        return (regs[1] & MASK32 | (regs[2] & MASK32) << 32,
                value | (regs[3] & MASK32) << 32, regs[4] & MASK32, regs[5] & MASK32)

    def _vmport_three(self, vcpu: int, req: abi.IoReq, ones: int) -> int | bool | None:
        """A plain PIO request on a backdoor port: fetch the registers, run, store them.

        False when the hypervisor says this is no backdoor call (then it is a port access
        like any other).
        """
        assert self.exchange is not None
        if self.vmport is None or req.size == 8 or req.count != 1:
            return False
        try:
            eax, vr = self.exchange.get(vcpu)
        except DmOpError:
            return False
        self.stats.vmport += 1
        regs = [eax, vr.ebx, vr.ecx, vr.edx, vr.esi, vr.edi]
        value = self.vmport(regs, req.dir == abi.IOREQ_WRITE, req.size)
        try:
            self.exchange.set(vcpu, abi.VmwareRegs(
                regs[4] & MASK32, regs[5] & MASK32, regs[1] & MASK32, regs[2] & MASK32,
                regs[3] & MASK32))
        except DmOpError as e:
            self._reject(f"vCPU {vcpu}: the hypervisor refused the registers: {e}")
        return value & ones if req.dir == abi.IOREQ_READ else None

    def _guest_span(self, vcpu: int, req: abi.IoReq) -> mmap.mmap | None:
        """Guest memory if the whole REP buffer lies inside it, else None (and say so)."""
        mem = self.guest_memory
        step = -req.size if req.df else req.size
        last = req.data + step * (req.count - 1)
        lo, hi = min(req.data, last), max(req.data, last) + req.size
        if mem is None or req.count < 1 or lo < 0 or hi > len(mem):
            self._reject(f"vCPU {vcpu}: string buffer {req.data:#x} x{req.count} "
                         "outside guest memory")
            return None
        return mem

    def _copy_string(self, vcpu: int, req: abi.IoReq, ones: int) -> int | None:
        """REP MOVS to or from MMIO: both addresses step, in the direction DF says."""
        mem = self._guest_span(vcpu, req)
        devices = self.memory_devices
        if mem is None or devices is None:
            return None
        step = -req.size if req.df else req.size
        for i in range(req.count):
            at, dev = req.data + step * i, req.addr + step * i
            if req.dir == abi.IOREQ_READ:
                mem[at:at + req.size] = (devices.read(dev, req.size) & ones).to_bytes(
                    req.size, "little")
            else:
                devices.write(dev, req.size, int.from_bytes(mem[at:at + req.size], "little"))
        return None

    def _pio_string(self, vcpu: int, req: abi.IoReq, ones: int) -> int | None:
        mem = self._guest_span(vcpu, req)
        if mem is None:
            return None
        handler = self.string_ports.get(req.addr)
        if handler is not None:
            self._string_with_regs(vcpu, req, mem, handler)
            return None
        step = -req.size if req.df else req.size
        for i in range(req.count):
            at = req.data + step * i
            if req.dir == abi.IOREQ_READ:
                value = self.devices.read(req.addr, req.size) & ones
                mem[at:at + req.size] = value.to_bytes(req.size, "little")
            else:
                self.devices.write(req.addr, req.size,
                                   int.from_bytes(mem[at:at + req.size], "little"))
        return None


def _regs32(regs: list[int]) -> Regs:
    """A trace payload (``recorder.regs32``) from the handler's eax..edi list."""
    return (regs[0] & MASK32, regs[1] & MASK32, regs[2] & MASK32, regs[3] & MASK32,
            regs[4] & MASK32, regs[5] & MASK32)
