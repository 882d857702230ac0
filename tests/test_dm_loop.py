"""The device model's ioreq loop against requests a broken hypervisor could post (XSA-199)."""

from __future__ import annotations

import io
import mmap

import pytest

from hvmport.abi import ioreq as abi
from hvmport.core import slots
from hvmport.dm.devices.bus import PortBus
from hvmport.dm.devices.scratch import ScratchRegisters
from hvmport.dm.ioreq_loop import IoreqLoop


class FakeChannel:
    def __init__(self) -> None:
        self.fd = -1
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


def make_loop(vmport_calls: list[list[int]] | None = None) -> tuple[IoreqLoop, mmap.mmap,
                                                                    mmap.mmap, mmap.mmap]:
    page = mmap.mmap(-1, 4096)
    regs = mmap.mmap(-1, 4096)
    mem = mmap.mmap(-1, 1 << 16)
    bus = PortBus()
    bus.register(0x510, 0x51F, ScratchRegisters(0x510, 0x51F), "scratch")

    def vmport(r: list[int], is_write: bool, size: int) -> int:
        if vmport_calls is not None:
            vmport_calls.append(list(r))
        r[1] = 0xB0B0B0B0
        return 0x1234

    loop = IoreqLoop(1, page, [FakeChannel()], bus, vmport=vmport,  # type: ignore[list-item]
                     vmport_page=regs, guest_memory=mem, log=io.StringIO())
    return loop, page, regs, mem


def post(page: mmap.mmap, req: abi.IoReq) -> None:
    req.state = abi.STATE_IOREQ_READY
    page[0:32] = req.pack()


def answer(loop: IoreqLoop, page: mmap.mmap) -> abi.IoReq:
    assert loop.serve_once()
    got = abi.IoReq.unpack(page)
    assert got.state == abi.STATE_IORESP_READY
    return got


@pytest.mark.parametrize("req", [
    abi.IoReq(addr=0x10510, size=1, dir=abi.IOREQ_READ),  # port beyond 16 bits
    abi.IoReq(addr=0x510, size=3, dir=abi.IOREQ_READ),  # odd size
    abi.IoReq(addr=0x510, size=1, dir=abi.IOREQ_READ, type=5),  # unknown type
    abi.IoReq(addr=0x510, size=1, count=4, dir=abi.IOREQ_READ, data_is_ptr=True,
              data=(1 << 16) - 2),  # buffer runs off guest memory
    abi.IoReq(addr=0x510, size=1, count=4, dir=abi.IOREQ_READ, data_is_ptr=True, df=True,
              data=1),  # DF: the buffer runs below 0
])
def test_bad_requests_are_rejected_not_used(req: abi.IoReq) -> None:
    loop, page, _, mem = make_loop()
    before = bytes(mem)
    post(page, req)
    got = answer(loop, page)
    assert loop.stats.rejected == 1
    assert bytes(mem) == before
    if not req.data_is_ptr:
        assert got.data == slots.size_mask(req.size) if req.size in (1, 2, 4, 8) else True


def test_pio_and_string_pio() -> None:
    loop, page, _, mem = make_loop()
    post(page, abi.IoReq(addr=0x512, size=2, data=0xBEEF, dir=abi.IOREQ_WRITE))
    answer(loop, page)
    slots.read_state(page, 0)
    page[30] = 0
    post(page, abi.IoReq(addr=0x512, size=2, dir=abi.IOREQ_READ))
    assert answer(loop, page).data == 0xBEEF
    # REP INSB with DF=1 fills guest memory downwards from the given address.
    post(page, abi.IoReq(addr=0x512, size=1, count=2, dir=abi.IOREQ_READ, data_is_ptr=True,
                         df=True, data=0x101))
    answer(loop, page)
    assert mem[0x100:0x102] == bytes([0xEF, 0xEF])
    assert loop.stats.rejected == 0


