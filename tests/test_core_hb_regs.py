"""The hvmport extension for the high-bandwidth backdoor: string I/O on 0x5659, forwarded as
a data_is_ptr PIO request, carries the registers in the vmport page (EBP in the extension
word after the slots) and gets them back from the server that handled it."""

from __future__ import annotations

from coretools import dm_answer, enabled_server, make_domain, page

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core.domain import IoStatus, PageKind
from hvmport.core.vmport import BackdoorRegs

MAGIC = 0x564D5868
ATOMIC = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC
NOVMPORT = dmop.HVM_IOREQSRV_DISABLE_VMPORT
UPPER = 0xABCD000000000000


def hb_regs() -> BackdoorRegs:
    return BackdoorRegs(MAGIC, UPPER | 0x10000, 20, (3 << 16) | 0x5659, UPPER | 0x5000,
                        0x1111, rbp=UPPER | 0x2222)


def test_hb_string_io_carries_registers_both_ways() -> None:
    d, _ = make_domain(vcpus=2)
    sid = enabled_server(d, ATOMIC, ports=((0x5659, 0x5659),))
    res = d.pio(1, 0x5659, 1, True, 0, hb_regs(), 3, string=True, count=20,
                buffer_gpa=0x3000)
    assert res.status is IoStatus.WAIT
    vp = page(d, sid, PageKind.VMPORT)
    off = abi.VMWARE_REGS_SIZE
    sent = abi.VmwareRegs.unpack(bytes(vp[off:off + abi.VMWARE_REGS_SIZE]))
    assert (sent.ebx, sent.ecx, sent.edx, sent.esi, sent.edi) == (
        0x10000, 20, (3 << 16) | 0x5659, 0x5000, 0x1111)
    ebp = abi.HVMPORT_VMPORT_EBP_OFFSET + 4
    assert bytes(vp[ebp:ebp + 4]) == (0x2222).to_bytes(4, "little")
    req = dm_answer(d, sid, 1, None, abi.VmwareRegs(0x5000, 0x1111, 0x10001, 20,
                                                      (3 << 16) | 0x5659))
    assert (req.type, req.data_is_ptr, req.data, req.count) == (abi.IOREQ_TYPE_PIO, True,
                                                               0x3000, 20)
    done = d.poll(1, hb_regs())
    assert done.status is IoStatus.DONE and done.regs is not None
    assert done.regs.rbx == UPPER | 0x10001  # the status, upper half kept
    assert done.regs.rsi == UPPER | 0x5000 and done.regs.rbp == UPPER | 0x2222


def test_other_string_io_and_non_vmport_servers_carry_none() -> None:
    d, _ = make_domain()
    sid = enabled_server(d, ATOMIC | NOVMPORT, ports=((0x5659, 0x5659),))
    assert PageKind.VMPORT not in d.servers[sid].pages
    d.pio(0, 0x5659, 1, True, 0, hb_regs(), 3, string=True, count=4, buffer_gpa=0x3000)
    dm_answer(d, sid, 0, None)
    assert d.poll(0, hb_regs()).regs is None
    d2, _ = make_domain()
    sid2 = enabled_server(d2, ATOMIC, ports=((0x3F8, 0x3F8),))
    d2.pio(0, 0x3F8, 1, True, 0, hb_regs(), 3, string=True, count=4, buffer_gpa=0x3000)
    dm_answer(d2, sid2, 0, None)
    assert d2.poll(0, hb_regs()).regs is None
