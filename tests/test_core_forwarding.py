"""A guest access travelling to an ioreq server and back, and every way a hostile device
model can break the slot protocol."""

from __future__ import annotations

import pytest

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.abi import vmware as vm
from hvmport.core import dmop as ops
from hvmport.core import slots
from hvmport.core.domain import Domain, IoStatus, PageKind, Route
from tests.coretools import (
    EMULATOR,
    MAGIC,
    backdoor_in,
    call,
    create,
    dm_answer,
    enabled_server,
    make_domain,
    page,
    regs,
)

ATOMIC = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC
NOVMPORT = dmop.HVM_IOREQSRV_DISABLE_VMPORT
HI = 0xCAFE0000_00000000
STATUS = vm.BDOOR_CMD_ABSPOINTER_STATUS


def test_hypervisor_answers_getversion_itself() -> None:
    d, _ = make_domain()
    enabled_server(d)
    res = backdoor_in(d, regs(rcx=vm.BDOOR_CMD_GETVERSION))
    assert (res.status, res.route, res.value) == (IoStatus.DONE, Route.INTERNAL, 6)
    assert res.regs is not None and res.regs.rbx == MAGIC


def test_wrong_magic_and_wrong_port_are_never_forwarded() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, ports=((0x5658, 0x565B),))
    res = backdoor_in(d, regs(rax=0x1234, rcx=STATUS))
    assert (res.route, res.value, res.regs) == (Route.IGNORED, 0xFFFFFFFF, None)
    res = backdoor_in(d, regs(rcx=STATUS), port=0x5659, size=1)
    assert (res.route, res.value) == (Route.IGNORED, 0xFF)
    assert slots.read_state(page(d, sid, PageKind.IOREQ), 0) == abi.STATE_IOREQ_NONE


def test_four_bytes_at_5659_is_plain_pio() -> None:
    d, _ = make_domain()
    assert backdoor_in(d, regs(rcx=vm.BDOOR_CMD_GETVERSION), port=0x5659).route is Route.NULL
    sid = enabled_server(d, ATOMIC | NOVMPORT, ports=((0x5659, 0x565C),))
    res = backdoor_in(d, regs(rcx=vm.BDOOR_CMD_GETVERSION), port=0x5659)
    assert res.status is IoStatus.WAIT and res.ioreq_type == abi.IOREQ_TYPE_PIO
    assert dm_answer(d, sid, 0, 0x1234).type == abi.IOREQ_TYPE_PIO
    done = d.poll(0, regs())
    assert done.value == 0x1234 and done.regs is None


def test_vmware_port_round_trip_in() -> None:
    d, _ = make_domain()
    sid = enabled_server(d)
    r = regs(rax=HI | MAGIC, rbx=HI | 1, rcx=HI | STATUS, rdx=HI | 0x5658, rsi=HI | 2,
             rdi=HI | 3)
    res = backdoor_in(d, r, vcpu=1)
    assert res.status is IoStatus.WAIT
    assert res.notify == d.servers[sid].vcpu_ports[1]
    vp = page(d, sid, PageKind.VMPORT)
    assert abi.VmwareRegs.unpack(vp, 20) == abi.VmwareRegs(2, 3, 1, STATUS, 0x5658)
    assert d.poll(1, r).status is IoStatus.WAIT  # READY
    req = dm_answer(d, sid, 1, 0x0000_0004, abi.VmwareRegs(0xE51, 0xED1, 0xEB1, 0xEC1,
                                                           0xED0))
    assert req.type == abi.IOREQ_TYPE_VMWARE_PORT
    assert req.data == HI | MAGIC  # the full RAX travels in data
    assert (req.addr, req.size, req.dir, req.count) == (0x5658, 4, abi.IOREQ_READ, 1)
    done = d.poll(1, r)
    assert done.status is IoStatus.DONE and done.value == 4
    assert done.regs is not None
    # Back into the 32-bit halves only; upper halves kept.
    assert (done.regs.rbx, done.regs.rcx, done.regs.rdx, done.regs.rsi, done.regs.rdi) == (
        HI | 0xEB1, HI | 0xEC1, HI | 0xED0, HI | 0xE51, HI | 0xED1)
    assert slots.read_state(page(d, sid, PageKind.IOREQ), 1) == abi.STATE_IOREQ_NONE


def test_vmware_port_out_needs_completion_and_returns_registers() -> None:
    d, _ = make_domain()
    sid = enabled_server(d)
    r = regs(rcx=STATUS, rbx=9)
    res = backdoor_in(d, r, is_write=True)
    assert res.status is IoStatus.WAIT
    req = dm_answer(d, sid, 0, 0x77, abi.VmwareRegs(0, 0, 0x42, STATUS, 0x5658))
    assert req.dir == abi.IOREQ_WRITE and req.data == MAGIC
    done = d.poll(0, r)
    assert done.value is None  # EAX is not written for OUT
    assert done.regs is not None and done.regs.rbx == 0x42


