"""Helpers for driving the sans-io core from tests: a domain as the builder makes it, and
a device model reduced to the bytes it would pass."""

from __future__ import annotations

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import dmop as ops
from hvmport.core import slots
from hvmport.core.clock import FixedClock
from hvmport.core.domain import Domain, IoResult, PageKind
from hvmport.core.pages import MemoryPages
from hvmport.core.vmport import BackdoorRegs

EMULATOR = 0
POOL_BASE = abi.special_pfn(0) - 8
MAGIC = 0x564D5868


def make_domain(vcpus: int = 2, *, vmware_port: bool = True, hwver: int = 7,
                tsc_khz: int = 2_500_000, pool_pages: int = 8) -> tuple[Domain, MemoryPages]:
    """A domain with the v14 special-page layout and an ioreq-server gfn pool below it."""
    special = {abi.special_pfn(i) for i in range(abi.X86_HVM_NR_SPECIAL_PAGES)}
    pool = {POOL_BASE + i for i in range(pool_pages)}
    pages = MemoryPages(special | pool | set(range(256)))
    d = Domain(1, vcpus, pages, FixedClock(), vmware_port=vmware_port, vmware_hwver=hwver,
               tsc_khz=tsc_khz)
    assert d.set_param(abi.HVM_PARAM_IOREQ_PFN, abi.special_pfn(abi.SPECIALPAGE_IOREQ)) == 0
    assert d.set_param(abi.HVM_PARAM_BUFIOREQ_PFN,
                       abi.special_pfn(abi.SPECIALPAGE_BUFIOREQ)) == 0
    assert d.set_param(abi.HVM_PARAM_VMPORT_REGS_PFN,
                       abi.special_pfn(abi.SPECIALPAGE_VMPORT_REGS)) == 0
    if pool_pages:
        assert d.set_param(abi.HVM_PARAM_IOREQ_SERVER_PFN, POOL_BASE) == 0
        assert d.set_param(abi.HVM_PARAM_NR_IOREQ_SERVER_PAGES, pool_pages) == 0
    return d, pages


def call(d: Domain, buf: bytes, caller: int = EMULATOR) -> ops.DmOpResult:
    return ops.apply(d, caller, buf)


def create(d: Domain, flags: int = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC,
           caller: int = EMULATOR) -> int:
    r = call(d, ops.create_ioreq_server(flags), caller)
    assert r.rc == 0, r.rc
    return dmop.CREATE.unpack_from(r.out, 8)[2]


def enabled_server(d: Domain, flags: int = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC,
                   ports: tuple[tuple[int, int], ...] = ()) -> int:
    sid = create(d, flags)
    for start, end in ports:
        assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_PORT, start, end)).rc == 0
    assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    return sid


def page(d: Domain, sid: int, kind: PageKind) -> memoryview:
    return d.servers[sid].pages[kind].view


def regs(rax: int = MAGIC, rbx: int = 0, rcx: int = 0, rdx: int = 0x5658, rsi: int = 0,
         rdi: int = 0) -> BackdoorRegs:
    return BackdoorRegs(rax, rbx, rcx, rdx, rsi, rdi)


def backdoor_in(d: Domain, r: BackdoorRegs, vcpu: int = 0, size: int = 4, cpl: int = 0,
                port: int = 0x5658, is_write: bool = False) -> IoResult:
    return d.pio(vcpu, port, size, is_write, r.rax if is_write else 0, r, cpl)


def dm_answer(d: Domain, sid: int, vcpu: int, data: int | None,
              vmregs: abi.VmwareRegs | None = None) -> abi.IoReq:
    """An honest device model: take the request, optionally set registers, respond."""
    p = page(d, sid, PageKind.IOREQ)
    req = slots.take(p, vcpu)
    assert req is not None
    if vmregs is not None:
        vp = page(d, sid, PageKind.VMPORT)
        off = vcpu * abi.VMWARE_REGS_SIZE
        vp[off:off + abi.VMWARE_REGS_SIZE] = vmregs.pack()
    slots.respond(p, vcpu, data)
    return req