def test_vmware_port_uses_data_for_eax_and_writes_back_registers() -> None:
    calls: list[list[int]] = []
    loop, page, regs, _ = make_loop(calls)
    regs[0:20] = abi.VmwareRegs(esi=5, edi=6, ebx=2, ecx=40, edx=0x5658).pack()
    post(page, abi.IoReq(addr=0x5658, size=4, dir=abi.IOREQ_READ,
                         type=abi.IOREQ_TYPE_VMWARE_PORT, data=0xFFFFFFFF_564D5868))
    assert answer(loop, page).data == 0x1234
    assert calls == [[0x564D5868, 2, 40, 0x5658, 5, 6]]  # EAX: the low 32 bits of data
    assert abi.VmwareRegs.unpack(regs) == abi.VmwareRegs(5, 6, 0xB0B0B0B0, 40, 0x5658)


def test_vmware_port_type_3_only_when_asked() -> None:
    loop, page, _, _ = make_loop()
    post(page, abi.IoReq(addr=0x5658, size=4, dir=abi.IOREQ_READ,
                         type=abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT))
    answer(loop, page)
    assert loop.stats.rejected == 1 and loop.stats.vmport == 0


def test_broken_ring_is_abandoned_not_fatal() -> None:
    loop, page, _, _ = make_loop()
    ring = mmap.mmap(-1, 4096)
    ring[0:8] = (0).to_bytes(4, "little") + (600).to_bytes(4, "little")
    loop2 = IoreqLoop(1, page, loop.channels, loop.devices, buf_page=ring, log=io.StringIO())
    loop2.serve_once()
    loop2.serve_once()
    assert loop2.stats.rejected == 1


def test_copy_requests_reach_mmio_devices_both_ways() -> None:
    from hvmport.dm.devices.mmio import MmioBus
    from hvmport.dm.devices.scratch import ScratchRegisters

    loop, page, _, mem = make_loop()
    bus = MmioBus()
    bus.register(0xFE000000, 0xFE000FFF, ScratchRegisters(0xFE000000, 0xFE000FFF))
    loop.memory_devices = bus
    post(page, abi.IoReq(addr=0xFE000008, size=8, type=abi.IOREQ_TYPE_COPY,
                         dir=abi.IOREQ_WRITE, data=0x1122334455667788))
    answer(loop, page)
    post(page, abi.IoReq(addr=0xFE000008, size=4, type=abi.IOREQ_TYPE_COPY,
                         dir=abi.IOREQ_READ))
    assert answer(loop, page).data == 0x55667788
    # REP MOVSD out of the device into guest memory, DF = 1: both addresses step down.
    post(page, abi.IoReq(addr=0xFE00000C, size=4, count=2, type=abi.IOREQ_TYPE_COPY,
                         dir=abi.IOREQ_READ, data_is_ptr=True, df=True, data=0x104))
    answer(loop, page)
    assert mem[0x100:0x108] == (0x1122334455667788).to_bytes(8, "little")
    # Unclaimed MMIO reads all ones.
    post(page, abi.IoReq(addr=0xFD000000, size=2, type=abi.IOREQ_TYPE_COPY,
                         dir=abi.IOREQ_READ))
    assert answer(loop, page).data == 0xFFFF
    assert loop.stats.rejected == 0


def test_mmio_bus_refuses_overlaps() -> None:
    from hvmport.dm.devices.mmio import MmioBus
    from hvmport.dm.devices.scratch import ScratchRegisters
    from hvmport.errors import ConfigError

    bus = MmioBus()
    bus.register(0x1000, 0x1FFF, ScratchRegisters(0x1000, 0x1FFF))
    with pytest.raises(ConfigError):
        bus.register(0x1800, 0x2800, ScratchRegisters(0x1800, 0x2800))
    with pytest.raises(ConfigError):
        bus.register(0x0800, 0x1000, ScratchRegisters(0x0800, 0x1000))
    bus.register(0x2000, 0x2FFF, ScratchRegisters(0x2000, 0x2FFF))
    assert bus.read(0x1FFE, 4) == 0xFFFFFFFF  # straddles two devices: nobody's


# -- the register transports (issue 6) ------------------------------------------------------

