"""The four register transports of a forwarded backdoor call, in the core (issue 6).

regs-page (v14, the default), ioreq-union (registers inside ioreq_t), gpr64 (a page of
64-bit GPRs) and three-exchange (a plain PIO request, registers fetched and stored through
the hypervisor): the bytes each puts in shared memory, what comes back to the vCPU, and
the rules a device model can break.
"""

from __future__ import annotations

import errno

import pytest

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import dmop as ops
from hvmport.core import slots
from hvmport.core.domain import IoStatus, PageKind, Route
from hvmport.core.vmport import BackdoorRegs
from tests.coretools import (
    EMULATOR,
    MAGIC,
    backdoor_in,
    call,
    create,
    enabled_server,
    make_domain,
    page,
    regs,
)

ATOMIC = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC
SHIFT = dmop.HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT
UNION = ATOMIC | dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION << SHIFT
GPR64 = ATOMIC | dmop.HVMPORT_VMPORT_TRANSPORT_GPR64 << SHIFT
THREE = ATOMIC | dmop.HVMPORT_VMPORT_TRANSPORT_THREE_EXCHANGE << SHIFT
STATUS = 40
HI = 0xA1A1A1A1_00000000
OTHERS = tuple(0x1000 + i for i in range(9))  # rbp, r8..r15


def wide_regs() -> BackdoorRegs:
    return BackdoorRegs(HI | MAGIC, HI | 0x11, HI | STATUS, HI | 0x5658, HI | 0x55, HI | 0x66,
                        OTHERS)


@pytest.mark.parametrize("transport", [0, 1, 2, 3])
def test_every_transport_is_accepted_and_higher_bits_are_not(transport: int) -> None:
    d, _ = make_domain()
    assert call(d, ops.create_ioreq_server(ATOMIC | transport << SHIFT)).rc == 0
    for bit in (6, 7):
        assert call(d, ops.create_ioreq_server(ATOMIC | 1 << bit)).rc == -errno.EINVAL


@pytest.mark.parametrize(("flags", "frames"), [(ATOMIC, 1), (UNION, 0), (GPR64, 1),
                                                (THREE, 0)])
def test_which_transports_have_a_registers_page(flags: int, frames: int) -> None:
    d, _ = make_domain()
    sid = create(d, flags)
    rc, view = d.acquire_resource(EMULATOR, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)
    assert (rc == 0) == bool(frames) and (view is not None) == bool(frames)
    if not frames:
        assert rc == -errno.ENOENT


def test_ioreq_union_carries_registers_inside_the_slot() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, UNION)
    res = backdoor_in(d, wide_regs(), size=1)
    assert res.status is IoStatus.WAIT and res.ioreq_type == abi.IOREQ_TYPE_VMWARE_PORT
    sent = abi.IoReq.unpack(bytes(page(d, sid, PageKind.IOREQ)[0:32]))
    # data = EAX | EDX << 32, addr = EBX | ECX << 32, count = ESI, size = EDI; the port
    # offset and access size in the padding. Upper halves never travel.
    assert (sent.data, sent.addr, sent.count, sent.size) == (
        0x5658 << 32 | MAGIC, STATUS << 32 | 0x11, 0x55, 0x66)
    assert abi.union_port_size(sent.pad0) == (0x5658, 1)
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    slots.respond_fields(p, 0, 0x22 << 32 | 0x21, 0x24 << 32 | 0x123456, 0x25, 0x26)
    done = d.poll(0, wide_regs())
    assert done.value == 0x56  # EAX, cut to the 1-byte access
    assert done.regs is not None
    assert (done.regs.rbx, done.regs.rcx, done.regs.rdx, done.regs.rsi, done.regs.rdi) == (
        HI | 0x21, HI | 0x22, HI | 0x24, HI | 0x25, HI | 0x26)


def test_ioreq_union_device_model_may_not_move_the_port() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, UNION)
    backdoor_in(d, regs(rcx=STATUS))
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    p[28] ^= 1  # _pad0: which port
    slots.respond_fields(p, 0, 0, 0, 0, 0)
    assert d.poll(0, regs()).status is IoStatus.CRASHED
    assert d.crash_info is not None and "pad0" in d.crash_info.reason


def test_gpr64_carries_every_register_but_rsp_in_64_bits() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, GPR64)
    res = backdoor_in(d, wide_regs())
    assert res.ioreq_type == abi.IOREQ_TYPE_VMWARE_PORT
    vp = page(d, sid, PageKind.VMPORT)
    entry = abi.unpack_gpr64(bytes(vp[0:128]))
    w = wide_regs()
    assert entry == (w.rax, w.rbx, w.rcx, w.rdx, w.rsi, w.rdi, *OTHERS)
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    back = (0, 0x7700000000000001, 2, 3, 4, 5, *(0x9000 + i for i in range(9)))
    vp[0:128] = abi.pack_gpr64(back)
    slots.respond(p, 0, 0xABCD)
    done = d.poll(0, w)
    assert done.value == 0xABCD and done.regs is not None
    # Whole 64-bit registers come back, RBP and R8..R15 included.
    assert done.regs.rbx == 0x7700000000000001 and done.regs.rdi == 5
    assert done.regs.others == back[6:]