def test_qemu_compatible_server_gets_type_3() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, ATOMIC | dmop.HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE)
    res = backdoor_in(d, regs(rcx=STATUS))
    assert res.ioreq_type == abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT
    assert dm_answer(d, sid, 0, 5, abi.VmwareRegs(ebx=7)).type == 3
    done = d.poll(0, regs())
    assert done.value == 5 and done.regs is not None and done.regs.rbx == 7


@pytest.mark.parametrize("size", [1, 2])
def test_narrow_vmware_port_access(size: int) -> None:
    d, _ = make_domain()
    sid = enabled_server(d)
    res = backdoor_in(d, regs(rcx=STATUS), size=size)
    assert res.status is IoStatus.WAIT
    assert dm_answer(d, sid, 0, 0x12345678).size == size
    # Data wider than the access is masked.
    assert d.poll(0, regs()).value == 0x12345678 & ((1 << (8 * size)) - 1)


def test_no_server_means_null_handler() -> None:
    d, _ = make_domain()
    res = backdoor_in(d, regs(rcx=STATUS), size=2)
    assert (res.status, res.route, res.value) == (IoStatus.DONE, Route.NULL, 0xFFFF)
    assert d.pio(0, 0x80, 1, True, 0x12, regs(), 0).route is Route.NULL


def test_server_without_regs_page_is_null_even_if_it_claims_one_one() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, ATOMIC | NOVMPORT)
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT, 1, 1)).rc == 0
    assert backdoor_in(d, regs(rcx=STATUS)).route is Route.NULL


def test_unmapping_one_one_switches_vmport_routing_off() -> None:
    d, _ = make_domain()
    sid = enabled_server(d)
    assert call(d, ops.unmap_io_range(sid, dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT, 1, 1)).rc == 0
    assert backdoor_in(d, regs(rcx=STATUS)).route is Route.NULL
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT, 1, 1)).rc == 0
    assert backdoor_in(d, regs(rcx=STATUS)).status is IoStatus.WAIT


def test_registers_come_back_from_the_server_that_handled_it() -> None:
    # Review point R10 (and R5): v14 completed with get_vmport_regs_any(NULL), the first
    # regs page over all servers from id 7 down, not the handling server's.
    d, _ = make_domain()
    a = create(d)
    b = create(d)
    for sid in (a, b):
        d.acquire_resource(EMULATOR, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)
        assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    assert call(d, ops.unmap_io_range(b, dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT, 1, 1)).rc == 0
    page(d, b, PageKind.VMPORT)[0:20] = abi.VmwareRegs(6, 6, 6, 6, 6).pack()
    res = backdoor_in(d, regs(rcx=STATUS))
    assert res.server == a
    dm_answer(d, a, 0, 1, abi.VmwareRegs(1, 2, 3, 4, 5))
    done = d.poll(0, regs())
    assert done.regs is not None
    assert (done.regs.rsi, done.regs.rdi, done.regs.rbx, done.regs.rcx, done.regs.rdx) == (
        1, 2, 3, 4, 5)


def test_string_access_to_the_backdoor_is_not_a_backdoor_call() -> None:
    # Review point R4: REP INS/OUTS are excluded from VMWARE_PORT; we also never run
    # backdoor commands from them in the hypervisor.
    d, _ = make_domain()
    res = d.pio(0, 0x5658, 1, False, 0, regs(rcx=vm.BDOOR_CMD_GETVERSION), 0, string=True,
                count=4)
    assert (res.route, res.buffer, res.regs) == (Route.NULL, b"\xff" * 4, None)
    sid = enabled_server(d, ATOMIC | NOVMPORT, ports=((0x5659, 0x5659),))
    res = d.pio(0, 0x5659, 1, True, 0, regs(), 0, string=True, count=16, buffer_gpa=0x2000)
    assert res.status is IoStatus.WAIT
    req = dm_answer(d, sid, 0, None)
    assert (req.data_is_ptr, req.data, req.count, req.type) == (True, 0x2000, 16, 0)
    assert d.poll(0, regs()).value is None


def test_pio_write_waits_for_the_device_model() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, ports=((0x3F8, 0x3FF),))
    res = d.pio(0, 0x3F8, 1, True, 0x141, regs(), 0)
    assert res.status is IoStatus.WAIT
    req = dm_answer(d, sid, 0, 0xFFFF)
    assert req.data == 0x41  # masked to the access size on the way out
    done = d.poll(0, regs())
    assert done.status is IoStatus.DONE and done.value is None


def test_mmio_round_trip() -> None:
    d, _ = make_domain()
    sid = create(d)
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_MEMORY, 0xFED00000,
                                    0xFED00FFF)).rc == 0
    assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    assert d.mmio(0, 0xFED00010, 8, False, 0).status is IoStatus.WAIT
    assert dm_answer(d, sid, 0, 0x1122334455667788).type == abi.IOREQ_TYPE_COPY
    assert d.poll(0, regs()).value == 0x1122334455667788
    assert d.mmio(0, 0xFEE00000, 4, False, 0).value == 0xFFFFFFFF


