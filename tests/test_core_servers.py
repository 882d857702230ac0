"""ioreq servers through dm_op bytes: lifecycle, limits, errors, pages, selection."""

from __future__ import annotations

import errno

import pytest

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import dmop as ops
from hvmport.core.domain import IoStatus, PageKind, Route
from tests.coretools import (
    EMULATOR,
    POOL_BASE,
    call,
    create,
    dm_answer,
    enabled_server,
    make_domain,
    page,
    regs,
)

ATOMIC = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC
OFF = dmop.HVM_IOREQSRV_BUFIOREQ_OFF
NOVMPORT = dmop.HVM_IOREQSRV_DISABLE_VMPORT
PORT = dmop.XEN_DMOP_IO_RANGE_PORT


# ------------------------------------------------------------------ dm_op decoding

def test_short_buffer_is_efault() -> None:
    d, _ = make_domain()
    assert call(d, b"\x01\0\0").rc == -errno.EFAULT
    # Header present, member cut short.
    assert call(d, ops.create_ioreq_server(0)[:10]).rc == -errno.EFAULT


def test_unknown_op_is_eopnotsupp() -> None:
    d, _ = make_domain()
    for op in (0, 7, 15, 99, 0xFFFFFFFF):
        assert call(d, dmop.encode(op, b"")).rc == -errno.EOPNOTSUPP


def test_nonzero_pads_are_einval() -> None:
    d, _ = make_domain()
    assert call(d, dmop.encode(dmop.XEN_DMOP_create_ioreq_server, b"", pad=1)).rc == -errno.EINVAL
    assert call(d, dmop.encode(dmop.XEN_DMOP_create_ioreq_server,
                               dmop.CREATE.pack(0, b"\0\x01\0", 0))).rc == -errno.EINVAL
    sid = create(d)
    assert call(d, dmop.encode(dmop.XEN_DMOP_map_io_range_to_ioreq_server,
                               dmop.RANGE.pack(sid, 1, PORT, 1, 2))).rc == -errno.EINVAL
    assert call(d, dmop.encode(dmop.XEN_DMOP_set_ioreq_server_state,
                               dmop.SET_STATE.pack(sid, 1, 1))).rc == -errno.EINVAL
    assert call(d, dmop.encode(dmop.XEN_DMOP_destroy_ioreq_server,
                               dmop.DESTROY.pack(sid, 1))).rc == -errno.EINVAL
    assert call(d, ops.get_ioreq_server_info(sid, flags=2)).rc == -errno.EINVAL
    assert d.servers[sid].enabled is False


def test_results_are_encoded_back_into_the_struct() -> None:
    d, _ = make_domain()
    out = call(d, ops.create_ioreq_server(ATOMIC)).out
    assert len(out) == dmop.XEN_DM_OP_SIZE
    assert dmop.HEADER.unpack_from(out) == (dmop.XEN_DMOP_create_ioreq_server, 0)
    r = call(d, ops.get_ioreq_server_info(0))
    sid, _flags, port, ioreq_gfn, buf_gfn = dmop.GET_INFO.unpack_from(r.out, 8)
    assert r.rc == 0 and sid == 0 and port > 0
    assert {ioreq_gfn, buf_gfn} == {POOL_BASE, POOL_BASE + 1}


# ------------------------------------------------------------------ create

# Bits 3 (QEMU's type 3) and 4-5 (the register transport) are hvmport's; 6-7 are unknown.
@pytest.mark.parametrize("flags", [0x40, 0x80, 0xFF, 0x58, 0x7A])
def test_create_refuses_unknown_flag_bits(flags: int) -> None:
    d, _ = make_domain()
    assert call(d, ops.create_ioreq_server(flags)).rc == -errno.EINVAL
    assert not d.servers


def test_create_refuses_bufioreq_above_atomic() -> None:
    d, _ = make_domain()
    assert call(d, ops.create_ioreq_server(3)).rc == -errno.EINVAL
    assert call(d, ops.create_ioreq_server(3 | NOVMPORT)).rc == -errno.EINVAL


def test_at_most_eight_servers_lowest_free_id() -> None:
    d, _ = make_domain()
    assert [create(d) for _ in range(8)] == list(range(8))
    assert call(d, ops.create_ioreq_server(0)).rc == -errno.ENOSPC
    assert call(d, ops.destroy_ioreq_server(3)).rc == 0
    assert create(d) == 3


