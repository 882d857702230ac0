"""One domain's ioreq servers, their pages, and the path of a guest I/O access through them.

Sans-io: no file descriptors, threads, sockets or clocks of its own. Memory arrives as
buffers through a ``PageProvider``, time through a ``Clock``; event-channel notifications
leave as port numbers in the results. Not thread-safe: the adapter serialises calls (a vCPU
that waits for a device model does so outside the core, then calls ``poll``).

Every rule a device model can break ends in ``crash`` of *this* domain with a reason; no
input from a guest or a device model raises into the host.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.abi import vmware as vmw
from hvmport.core import bufring, slots
from hvmport.core.clock import Clock
from hvmport.core.pages import PageProvider
from hvmport.core.rangeset import RangeSet
from hvmport.core.vmport import (
    BackdoorPlatform,
    BackdoorRegs,
    Outcome,
    backdoor,
    check_port,
)

PCI_CF8 = 0xCF8
PCI_CFC = 0xCFC
MAX_VCPUS = abi.IOREQ_SLOTS_PER_PAGE

RANGE_LIMITS = {
    dmop.XEN_DMOP_IO_RANGE_PORT: dmop.MAX_NR_IO_RANGES,
    dmop.XEN_DMOP_IO_RANGE_MEMORY: dmop.MAX_NR_IO_RANGES,
    dmop.XEN_DMOP_IO_RANGE_PCI: dmop.MAX_NR_IO_RANGES,
    dmop.XEN_DMOP_IO_RANGE_TIMEOFFSET: 1,
    dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT: 1,
}
SPECIAL_RANGE_TYPES = (dmop.XEN_DMOP_IO_RANGE_TIMEOFFSET, dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT)
#: The legacy special-page params, in the order the fallback allocator tries them.
LEGACY_IOREQ_PARAMS = (abi.HVM_PARAM_IOREQ_PFN, abi.HVM_PARAM_BUFIOREQ_PFN)
SET_ONCE_PARAMS = (
    abi.HVM_PARAM_IOREQ_PFN, abi.HVM_PARAM_BUFIOREQ_PFN, abi.HVM_PARAM_VMPORT_REGS_PFN,
    abi.HVM_PARAM_IOREQ_SERVER_PFN, abi.HVM_PARAM_NR_IOREQ_SERVER_PAGES,
)
VMPORT_TYPES = (abi.IOREQ_TYPE_VMWARE_PORT, abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT)
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
REGS_PAGE = dmop.HVMPORT_VMPORT_TRANSPORT_REGS_PAGE
IOREQ_UNION = dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION
GPR64 = dmop.HVMPORT_VMPORT_TRANSPORT_GPR64
THREE_EXCHANGE = dmop.HVMPORT_VMPORT_TRANSPORT_THREE_EXCHANGE
#: What a three-exchange device model fetches: EAX, then a ``vmware_regs``.
_EAX = struct.Struct("<I")
#: An ioreq-union answer's addr, data, count and size (see abi.UnionRegs).
_UNION_FIELDS = struct.Struct("<QQII")


class PageKind(enum.Enum):
    IOREQ = "ioreq"
    BUFIOREQ = "bufioreq"
    VMPORT = "vmport"

    # Members are singletons compared by identity; Enum's own __hash__ is a Python-level
    # call, made several times per forwarded request on the pages dict.
    __hash__ = object.__hash__


@dataclass(slots=True)
class ServerPage:
    view: memoryview
    #: The guest frame it lives at (legacy path), or None for a resource frame.
    gfn: int | None


@dataclass(slots=True)
class IoreqServer:
    id: int
    emulator: int
    flags: int
    vmport_enabled: bool
    vcpu_ports: list[int]
    buf_port: int
    ranges: dict[int, RangeSet]
    enabled: bool = False
    pages: dict[PageKind, ServerPage] = field(default_factory=dict)
    producer: bufring.Producer | None = None
    #: gpr64 with more than 32 vCPUs: the registers frames after the first (resource
    #: frames 0x101 onwards, never guest frames).
    more_vmport: list[ServerPage] = field(default_factory=list)

    @property
    def bufioreq(self) -> int:
        return self.flags & dmop.HVM_IOREQSRV_BUFIOREQ_MASK

    @property
    def transport(self) -> int:
        """How VMWARE_PORT requests carry registers (an hvmport extension, issue 6)."""
        return ((self.flags & dmop.HVMPORT_IOREQSRV_VMPORT_TRANSPORT_MASK)
                >> dmop.HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT)

    @property
    def vmport_frames(self) -> int:
        """How many registers frames the transport needs (0: it has no page)."""
        if not self.vmport_enabled or self.transport in (IOREQ_UNION, THREE_EXCHANGE):
            return 0
        if self.transport == GPR64:
            per = abi.VMPORT_GPR64_PER_PAGE
            return (len(self.vcpu_ports) + per - 1) // per
        return 1

    def needed_pages(self) -> list[PageKind]:
        kinds = [PageKind.IOREQ]
        if self.bufioreq != dmop.HVM_IOREQSRV_BUFIOREQ_OFF:
            kinds.append(PageKind.BUFIOREQ)
        # Only a server that itself has vmport enabled gets a registers page; v14 tested
        # the domain flag here and so broke a second (DISABLE_VMPORT) server. The
        # ioreq-union and three-exchange transports need none at all.
        if self.vmport_frames:
            kinds.append(PageKind.VMPORT)
        return kinds


class IoStatus(enum.Enum):
    DONE = "done"  # the access is complete: apply value/regs and resume the vCPU
    WAIT = "wait"  # forwarded: notify ``notify`` and wait, then call ``poll``
    CRASHED = "crashed"  # the domain is crashed; ``reason`` says why


class Route(enum.Enum):
    """Where an access went; for tracing and tests."""

    INTERNAL = "internal"  # answered by the in-hypervisor backdoor
    IGNORED = "ignored"  # backdoor port with wrong port/magic: all ones, never forwarded
    SERVER = "server"  # an ioreq server
    NULL = "null"  # no server claims it: reads all ones, writes dropped


@dataclass(slots=True)
class IoResult:
    status: IoStatus
    route: Route = Route.NULL
    #: For a read: the value read (already cut to the access size). For string reads the
    #: bytes are in ``buffer`` instead.
    value: int | None = None
    buffer: bytes = b""
    #: Registers to write back (only their 32-bit halves differ), or None.
    regs: BackdoorRegs | None = None
    notify: int | None = None
    server: int | None = None
    ioreq_type: int | None = None
    command: int | None = None
    reason: str = ""
    #: The request as posted to the server's slot (WAIT results), for tracing.
    request: abi.IoReq | None = None


@dataclass(slots=True)
class Pending:
    server_id: int
    req: abi.IoReq
    waiter: slots.Waiter
    #: (addr, size, is_write) as the vCPU presented it, before any PCI rewrite.
    access: tuple[int, int, bool]
    #: A backdoor call forwarded to a device model (with its registers, in any transport).
    vmport: bool = False
    #: The guest's registers when it made the call (the three-exchange fetch reads them).
    regs_in: BackdoorRegs | None = None
    #: What a three-exchange device model stored, to apply at completion.
    regs_out: abi.VmwareRegs | None = None


@dataclass(slots=True, frozen=True)
class Crash:
    reason: str
    party: str


@dataclass(slots=True, frozen=True)
class ServerInfo:
    bufioreq_port: int
    ioreq_gfn: int
    bufioreq_gfn: int


class Domain:
    def __init__(
        self,
        domid: int,
        nr_vcpus: int,
        pages: PageProvider,
        clock: Clock,
        *,
        vmware_port: bool = False,
        vmware_hwver: int = 0,
        tsc_khz: int = 0,
        time_offset_s: int = 0,
        cas64: bufring.Cas64 = bufring.plain_cas64,
    ) -> None:
        if not 1 <= nr_vcpus <= MAX_VCPUS:
            raise ValueError(f"a domain has 1..{MAX_VCPUS} vCPUs, not {nr_vcpus}")
        self.domid = domid
        self.nr_vcpus = nr_vcpus
        self.pages = pages
        self.clock = clock
        self.vmware_port = vmware_port
        self.platform = BackdoorPlatform(tsc_khz, vmware_hwver, time_offset_s)
        self.cas64 = cas64
        self.params: dict[int, int] = {}
        self.legacy_free: set[int] = set()
        self.pool_base = 0
        self.pool_free: set[int] = set()
        self.servers: dict[int, IoreqServer] = {}
        #: The servers from the highest id down (selection order), kept by create/destroy.
        self._by_id_desc: list[IoreqServer] = []
        #: Some server takes the gpr64 transport, so backdoor calls need RBP and R8..R15
        #: too (the adapter skips reading them otherwise).
        self.wants_all_gprs = False
        self.pending: list[Pending | None] = [None] * nr_vcpus
        self.crash_info: Crash | None = None
        self.pci_cf8 = 0
        self._next_port = 1
        #: Called once when the domain crashes (the adapter stops vCPUs, tells the user).
        self.on_crash: Callable[[Crash], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def crashed(self) -> bool:
        return self.crash_info is not None

    def crash(self, reason: str, party: str = "device model") -> None:
        """Crash this domain; the first reason is kept, later ones are ignored."""
        if self.crash_info is not None:
            return
        self.crash_info = Crash(reason, party)
        if self.on_crash is not None:
            self.on_crash(self.crash_info)

    # ------------------------------------------------------------------ HVM params

    def set_param(self, index: int, value: int, *, from_guest: bool = False) -> int:
        if index in (abi.HVM_PARAM_BUFIOREQ_EVTCHN,):
            return -errno.EINVAL
        if index in SET_ONCE_PARAMS:
            if from_guest:
                return -errno.EPERM
            old = self.params.get(index, 0)
            if old and old != value:
                return -errno.EEXIST
            if index == abi.HVM_PARAM_NR_IOREQ_SERVER_PAGES:
                if not 1 <= value <= 64:
                    return -errno.EINVAL
                self.pool_free = set(range(value))
            elif index == abi.HVM_PARAM_IOREQ_SERVER_PFN:
                self.pool_base = value
            elif value:
                # A non-zero legacy gfn is free for any server to take.
                self.legacy_free.add(index)
        self.params[index] = value
        return 0

    def get_param(self, index: int, *, from_guest: bool = False) -> tuple[int, int]:
        if index == abi.HVM_PARAM_BUFIOREQ_EVTCHN:
            return -errno.EINVAL, 0
        if from_guest and index in SET_ONCE_PARAMS:
            return -errno.EPERM, 0
        return 0, self.params.get(index, 0)

    def _alloc_gfn(self, kind: PageKind) -> int | None:
        if kind is PageKind.VMPORT:
            # The device model learns this gfn only from HVM_PARAM_VMPORT_REGS_PFN
            # (get_info has no field for it), so it can come from nowhere else.
            if abi.HVM_PARAM_VMPORT_REGS_PFN in self.legacy_free:
                self.legacy_free.discard(abi.HVM_PARAM_VMPORT_REGS_PFN)
                return self.params[abi.HVM_PARAM_VMPORT_REGS_PFN]
            return None
        if self.pool_free:
            bit = min(self.pool_free)
            self.pool_free.discard(bit)
            return self.pool_base + bit
        # The legacy fallback hands out a gfn that is free (the bit is set) and marks it
        # used: v14's fix, and upstream's 282ed258a5 (2025).
        for index in LEGACY_IOREQ_PARAMS:
            if index in self.legacy_free:
                self.legacy_free.discard(index)
                return self.params[index]
        return None

    def _free_gfn(self, gfn: int) -> None:
        nr = self.params.get(abi.HVM_PARAM_NR_IOREQ_SERVER_PAGES, 0)
        if self.pool_base <= gfn < self.pool_base + nr:
            self.pool_free.add(gfn - self.pool_base)
            return
        for index in (*LEGACY_IOREQ_PARAMS, abi.HVM_PARAM_VMPORT_REGS_PFN):
            if self.params.get(index) == gfn:
                self.legacy_free.add(index)
                return

    # ------------------------------------------------------------------ servers (dm_op)

    def _server(self, caller: int, sid: int) -> tuple[int, IoreqServer | None]:
        server = self.servers.get(sid)
        if server is None:
            return -errno.ENOENT, None
        if server.emulator != caller:
            return -errno.EPERM, None
        return 0, server

    def _alloc_port(self) -> int:
        port = self._next_port
        self._next_port += 1
        return port

    def create_server(self, caller: int, flags: int) -> tuple[int, int]:
        if self.crashed:
            return -errno.EINVAL, 0
        if flags & ~(dmop.HVM_IOREQSRV_FLAGS_MASK | dmop.HVMPORT_IOREQSRV_EXT_MASK):
            return -errno.EINVAL, 0
        if (flags & dmop.HVM_IOREQSRV_BUFIOREQ_MASK) > dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC:
            return -errno.EINVAL, 0
        free = [i for i in range(dmop.MAX_NR_IOREQ_SERVERS) if i not in self.servers]
        if not free:
            return -errno.ENOSPC, 0
        sid = free[0]
        vmport_enabled = self.vmware_port and not flags & dmop.HVM_IOREQSRV_DISABLE_VMPORT
        ranges = {
            t: RangeSet(limit, special_only=t in SPECIAL_RANGE_TYPES)
            for t, limit in RANGE_LIMITS.items()
        }
        if vmport_enabled:
            ranges[dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT].add(1, 1)
        server = IoreqServer(
            sid, caller, flags, vmport_enabled,
            [self._alloc_port() for _ in range(self.nr_vcpus)],
            self._alloc_port() if flags & dmop.HVM_IOREQSRV_BUFIOREQ_MASK else 0,
            ranges,
        )
        self.servers[sid] = server
        self._by_id_desc = [s for _, s in sorted(self.servers.items(), reverse=True)]
        self.wants_all_gprs = any(s.transport == GPR64 for s in self._by_id_desc)
        return 0, sid

    def get_server_info(self, caller: int, sid: int, want_gfns: bool) -> tuple[int, ServerInfo]:
        rc, server = self._server(caller, sid)
        if server is None or self.crashed:
            return rc or -errno.EINVAL, ServerInfo(0, 0, 0)
        if want_gfns:
            rc = self._map_gfns(server)
            if rc:
                return rc, ServerInfo(0, 0, 0)
        ioreq_gfn = bufioreq_gfn = 0
        if want_gfns:
            ioreq_gfn = server.pages[PageKind.IOREQ].gfn or 0
            if PageKind.BUFIOREQ in server.pages:
                bufioreq_gfn = server.pages[PageKind.BUFIOREQ].gfn or 0
        return 0, ServerInfo(server.buf_port, ioreq_gfn, bufioreq_gfn)

    def _map_gfns(self, server: IoreqServer) -> int:
        kinds = server.needed_pages()
        if server.vmport_frames > 1:
            return -errno.ENOMEM  # one VMPORT_REGS_PFN: no gfns for the other frames
        # The two ways of reaching a page exclude each other.
        for kind in kinds:
            page = server.pages.get(kind)
            if page is not None and page.gfn is None:
                return -errno.EPERM
        added: list[PageKind] = []
        for kind in kinds:
            if kind in server.pages:
                continue
            gfn = self._alloc_gfn(kind)
            view = self.pages.guest_frame(gfn) if gfn is not None else None
            if gfn is None or view is None:
                if gfn is not None:
                    self._free_gfn(gfn)
                for k in added:
                    self._free_gfn(server.pages.pop(k).gfn or 0)
                return -errno.ENOMEM
            server.pages[kind] = ServerPage(view, gfn)
            added.append(kind)
        if server.enabled:
            for kind in added:
                self._hide(server, server.pages[kind])
            self._write_eports(server)
        return 0

    def acquire_resource(self, caller: int, sid: int, frame: int) -> tuple[int, memoryview | None]:
        rc, server = self._server(caller, sid)
        if server is None or self.crashed:
            return rc or -errno.EINVAL, None
        if frame == dmop.XENMEM_resource_ioreq_server_frame_bufioreq:
            kind = PageKind.BUFIOREQ
        elif frame == dmop.XENMEM_resource_ioreq_server_frame_ioreq(0):
            kind = PageKind.IOREQ
        elif frame == dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT:
            kind = PageKind.VMPORT
        elif 0 < frame - dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT \
                < server.vmport_frames:
            self._alloc_more_vmport(server)
            return 0, server.more_vmport[
                frame - dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT - 1].view
        else:
            return -errno.EINVAL, None
        if kind not in server.needed_pages():
            return -errno.ENOENT, None
        page = server.pages.get(kind)
        if page is not None and page.gfn is not None:
            return -errno.EPERM, None
        if page is None:
            page = server.pages[kind] = ServerPage(self.pages.alloc_frame(), None)
            if server.enabled:
                self._write_eports(server)
                self._start_ring(server)
        return 0, page.view

    def map_range(self, caller: int, sid: int, rtype: int, start: int, end: int) -> int:
        if rtype not in RANGE_LIMITS or start > end:
            return -errno.EINVAL
        rc, server = self._server(caller, sid)
        if server is None:
            return rc
        rs = server.ranges[rtype]
        if rs.overlaps(start, end):
            return -errno.EEXIST
        return rs.add(start, end)

    def unmap_range(self, caller: int, sid: int, rtype: int, start: int, end: int) -> int:
        if rtype not in RANGE_LIMITS or start > end:
            return -errno.EINVAL
        rc, server = self._server(caller, sid)
        if server is None:
            return rc
        return server.ranges[rtype].remove(start, end)

    def set_server_state(self, caller: int, sid: int, enabled: bool) -> int:
        rc, server = self._server(caller, sid)
        if server is None:
            return rc
        if enabled == server.enabled:
            return 0
        if enabled:
            self._enable(server)
        else:
            self._disable(server)
        return 0

    def destroy_server(self, caller: int, sid: int) -> int:
        rc, server = self._server(caller, sid)
        if server is None:
            return rc
        if server.enabled:
            self._disable(server)
        for page in server.pages.values():
            if page.gfn is None:
                self.pages.free_frame(page.view)
            else:
                self._free_gfn(page.gfn)
        server.pages.clear()
        for page in server.more_vmport:
            self.pages.free_frame(page.view)
        server.more_vmport.clear()
        del self.servers[sid]
        self._by_id_desc = [s for _, s in sorted(self.servers.items(), reverse=True)]
        self.wants_all_gprs = any(s.transport == GPR64 for s in self._by_id_desc)
        return 0

    def _hide(self, server: IoreqServer, page: ServerPage) -> None:
        if page.gfn is None:
            return
        if not self.pages.physmap_remove(page.gfn):
            self.crash(f"cannot remove ioreq server {server.id}'s page at gfn {page.gfn:#x} "
                       f"from the guest physmap", "hypervisor")
        page.view[:] = bytes(len(page.view))

    def _enable(self, server: IoreqServer) -> None:
        # A server enabled before the device model reached its pages still needs them:
        # give it resource frames rather than ever sending into nothing.
        for kind in server.needed_pages():
            if kind not in server.pages:
                server.pages[kind] = ServerPage(self.pages.alloc_frame(), None)
        self._alloc_more_vmport(server)
        for page in server.pages.values():
            self._hide(server, page)
        server.enabled = True
        self._write_eports(server)
        self._start_ring(server)

    def _disable(self, server: IoreqServer) -> None:
        for page in server.pages.values():
            if page.gfn is not None:
                page.view[:] = bytes(len(page.view))
                self.pages.physmap_add(page.gfn)
        server.enabled = False
        server.producer = None

    def _alloc_more_vmport(self, server: IoreqServer) -> None:
        while len(server.more_vmport) < server.vmport_frames - 1:
            server.more_vmport.append(ServerPage(self.pages.alloc_frame(), None))

    def _write_eports(self, server: IoreqServer) -> None:
        page = server.pages.get(PageKind.IOREQ)
        if page is None:
            return
        for vcpu, port in enumerate(server.vcpu_ports):
            off = slots.slot_offset(vcpu) + 24
            page.view[off:off + 4] = port.to_bytes(4, "little")

    def _start_ring(self, server: IoreqServer) -> None:
        page = server.pages.get(PageKind.BUFIOREQ)
        if page is not None and server.producer is None:
            server.producer = bufring.Producer(page.view, server.bufioreq, self.cas64)

    def set_isa_irq_level(self, irq: int, level: int) -> int:
        if irq > 15 or level > 1:
            return -errno.EINVAL
        return 0

    # ------------------------------------------------------------------ selection

    def select_server(
        self, ioreq_type: int, addr: int, size: int, count: int = 1, df: bool = False
    ) -> tuple[IoreqServer | None, int, int]:
        """The server for an access, walking ids from 7 down so the newest wins.

        Returns (server, type, addr): a PIO access to 0xcfc..0xcff while 0xcf8 has its
        enable bit becomes a PCI_CONFIG request when a server claims that SBDF.
        """
        enabled = [s for s in self._by_id_desc if s.enabled]
        if ioreq_type in VMPORT_TYPES or ioreq_type == abi.IOREQ_TYPE_TIMEOFFSET:
            rtype = (dmop.XEN_DMOP_IO_RANGE_TIMEOFFSET if ioreq_type == abi.IOREQ_TYPE_TIMEOFFSET
                     else dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT)
            for s in enabled:
                if s.ranges[rtype].contains_point(1):
                    return s, ioreq_type, addr
            return None, ioreq_type, addr
        if ioreq_type == abi.IOREQ_TYPE_PIO and (addr & ~3) == PCI_CFC and self.pci_cf8 >> 31:
            sbdf = (self.pci_cf8 >> 8) & 0xFFFF
            reg = (self.pci_cf8 & 0xFC) | (addr & 3)
            for s in enabled:
                if s.ranges[dmop.XEN_DMOP_IO_RANGE_PCI].contains_point(sbdf):
                    return s, abi.IOREQ_TYPE_PCI_CONFIG, (sbdf << 32) | reg
        if ioreq_type == abi.IOREQ_TYPE_PIO:
            rtype, first, last = dmop.XEN_DMOP_IO_RANGE_PORT, addr, addr + size - 1
        elif ioreq_type == abi.IOREQ_TYPE_COPY:
            span = (count - 1) * size
            first = addr - span if df else addr
            last = first + span + size - 1
            rtype = dmop.XEN_DMOP_IO_RANGE_MEMORY
        else:
            return None, ioreq_type, addr
        for s in enabled:
            if s.ranges[rtype].contains(first, last):
                return s, ioreq_type, addr
        return None, ioreq_type, addr

    # ------------------------------------------------------------------ guest accesses

    def pio(
        self,
        vcpu: int,
        port: int,
        size: int,
        is_write: bool,
        value: int,
        regs: BackdoorRegs,
        cpl: int,
        *,
        string: bool = False,
        count: int = 1,
        df: bool = False,
        buffer_gpa: int | None = None,
    ) -> IoResult:
        """One port access from the guest, after the adapter's own ports declined it.

        ``value`` is the data of a non-string write. A string access (INS/OUTS) is never a
        backdoor call (the series excluded ``data_is_ptr`` too, review point R4): with a
        ``buffer_gpa`` it is forwarded as a ``data_is_ptr`` request on guest memory, else
        element by element by the caller.
        """
        if self.crashed:
            return self._crashed()
        self._check_idle(vcpu)
        if size not in (1, 2, 4) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"impossible port access: port {port:#x} size {size}")
        value &= slots.size_mask(size)
        if is_write and not string and size == 4 and port == PCI_CF8:
            self.pci_cf8 = value
        if self.vmware_port and not string and check_port(port, size):
            result = backdoor(port, regs, cpl, self.platform, self.clock)
            if result.outcome is Outcome.IGNORED:
                return IoResult(IoStatus.DONE, Route.IGNORED,
                                None if is_write else slots.size_mask(size))
            if result.outcome is Outcome.HANDLED:
                return IoResult(IoStatus.DONE, Route.INTERNAL,
                                None if is_write else result.in_value & slots.size_mask(size),
                                regs=result.regs, command=result.command)
            return self._forward_vmport(vcpu, port, size, is_write, regs, result.command)
        server, rtype, addr = self.select_server(abi.IOREQ_TYPE_PIO, port, size)
        if server is None:
            if is_write:
                return IoResult(IoStatus.DONE, Route.NULL)
            if string:
                return IoResult(IoStatus.DONE, Route.NULL, buffer=b"\xff" * (size * count))
            return IoResult(IoStatus.DONE, Route.NULL, slots.size_mask(size))
        req = abi.IoReq(addr=addr, size=size, count=count, type=rtype,
                        dir=abi.IOREQ_WRITE if is_write else abi.IOREQ_READ, df=df)
        if string and buffer_gpa is not None:
            req.data_is_ptr = True
            req.data = buffer_gpa
            if self._carries_regs(server, req):
                self._write_vmport_regs(server, vcpu, regs)
        elif is_write:
            req.data = value
        return self._send(server, vcpu, req, (port, size, is_write))

    def _carries_regs(self, server: IoreqServer, req: abi.IoReq) -> bool:
        """hvmport extension: a string access to the high-bandwidth backdoor port goes with
        the registers (channel, cookie, status), in the vmport page of a vmport server."""
        return (self.vmware_port and req.type == abi.IOREQ_TYPE_PIO and req.data_is_ptr
                and req.addr == vmw.BDOORHB_PORT and server.transport == REGS_PAGE
                and PageKind.VMPORT in server.pages)

    def _write_vmport_regs(self, server: IoreqServer, vcpu: int, regs: BackdoorRegs) -> None:
        page = server.pages[PageKind.VMPORT]
        off = vcpu * abi.VMWARE_REGS_SIZE
        page.view[off:off + abi.VMWARE_REGS_SIZE] = abi.VmwareRegs(
            regs.rsi & MASK32, regs.rdi & MASK32, regs.rbx & MASK32, regs.rcx & MASK32,
            regs.rdx & MASK32,
        ).pack()
        ebp = abi.HVMPORT_VMPORT_EBP_OFFSET + 4 * vcpu
        page.view[ebp:ebp + 4] = (regs.rbp & MASK32).to_bytes(4, "little")

    def mmio(self, vcpu: int, addr: int, size: int, is_write: bool, value: int, *,
             count: int = 1, df: bool = False) -> IoResult:
        if self.crashed:
            return self._crashed()
        self._check_idle(vcpu)
        if size not in (1, 2, 4, 8):
            raise ValueError(f"impossible MMIO size {size}")
        server, _, _ = self.select_server(abi.IOREQ_TYPE_COPY, addr, size, count, df)
        if server is None:
            return IoResult(IoStatus.DONE, Route.NULL, None if is_write else slots.size_mask(size))
        req = abi.IoReq(addr=addr, size=size, count=count, type=abi.IOREQ_TYPE_COPY,
                        dir=abi.IOREQ_WRITE if is_write else abi.IOREQ_READ, df=df,
                        data=value & slots.size_mask(size) if is_write else 0)
        return self._send(server, vcpu, req, (addr, size, is_write))

    def _forward_vmport(self, vcpu: int, port: int, size: int, is_write: bool,
                        regs: BackdoorRegs, command: int) -> IoResult:
        server, _, _ = self.select_server(abi.IOREQ_TYPE_VMWARE_PORT, port, size)
        transport = server.transport if server is not None else REGS_PAGE
        page = server.pages.get(PageKind.VMPORT) if server is not None else None
        # No registers to carry means no backdoor call: a server without vmport enabled
        # (even one claiming [1,1]), or whose transport has a page it lacks, is the null
        # handler, as in v14.
        if server is None or not server.vmport_enabled \
                or (page is None and server.vmport_frames):
            return IoResult(IoStatus.DONE, Route.NULL, None if is_write else slots.size_mask(size),
                            command=command)
        vtype = (abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT
                 if server.flags & dmop.HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE
                 else abi.IOREQ_TYPE_VMWARE_PORT)
        direction = abi.IOREQ_WRITE if is_write else abi.IOREQ_READ
        frozen: tuple[str, ...] = slots.FROZEN
        if transport == IOREQ_UNION:
            # abi.UnionRegs' layout, spelt out: this is the hot path of the transport.
            req = abi.IoReq(addr=regs.rbx & MASK32 | (regs.rcx & MASK32) << 32,
                            data=regs.rax & MASK32 | (regs.rdx & MASK32) << 32,
                            count=regs.rsi & MASK32, size=regs.rdi & MASK32, type=vtype,
                            dir=direction, pad0=abi.union_access(port, size))
            frozen = slots.FROZEN_UNION
        elif transport == THREE_EXCHANGE:
            # The pre-patch world: an ordinary port access; the registers wait here until
            # the device model fetches them.
            req = abi.IoReq(addr=port, size=size, count=1, type=abi.IOREQ_TYPE_PIO,
                            dir=direction, data=regs.rax & slots.size_mask(size) if is_write
                            else 0)
        else:
            assert page is not None
            if transport == GPR64:
                view, off = self._gpr64_entry(server, vcpu)
                others = regs.others if len(regs.others) == 9 else (0,) * 9
                view[off:off + abi.VMPORT_GPR64_ENTRY_SIZE] = abi.pack_gpr64(
                    (regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, *others))
            else:
                self._write_vmport_regs(server, vcpu, regs)
            req = abi.IoReq(addr=port, data=regs.rax & MASK64, size=size, count=1, type=vtype,
                            dir=direction)
        result = self._send(server, vcpu, req, (port, size, is_write), frozen)
        pending = self.pending[vcpu]
        if pending is not None:
            pending.vmport = True
            pending.regs_in = regs
        result.command = command
        return result

    @staticmethod
    def _gpr64_entry(server: IoreqServer, vcpu: int) -> tuple[memoryview, int]:
        frame, index = divmod(vcpu, abi.VMPORT_GPR64_PER_PAGE)
        page = server.pages[PageKind.VMPORT] if frame == 0 else server.more_vmport[frame - 1]
        return page.view, index * abi.VMPORT_GPR64_ENTRY_SIZE

    def _send(self, server: IoreqServer, vcpu: int, req: abi.IoReq,
              access: tuple[int, int, bool],
              frozen: tuple[str, ...] = slots.FROZEN) -> IoResult:
        page = server.pages[PageKind.IOREQ]
        reason = slots.post(page.view, vcpu, req, server.vcpu_ports[vcpu])
        if reason is not None:
            self.crash(reason)
            return self._crashed()
        self.pending[vcpu] = Pending(server.id, req, slots.Waiter(vcpu, req, frozen), access)
        return IoResult(IoStatus.WAIT, Route.SERVER, notify=server.vcpu_ports[vcpu],
                        server=server.id, ioreq_type=req.type, request=req)

    def poll(self, vcpu: int, regs: BackdoorRegs,
             reissue: tuple[int, int, bool] | None = None) -> IoResult:
        """Look once at a forwarded request; DONE when the device model has answered.

        ``reissue`` = (addr, size, is_write) of the access as the vCPU re-presents it at
        completion: it must match what was sent, or the domain crashes (Xen's re-issue
        check).
        """
        pending = self.pending[vcpu]
        if pending is None:
            raise ValueError(f"vCPU {vcpu} has no request in flight")
        if self.crashed:
            self.pending[vcpu] = None
            return self._crashed()
        req = pending.req
        if reissue is not None and reissue != pending.access:
            self.pending[vcpu] = None
            self.crash(f"emulation request re-issued as {reissue}, sent as {pending.access}",
                       "hypervisor")
            return self._crashed()
        server = self.servers.get(pending.server_id)
        base = IoResult(IoStatus.DONE, Route.SERVER, server=pending.server_id,
                        ioreq_type=req.type)
        ones = slots.size_mask(pending.access[1])
        if server is None or PageKind.IOREQ not in server.pages:
            # Destroyed under the request: as if the emulator died.
            self.pending[vcpu] = None
            base.reason = "ioreq server destroyed while a request was in flight"
            return self._finish(base, req, ones, ones)
        polled = pending.waiter.poll(server.pages[PageKind.IOREQ].view)
        if polled.status is slots.Poll.PENDING:
            return IoResult(IoStatus.WAIT, Route.SERVER, server=server.id, ioreq_type=req.type)
        self.pending[vcpu] = None
        if polled.status is slots.Poll.CRASH:
            self.crash(f"ioreq server {server.id}: {polled.reason}")
            return self._crashed()
        if polled.status is slots.Poll.DIED:
            base.reason = polled.reason
            return self._finish(base, req, ones, ones)
        data = polled.data
        if pending.vmport:
            # Review point R10: the registers come from the server that handled the request.
            data, base.regs = self._vmport_back(server, vcpu, pending, polled, regs, data)
        elif self._carries_regs(server, req):
            base.regs = self._hb_regs_back(server, vcpu, regs)
        return self._finish(base, req, data, ones)

    def _hb_regs_back(self, server: IoreqServer, vcpu: int,
                      regs: BackdoorRegs) -> BackdoorRegs:
        """A high-bandwidth string access's registers, from the regs page (one copy)."""
        page = server.pages[PageKind.VMPORT]
        off = vcpu * abi.VMWARE_REGS_SIZE
        vr = abi.VmwareRegs.unpack(bytes(page.view[off:off + abi.VMWARE_REGS_SIZE]))
        back = _halves(regs, vr.ebx, vr.ecx, vr.edx, vr.esi, vr.edi)
        back.rbp = regs.rbp
        return back

    def _vmport_back(self, server: IoreqServer, vcpu: int, pending: Pending,
                     polled: slots.PollResult, regs: BackdoorRegs,
                     data: int) -> tuple[int, BackdoorRegs | None]:
        """The IN value and the registers a backdoor call hands back, per transport.

        Every shared byte is copied once before it is looked at.
        """
        transport = server.transport
        if transport == IOREQ_UNION:
            if not polled.raw:
                return data, None
            addr, data, count, edi = _UNION_FIELDS.unpack_from(polled.raw)
            return data & MASK32, _halves(regs, addr & MASK32, addr >> 32, data >> 32, count,
                                          edi)
        if transport == THREE_EXCHANGE:
            out = pending.regs_out
            if out is None:
                return data, None  # the device model stored nothing: registers unchanged
            return data, _halves(regs, out.ebx, out.ecx, out.edx, out.esi, out.edi)
        page = server.pages.get(PageKind.VMPORT)
        if page is None:
            return data, None
        if transport == GPR64:
            view, off = self._gpr64_entry(server, vcpu)
            v = abi.unpack_gpr64(bytes(view[off:off + abi.VMPORT_GPR64_ENTRY_SIZE]))
            # Whole 64-bit registers come back: that is what this layout is for. RBP and
            # R8..R15 only where the vCPU gave them (the adapter writes back what it read).
            return data, BackdoorRegs(regs.rax, v[1], v[2], v[3], v[4], v[5],
                                      tuple(v[6:]) if regs.others else ())
        off = vcpu * abi.VMWARE_REGS_SIZE
        vr = abi.VmwareRegs.unpack(bytes(page.view[off:off + abi.VMWARE_REGS_SIZE]))
        return data, _halves(regs, vr.ebx, vr.ecx, vr.edx, vr.esi, vr.edi)

    @staticmethod
    def _finish(result: IoResult, req: abi.IoReq, data: int, ones: int) -> IoResult:
        if req.dir == abi.IOREQ_READ and not req.data_is_ptr:
            result.value = data & ones
        return result

    # ------------------------------------------------------------------ three-exchange

    def vmport_get_regs(self, caller: int, vcpu: int) -> tuple[int, bytes]:
        """The second exchange: a three-exchange device model fetches the registers.

        24 bytes: EAX (u32), then a ``vmware_regs`` (ESI, EDI, EBX, ECX, EDX). Only for a
        backdoor call in flight on ``vcpu`` to a three-exchange server the caller owns.
        """
        rc, pending = self._exchange(caller, vcpu)
        if pending is None or pending.regs_in is None:
            return rc or -errno.ENOENT, b""
        r = pending.regs_in
        return 0, _EAX.pack(r.rax & MASK32) + abi.VmwareRegs(
            r.rsi & MASK32, r.rdi & MASK32, r.rbx & MASK32, r.rcx & MASK32, r.rdx & MASK32
        ).pack()

    def vmport_set_regs(self, caller: int, vcpu: int, raw: bytes) -> int:
        """The third exchange: store a ``vmware_regs`` to hand back at completion.

        It must come before the device model answers the slot: after that the call is
        over and this is -ENOENT.
        """
        if len(raw) != abi.VMWARE_REGS_SIZE:
            return -errno.EINVAL
        rc, pending = self._exchange(caller, vcpu)
        if pending is None:
            return rc
        pending.regs_out = abi.VmwareRegs.unpack(raw)
        return 0

    def _exchange(self, caller: int, vcpu: int) -> tuple[int, Pending | None]:
        if self.crashed or not 0 <= vcpu < self.nr_vcpus:
            return -errno.EINVAL, None
        pending = self.pending[vcpu]
        if pending is None or not pending.vmport:
            return -errno.ENOENT, None
        server = self.servers.get(pending.server_id)
        if server is None:
            return -errno.ENOENT, None
        if server.emulator != caller:
            return -errno.EPERM, None
        if server.transport != THREE_EXCHANGE:
            return -errno.EINVAL, None
        return 0, pending

    def _check_idle(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.nr_vcpus:
            raise ValueError(f"no vCPU {vcpu}")
        if self.pending[vcpu] is not None:
            raise ValueError(f"vCPU {vcpu} issued I/O while a request is in flight")

    def _crashed(self) -> IoResult:
        assert self.crash_info is not None
        return IoResult(IoStatus.CRASHED, reason=self.crash_info.reason)

    # ------------------------------------------------------------------ buffered

    def send_buffered(self, sid: int, ioreq_type: int, addr: int, size: int,
                      data: int) -> tuple[bufring.Send, int | None]:
        """Queue a write on a server's ring; returns the status and the port to notify."""
        server = self.servers.get(sid)
        if self.crashed or server is None or server.producer is None:
            return bufring.Send.UNBUFFERABLE, None
        result = server.producer.send(ioreq_type, addr, size, data)
        if result.status is bufring.Send.CORRUPT:
            self.crash(f"ioreq server {sid}: {result.reason}")
        if result.status is bufring.Send.QUEUED:
            return result.status, server.buf_port
        return result.status, None

    def broadcast_timeoffset(self, seconds: int) -> list[int]:
        """Tell every buffered server the guest's RTC offset; returns ports to notify."""
        self.platform = BackdoorPlatform(self.platform.tsc_khz, self.platform.vmware_hwver,
                                         seconds)
        ports = []
        for sid, server in sorted(self.servers.items()):
            if server.enabled and server.producer is not None:
                status, port = self.send_buffered(sid, abi.IOREQ_TYPE_TIMEOFFSET, 0, 8,
                                                  seconds & MASK64)
                if port is not None and status is bufring.Send.QUEUED:
                    ports.append(port)
        return ports


def _halves(regs: BackdoorRegs, ebx: int, ecx: int, edx: int, esi: int,
            edi: int) -> BackdoorRegs:
    """Registers come back into their 32-bit halves; the upper halves keep their value."""
    hi = ~MASK32 & MASK64
    return BackdoorRegs(regs.rax, (regs.rbx & hi) | ebx, (regs.rcx & hi) | ecx,
                        (regs.rdx & hi) | edx, (regs.rsi & hi) | esi, (regs.rdi & hi) | edi)