def test_vcpus_have_separate_slots() -> None:
    d, _ = make_domain(vcpus=2)
    sid = enabled_server(d)
    backdoor_in(d, regs(rcx=STATUS, rbx=100), vcpu=0)
    backdoor_in(d, regs(rcx=STATUS, rbx=200), vcpu=1)
    dm_answer(d, sid, 1, 2, abi.VmwareRegs(ebx=201))
    dm_answer(d, sid, 0, 1, abi.VmwareRegs(ebx=101))
    one = d.poll(1, regs(rbx=200))
    zero = d.poll(0, regs(rbx=100))
    assert (zero.value, one.value) == (1, 2)
    assert zero.regs is not None and one.regs is not None
    assert (zero.regs.rbx, one.regs.rbx) == (101, 201)


# ------------------------------------------------------------------ hostile device model

def _forwarded() -> tuple[Domain, int]:
    d, _ = make_domain()
    sid = enabled_server(d)
    assert backdoor_in(d, regs(rcx=STATUS)).status is IoStatus.WAIT
    return d, sid


def _state(d: Domain, sid: int, state: int) -> None:
    p = page(d, sid, PageKind.IOREQ)
    p[30] = (p[30] & 0xF0) | state


def test_state_moving_backwards_crashes_the_domain() -> None:
    # XSA-262: forward-only.
    d, sid = _forwarded()
    _state(d, sid, abi.STATE_IOREQ_INPROCESS)
    assert d.poll(0, regs()).status is IoStatus.WAIT
    _state(d, sid, abi.STATE_IOREQ_READY)
    res = d.poll(0, regs())
    assert res.status is IoStatus.CRASHED and "backwards" in res.reason
    assert d.crash_info.party == "device model"


def test_unknown_state_crashes_the_domain() -> None:
    d, sid = _forwarded()
    _state(d, sid, 7)
    res = d.poll(0, regs())
    assert res.status is IoStatus.CRASHED and "unknown ioreq state 7" in res.reason


@pytest.mark.parametrize(("offset", "field"), [
    (0, "addr"), (20, "size"), (16, "count"), (31, "type"), (24, "vp_eport"),
])
def test_device_model_rewriting_request_fields_crashes(offset: int, field: str) -> None:
    d, sid = _forwarded()
    p = page(d, sid, PageKind.IOREQ)
    p[offset] ^= 0x01
    _state(d, sid, abi.STATE_IORESP_READY)
    res = d.poll(0, regs())
    assert res.status is IoStatus.CRASHED and field in res.reason


def test_dir_flip_crashes() -> None:
    d, sid = _forwarded()
    p = page(d, sid, PageKind.IOREQ)
    p[30] = abi.STATE_IORESP_READY  # dir bit cleared
    assert d.poll(0, regs()).status is IoStatus.CRASHED


def test_state_back_to_none_reads_all_ones() -> None:
    # The emulator died mid-request: Xen completes with all ones rather than hang.
    d, sid = _forwarded()
    _state(d, sid, abi.STATE_IOREQ_NONE)
    res = d.poll(0, regs())
    assert res.status is IoStatus.DONE and res.value == 0xFFFFFFFF and res.regs is None


def test_busy_slot_or_changed_eport_at_send_crashes() -> None:
    d, _ = make_domain()
    sid = enabled_server(d)
    _state(d, sid, abi.STATE_IOREQ_INPROCESS)
    res = backdoor_in(d, regs(rcx=STATUS))
    assert res.status is IoStatus.CRASHED and "bad IO state" in res.reason
    d2, _ = make_domain()
    sid2 = enabled_server(d2)
    page(d2, sid2, PageKind.IOREQ)[24] ^= 0xFF
    res = backdoor_in(d2, regs(rcx=STATUS))
    assert res.status is IoStatus.CRASHED and "vp_eport" in res.reason


def test_crashed_domain_stays_crashed() -> None:
    d, sid = _forwarded()
    _state(d, sid, 9)
    first = d.poll(0, regs())
    assert first.status is IoStatus.CRASHED
    reason = d.crash_info.reason
    for _ in range(3):
        res = backdoor_in(d, regs(rcx=vm.BDOOR_CMD_GETVERSION))
        assert res.status is IoStatus.CRASHED and res.reason == reason
    d.crash("something else")
    assert d.crash_info.reason == reason


def test_reissue_must_match() -> None:
    d, sid = _forwarded()
    dm_answer(d, sid, 0, 1)
    res = d.poll(0, regs(), reissue=(0x5658, 2, False))
    assert res.status is IoStatus.CRASHED and "re-issued" in res.reason


def test_destroy_under_a_request_completes_with_all_ones() -> None:
    d, sid = _forwarded()
    assert call(d, ops.destroy_ioreq_server(sid)).rc == 0
    res = d.poll(0, regs())
    assert res.status is IoStatus.DONE and res.value == 0xFFFFFFFF