def test_vmport_enabled_needs_domain_flag_and_no_disable_bit() -> None:
    d, _ = make_domain()
    first, second = create(d), create(d, ATOMIC | NOVMPORT)
    assert d.servers[first].vmport_enabled
    assert d.servers[first].ranges[dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT].contains_point(1)
    assert not d.servers[second].vmport_enabled
    assert len(d.servers[second].ranges[dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT]) == 0
    d2, _ = make_domain(vmware_port=False)
    assert not d2.servers.get(create(d2)).vmport_enabled  # type: ignore[union-attr]


def test_event_channels_per_vcpu_and_buffered() -> None:
    d, _ = make_domain(vcpus=3)
    s = d.servers[create(d)]
    assert len(set(s.vcpu_ports)) == 3 and s.buf_port not in s.vcpu_ports
    assert d.servers[create(d, OFF)].buf_port == 0


# ------------------------------------------------------------------ ownership

def test_only_the_emulator_may_touch_its_server() -> None:
    d, _ = make_domain()
    sid = create(d)
    other = EMULATOR + 1
    for buf in (ops.get_ioreq_server_info(sid), ops.map_io_range(sid, PORT, 1, 2),
                ops.unmap_io_range(sid, PORT, 1, 2), ops.set_ioreq_server_state(sid, True),
                ops.destroy_ioreq_server(sid)):
        assert call(d, buf, caller=other).rc == -errno.EPERM
    assert d.acquire_resource(other, sid, 1) == (-errno.EPERM, None)
    assert sid in d.servers and not d.servers[sid].enabled


def test_missing_server_is_enoent() -> None:
    d, _ = make_domain()
    for buf in (ops.get_ioreq_server_info(5), ops.map_io_range(5, PORT, 1, 2),
                ops.set_ioreq_server_state(5, True), ops.destroy_ioreq_server(5)):
        assert call(d, buf).rc == -errno.ENOENT


# ------------------------------------------------------------------ ranges

def test_map_range_errors() -> None:
    d, _ = make_domain()
    sid = create(d)
    assert call(d, ops.map_io_range(sid, PORT, 10, 9)).rc == -errno.EINVAL  # XSA-238
    assert call(d, ops.map_io_range(sid, 3, 1, 2)).rc == -errno.EINVAL
    assert call(d, ops.map_io_range(sid, 8, 1, 1)).rc == -errno.EINVAL
    assert call(d, ops.map_io_range(sid, PORT, 0x60, 0x64)).rc == 0
    assert call(d, ops.map_io_range(sid, PORT, 0x64, 0x70)).rc == -errno.EEXIST
    assert call(d, ops.unmap_io_range(sid, PORT, 0x60, 0x70)).rc == -errno.ENOENT
    assert call(d, ops.unmap_io_range(sid, PORT, 0x61, 0x62)).rc == 0
    assert d.servers[sid].ranges[PORT].ranges() == [(0x60, 0x60), (0x63, 0x64)]


def test_range_limit_256() -> None:
    d, _ = make_domain()
    sid = create(d)
    for i in range(256):
        assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_MEMORY,
                                        i * 0x1000, i * 0x1000 + 1)).rc == 0
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_MEMORY, 1 << 40,
                                    1 << 40)).rc == -errno.ENOSPC


def test_special_ranges_hold_only_one_one() -> None:
    d, _ = make_domain()
    sid = create(d, ATOMIC | NOVMPORT)
    vmp = dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT
    assert call(d, ops.map_io_range(sid, vmp, 2, 2)).rc == -errno.EINVAL
    assert call(d, ops.map_io_range(sid, vmp, 1, 1)).rc == 0
    assert call(d, ops.map_io_range(sid, vmp, 1, 1)).rc == -errno.EEXIST
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_TIMEOFFSET, 0, 1)).rc \
        == -errno.EINVAL
    assert call(d, ops.unmap_io_range(sid, vmp, 1, 1)).rc == 0


# ------------------------------------------------------------------ params and gfns

def test_params_set_once_and_hidden_from_the_guest() -> None:
    d, _ = make_domain()
    assert d.set_param(abi.HVM_PARAM_IOREQ_PFN, 0x1234) == -errno.EEXIST
    assert d.set_param(abi.HVM_PARAM_IOREQ_PFN, abi.special_pfn(5)) == 0  # same value
    assert d.set_param(abi.HVM_PARAM_VMPORT_REGS_PFN, 7, from_guest=True) == -errno.EPERM
    assert d.get_param(abi.HVM_PARAM_IOREQ_PFN, from_guest=True)[0] == -errno.EPERM
    assert d.set_param(abi.HVM_PARAM_BUFIOREQ_EVTCHN, 1) == -errno.EINVAL
    d2, _ = make_domain(pool_pages=0)
    assert d2.set_param(abi.HVM_PARAM_NR_IOREQ_SERVER_PAGES, 0) == -errno.EINVAL
    assert d2.set_param(abi.HVM_PARAM_NR_IOREQ_SERVER_PAGES, 65) == -errno.EINVAL