def test_ioreq_union_answer_carries_registers_in_the_slot() -> None:
    from hvmport.abi import dm_op as dmop

    calls: list[list[int]] = []
    loop, page, regs_page, _ = make_loop(calls)
    loop.transport = dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION
    u = abi.UnionRegs(0x564D5868, 0x11, 40, 0x5658, 0x55, 0x66)
    addr, data, count, size = u.fields()
    post(page, abi.IoReq(addr=addr, data=data, count=count, size=size,
                         type=abi.IOREQ_TYPE_VMWARE_PORT, dir=abi.IOREQ_READ,
                         pad0=abi.union_access(0x5658, 4)))
    got = answer(loop, page)
    assert calls == [[0x564D5868, 0x11, 40, 0x5658, 0x55, 0x66]]
    back = abi.UnionRegs.from_fields(got.addr, got.data, got.count, got.size)
    assert back == abi.UnionRegs(0x1234, 0xB0B0B0B0, 40, 0x5658, 0x55, 0x66)
    assert regs_page[:] == bytes(4096)  # no page in this transport


@pytest.mark.parametrize("pad0", [abi.union_access(0x5660, 4), abi.union_access(0x5658, 3)])
def test_ioreq_union_with_a_bad_port_or_size_is_rejected(pad0: int) -> None:
    from hvmport.abi import dm_op as dmop

    calls: list[list[int]] = []
    loop, page, _, _ = make_loop(calls)
    loop.transport = dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION
    post(page, abi.IoReq(addr=1, data=2, count=3, size=4, type=abi.IOREQ_TYPE_VMWARE_PORT,
                         dir=abi.IOREQ_READ, pad0=pad0))
    got = answer(loop, page)
    assert loop.stats.rejected == 1 and calls == []
    assert (got.addr, got.count, got.size) == (1, 3, 4) and got.data & 0xFFFFFFFF == 0xFFFFFFFF


def test_gpr64_keeps_upper_halves_and_other_registers() -> None:
    from hvmport.abi import dm_op as dmop

    loop, page, regs_page, _ = make_loop()
    loop.transport = dmop.HVMPORT_VMPORT_TRANSPORT_GPR64
    wide = tuple(0xAB00000000000000 | i for i in range(15))
    regs_page[0:128] = abi.pack_gpr64(wide)
    post(page, abi.IoReq(addr=0x5658, size=4, type=abi.IOREQ_TYPE_VMWARE_PORT,
                         dir=abi.IOREQ_READ, data=0x564D5868))
    assert answer(loop, page).data == 0x1234
    back = abi.unpack_gpr64(regs_page, 0)
    assert back[1] == 0xAB000000B0B0B0B0  # EBX changed, its upper half kept
    assert back[:1] + back[2:] == wide[:1] + wide[2:]


class FakeExchange:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.stored: list[abi.VmwareRegs] = []

    def get(self, vcpu: int) -> tuple[int, abi.VmwareRegs]:
        from hvmport.errors import DmOpError

        if self.refuse:
            raise DmOpError("vmport_get_regs", 2)
        return 0x564D5868, abi.VmwareRegs(5, 6, 1, 40, 0x5658)

    def set(self, vcpu: int, regs: abi.VmwareRegs) -> None:
        self.stored.append(regs)


def test_three_exchange_fetches_runs_and_stores() -> None:
    calls: list[list[int]] = []
    loop, page, _, _ = make_loop(calls)
    loop.exchange = ex = FakeExchange()
    post(page, abi.IoReq(addr=0x5658, size=4, dir=abi.IOREQ_READ))
    assert answer(loop, page).data == 0x1234
    assert calls == [[0x564D5868, 1, 40, 0x5658, 5, 6]]
    assert ex.stored == [abi.VmwareRegs(5, 6, 0xB0B0B0B0, 40, 0x5658)]


def test_three_exchange_refused_fetch_is_a_plain_port_access() -> None:
    calls: list[list[int]] = []
    loop, page, _, _ = make_loop(calls)
    loop.exchange = FakeExchange(refuse=True)
    post(page, abi.IoReq(addr=0x5659, size=1, dir=abi.IOREQ_READ))
    assert answer(loop, page).data == 0xFF  # nobody's port on this bus
    assert calls == []