def test_gpr64_entries_are_128_bytes_apart_and_spill_into_more_frames() -> None:
    d, _ = make_domain(vcpus=40)
    sid = enabled_server(d, GPR64)
    first = dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT
    rc, second = d.acquire_resource(EMULATOR, sid, first + 1)
    assert rc == 0 and second is not None
    assert d.acquire_resource(EMULATOR, sid, first + 2)[0] == -errno.EINVAL
    backdoor_in(d, wide_regs(), vcpu=33)
    # vCPU 33 is entry 1 of the second frame.
    assert abi.unpack_gpr64(bytes(second[128:256]))[1] == HI | 0x11
    assert not any(page(d, sid, PageKind.VMPORT))
    # One VMPORT_REGS_PFN cannot hold two frames: the gfn path has none to give.
    sid2 = create(d, GPR64)
    assert call(d, ops.get_ioreq_server_info(sid2)).rc == -errno.ENOMEM


def test_three_exchange_is_a_plain_pio_request_plus_a_fetch_and_a_store() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, THREE)
    res = backdoor_in(d, wide_regs())
    assert res.status is IoStatus.WAIT and res.ioreq_type == abi.IOREQ_TYPE_PIO
    sent = abi.IoReq.unpack(bytes(page(d, sid, PageKind.IOREQ)[0:32]))
    assert (sent.addr, sent.size, sent.type, sent.dir) == (0x5658, 4, 0, abi.IOREQ_READ)
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    rc, raw = d.vmport_get_regs(EMULATOR, 0)
    assert rc == 0
    assert int.from_bytes(raw[:4], "little") == MAGIC
    assert abi.VmwareRegs.unpack(raw, 4) == abi.VmwareRegs(0x55, 0x66, 0x11, STATUS, 0x5658)
    assert d.vmport_set_regs(EMULATOR, 0, abi.VmwareRegs(1, 2, 3, 4, 5).pack()) == 0
    slots.respond(p, 0, 0x77)
    done = d.poll(0, wide_regs())
    assert done.value == 0x77 and done.regs is not None
    assert (done.regs.rsi, done.regs.rdi, done.regs.rbx, done.regs.rcx, done.regs.rdx) == (
        HI | 1, HI | 2, HI | 3, HI | 4, HI | 5)
    # The call is over: nothing left to fetch or store.
    assert d.vmport_get_regs(EMULATOR, 0)[0] == -errno.ENOENT
    assert d.vmport_set_regs(EMULATOR, 0, bytes(20)) == -errno.ENOENT


def test_three_exchange_without_a_store_leaves_registers_alone() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, THREE)
    backdoor_in(d, wide_regs())
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    slots.respond(p, 0, 1)
    done = d.poll(0, wide_regs())
    assert done.value == 1 and done.regs is None


def test_three_exchange_calls_are_refused_outside_their_call() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, THREE, ports=((0x80, 0x80),))
    assert d.vmport_get_regs(EMULATOR, 0)[0] == -errno.ENOENT  # nothing in flight
    assert d.vmport_get_regs(EMULATOR, 9)[0] == -errno.EINVAL  # no such vCPU
    d.pio(0, 0x80, 1, False, 0, regs(), 0)
    assert d.pending[0] is not None
    assert d.vmport_get_regs(EMULATOR, 0)[0] == -errno.ENOENT  # not a backdoor call
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    slots.respond(p, 0, 0)
    assert d.poll(0, regs()).status is IoStatus.DONE
    backdoor_in(d, regs(rcx=STATUS))
    assert d.vmport_get_regs(EMULATOR + 5, 0)[0] == -errno.EPERM  # not its server
    assert d.vmport_set_regs(EMULATOR, 0, bytes(19)) == -errno.EINVAL  # not a vmware_regs


def test_exchange_calls_are_refused_for_other_transports() -> None:
    d, _ = make_domain()
    enabled_server(d)
    backdoor_in(d, regs(rcx=STATUS))
    assert d.vmport_get_regs(EMULATOR, 0)[0] == -errno.EINVAL


@pytest.mark.parametrize("flags", [UNION, THREE])
def test_pageless_transport_on_a_server_without_vmport_is_still_the_null_handler(
        flags: int) -> None:
    d, _ = make_domain()
    sid = enabled_server(d, flags | dmop.HVM_IOREQSRV_DISABLE_VMPORT)
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT, 1, 1)).rc == 0
    assert backdoor_in(d, regs(rcx=STATUS)).route is Route.NULL


def test_the_adapter_is_told_when_all_gprs_are_needed() -> None:
    d, _ = make_domain()
    assert not d.wants_all_gprs
    sid = create(d, GPR64)
    assert d.wants_all_gprs
    create(d, UNION)
    assert call(d, ops.destroy_ioreq_server(sid)).rc == 0
    assert not d.wants_all_gprs


def test_gpr64_without_the_other_registers_hands_none_back() -> None:
    # A vCPU that gave only the six backdoor registers gets only those back.
    d, _ = make_domain()
    sid = enabled_server(d, GPR64)
    backdoor_in(d, regs(rcx=STATUS))
    p = page(d, sid, PageKind.IOREQ)
    assert slots.take(p, 0) is not None
    slots.respond(p, 0, 0)
    done = d.poll(0, regs())
    assert done.regs is not None and done.regs.others == ()