def test_legacy_gfn_fallback_hands_out_free_gfns_once() -> None:
    # The v14 fix (upstream 282ed258a5): the fallback must take a *free* legacy gfn and
    # mark it used. The inverted bit test handed out used gfns and leaked free ones.
    d, _ = make_domain(pool_pages=0)
    sid = create(d, ATOMIC)
    r = call(d, ops.get_ioreq_server_info(sid))
    assert r.rc == 0
    _, _, _, ioreq_gfn, buf_gfn = dmop.GET_INFO.unpack_from(r.out, 8)
    assert {ioreq_gfn, buf_gfn} == {abi.special_pfn(abi.SPECIALPAGE_IOREQ),
                                   abi.special_pfn(abi.SPECIALPAGE_BUFIOREQ)}
    # Both legacy gfns are now in use: a second server gets none.
    sid2 = create(d, OFF | NOVMPORT)
    assert call(d, ops.get_ioreq_server_info(sid2)).rc == -errno.ENOMEM
    assert not d.servers[sid2].pages
    # Destroying the first server gives them back.
    assert call(d, ops.destroy_ioreq_server(sid)).rc == 0
    assert call(d, ops.get_ioreq_server_info(sid2)).rc == 0


def test_vmport_page_comes_from_its_param() -> None:
    d, _ = make_domain()
    sid = create(d)
    assert call(d, ops.get_ioreq_server_info(sid)).rc == 0
    assert d.servers[sid].pages[PageKind.VMPORT].gfn == abi.special_pfn(8)


def test_second_server_without_vmport_gets_gfns() -> None:
    # v14's HANDLE_VMPORT_IOREQ tested the domain flag: a second (DISABLE_VMPORT) server
    # also wanted the single vmport gfn and its get_info failed with -ENOMEM.
    d, _ = make_domain()
    first = create(d)
    assert call(d, ops.get_ioreq_server_info(first)).rc == 0
    second = create(d, ATOMIC | NOVMPORT)
    assert call(d, ops.get_ioreq_server_info(second)).rc == 0
    assert PageKind.VMPORT not in d.servers[second].pages


def test_acquire_resource_frames() -> None:
    d, pages = make_domain()
    sid = create(d)
    rc, buf = d.acquire_resource(EMULATOR, sid, 0)
    assert rc == 0 and buf is not None and len(buf) == 4096
    rc, io = d.acquire_resource(EMULATOR, sid, 1)
    assert rc == 0 and io is not None
    # The vmport page as a resource frame, which v14 lacked (review point R2).
    rc, vp = d.acquire_resource(EMULATOR, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)
    assert rc == 0 and vp is not None
    assert d.acquire_resource(EMULATOR, sid, 2) == (-errno.EINVAL, None)
    # Same frame twice: same page.
    assert d.acquire_resource(EMULATOR, sid, 1)[1] is io
    # The two ways of reaching the pages exclude each other.
    assert call(d, ops.get_ioreq_server_info(sid)).rc == -errno.EPERM
    assert call(d, ops.get_ioreq_server_info(sid, flags=dmop.XEN_DMOP_no_gfns)).rc == 0
    # Resource frames are never guest frames: enabling hides nothing.
    assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    assert not pages.hidden


def test_acquire_resource_refuses_pages_a_server_does_not_have() -> None:
    d, _ = make_domain()
    sid = create(d, OFF | NOVMPORT)
    assert d.acquire_resource(EMULATOR, sid, 0)[0] == -errno.ENOENT
    # No unused vmport page for a DISABLE_VMPORT server (v14 gave every server one).
    assert d.acquire_resource(EMULATOR, sid,
                              dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)[0] == -errno.ENOENT
    gfn_server = create(d)
    assert call(d, ops.get_ioreq_server_info(gfn_server)).rc == 0
    assert d.acquire_resource(EMULATOR, gfn_server, 1)[0] == -errno.EPERM


def test_enable_hides_gfn_pages_and_disable_returns_them() -> None:
    d, pages = make_domain()
    sid = create(d)
    assert call(d, ops.get_ioreq_server_info(sid)).rc == 0
    gfns = [p.gfn for p in d.servers[sid].pages.values()]
    assert len(gfns) == 3
    page(d, sid, PageKind.IOREQ)[100] = 0x55  # the guest scribbled on it while disabled
    assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    assert not any(pages.guest_visible(g) for g in gfns if g is not None)
    io = page(d, sid, PageKind.IOREQ)
    assert io[100] == 0  # cleared on enable
    assert int.from_bytes(io[24:28], "little") == d.servers[sid].vcpu_ports[0]
    assert int.from_bytes(io[32 + 24:32 + 28], "little") == d.servers[sid].vcpu_ports[1]
    assert call(d, ops.set_ioreq_server_state(sid, False)).rc == 0
    assert all(pages.guest_visible(g) for g in gfns if g is not None)
    assert bytes(io) == bytes(4096)


def test_enabling_without_pages_gives_resource_frames() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, ports=((0x60, 0x60),))
    assert {p.gfn for p in d.servers[sid].pages.values()} == {None}
    assert d.pio(0, 0x60, 1, False, 0, regs(), 0).status is IoStatus.WAIT


# ------------------------------------------------------------------ selection

def test_newest_enabled_server_wins_and_disabled_are_skipped() -> None:
    d, _ = make_domain()
    a = enabled_server(d, ports=((0x60, 0x6F),))
    b = enabled_server(d, ATOMIC | NOVMPORT, ports=((0x64, 0x64),))
    assert d.select_server(abi.IOREQ_TYPE_PIO, 0x64, 1)[0] is d.servers[b]
    assert d.select_server(abi.IOREQ_TYPE_PIO, 0x60, 1)[0] is d.servers[a]
    assert call(d, ops.set_ioreq_server_state(b, False)).rc == 0
    assert d.select_server(abi.IOREQ_TYPE_PIO, 0x64, 1)[0] is d.servers[a]


def test_partial_overlap_is_not_sent() -> None:
    d, _ = make_domain()
    enabled_server(d, ports=((0x60, 0x61),))
    assert d.select_server(abi.IOREQ_TYPE_PIO, 0x61, 2)[0] is None
    assert d.select_server(abi.IOREQ_TYPE_PIO, 0x60, 2)[0] is not None


def test_memory_ranges_cover_the_whole_rep_with_df() -> None:
    d, _ = make_domain()
    sid = create(d)
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_MEMORY, 0x1000, 0x1FFF)).rc == 0
    assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    assert d.select_server(abi.IOREQ_TYPE_COPY, 0x1000, 4, count=1024)[0] is not None
    assert d.select_server(abi.IOREQ_TYPE_COPY, 0x1004, 4, count=1024)[0] is None
    assert d.select_server(abi.IOREQ_TYPE_COPY, 0x1FFC, 4, count=1024, df=True)[0] is not None
    assert d.select_server(abi.IOREQ_TYPE_COPY, 0x1FFC, 4, count=1025, df=True)[0] is None


def test_pci_config_through_cf8() -> None:
    d, _ = make_domain()
    sid = create(d)
    sbdf = (0 << 16) | (0 << 8) | (3 << 3) | 1  # 00:03.1
    assert call(d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_PCI, sbdf, sbdf)).rc == 0
    assert call(d, ops.set_ioreq_server_state(sid, True)).rc == 0
    cf8 = 0x80000000 | (sbdf << 8) | 0x10
    assert d.pio(0, 0xCF8, 4, True, cf8, regs(), 0).route is Route.NULL  # latched, unclaimed
    res = d.pio(0, 0xCFE, 2, False, 0, regs(), 0)
    assert res.status is IoStatus.WAIT and res.ioreq_type == abi.IOREQ_TYPE_PCI_CONFIG
    req = dm_answer(d, sid, 0, 0xBEEF)
    assert req.type == abi.IOREQ_TYPE_PCI_CONFIG
    assert req.addr == (sbdf << 32) | 0x12
    assert d.poll(0, regs()).value == 0xBEEF
    # Enable bit clear: plain port access, nobody claims 0xcfc.
    d.pio(0, 0xCF8, 4, True, cf8 & 0x7FFFFFFF, regs(), 0)
    assert d.pio(0, 0xCFC, 4, False, 0, regs(), 0).route is Route.NULL


# ------------------------------------------------------------------ isa irq

def test_set_isa_irq_level() -> None:
    d, _ = make_domain()
    r = call(d, ops.set_isa_irq_level(12, 1))
    assert r.rc == 0 and r.effects == [ops.IrqLevel(12, 1)]
    assert call(d, ops.set_isa_irq_level(16, 1)).rc == -errno.EINVAL
    assert call(d, ops.set_isa_irq_level(1, 2)).rc == -errno.EINVAL
