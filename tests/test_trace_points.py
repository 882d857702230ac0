"""The hypervisor's trace points (patch 8/8's HANDLED, IGNORED, SEND, plus ioreq send and
completion per server), driven through the real Emulator and core with a device model
reduced to the bytes it writes; and the summary and the Chrome export of such a trace."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.abi import vmware as vm
from hvmport.core.domain import Domain, IoResult
from hvmport.core.vmport import BackdoorRegs
from hvmport.cpu.base import PortAccess, Regs
from hvmport.hv.emulate import Emulator
from hvmport.trace import chrome, summary
from hvmport.trace.reader import Event, read
from hvmport.trace.recorder import Tracer
from tests.coretools import MAGIC, dm_answer, enabled_server, make_domain

STATUS = vm.BDOOR_CMD_ABSPOINTER_STATUS
GETVERSION = vm.BDOOR_CMD_GETVERSION
NOVMPORT = dmop.HVM_IOREQSRV_DISABLE_VMPORT | dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC


class Ctx:
    """A vCPU as the Emulator sees it: registers in, registers out."""

    def __init__(self, vcpu: int, regs: Regs) -> None:
        self.vcpu_id = vcpu
        self.regs = regs

    def get_regs(self) -> Regs:
        return self.regs.copy()

    def set_regs(self, regs: Regs) -> None:
        self.regs = regs

    def cpl(self) -> int:
        return 0


class DeviceModel:
    """Answers each forwarded request the moment the vCPU waits for it."""

    def __init__(self, d: Domain, sid: int) -> None:
        self.d, self.sid = d, sid
        self.answer = 0
        self.vmregs: abi.VmwareRegs | None = None

    def __call__(self, vcpu: int, port: int, regs: BackdoorRegs, what: str) -> IoResult:
        dm_answer(self.d, self.sid, vcpu, self.answer, self.vmregs)
        return self.d.poll(vcpu, regs)


def backdoor(em: Emulator, vcpu: int, *, rax: int = MAGIC, rbx: int = 0, rcx: int,
             port: int = 0x5658, size: int = 4) -> Ctx:
    ctx = Ctx(vcpu, Regs(rax=rax, rbx=rbx, rcx=rcx, rdx=port, rsi=0x51, rdi=0xD1))
    em.port_io(ctx, PortAccess(port, size, False))
    return ctx


@dataclass
class Traced:
    em: Emulator
    dm: DeviceModel
    path: Path
    #: A second server, without vmport, owning ports 0x510-0x511.
    pio_sid: int


@pytest.fixture
def traced(tmp_path: Path) -> Traced:
    d, _ = make_domain(vcpus=2)
    vmport_sid = enabled_server(d)
    pio_sid = enabled_server(d, NOVMPORT, ports=((0x510, 0x511),))
    dm = DeviceModel(d, vmport_sid)
    path = tmp_path / "t.jsonl"
    em = Emulator(d, None, waiter=dm, tracer=Tracer(path, domid=1, role="hypervisor"))
    return Traced(em, dm, path, pio_sid)


def events(em: Emulator, path: Path) -> list[Event]:
    assert em.tracer is not None
    em.tracer.close()
    return read(path).events


def test_handled_command_carries_both_register_sets(traced: Traced
                                                    ) -> None:
    em, path = traced.em, traced.path
    ctx = backdoor(em, 1, rcx=GETVERSION, rbx=0x77)
    (e,) = events(em, path)
    assert e.ev == "vmport_handled" and e.num("vcpu") == 1 and e.num("cmd") == GETVERSION
    assert e.regs("in") == {"eax": MAGIC, "ebx": 0x77, "ecx": GETVERSION, "edx": 0x5658,
                            "esi": 0x51, "edi": 0xD1}
    assert e.regs("out") == {"eax": 6, "ebx": MAGIC, "ecx": vm.VMX_TYPE_SCALABLE_SERVER,
                             "edx": 0x5658, "esi": 0x51, "edi": 0xD1}
    # What the trace says the guest got is what it got.
    assert (ctx.regs.rbx, ctx.regs.rcx) == (MAGIC, vm.VMX_TYPE_SCALABLE_SERVER)
    assert e.num("dur") > 0


def test_ignored_accesses_say_why(traced: Traced) -> None:
    em, path = traced.em, traced.path
    backdoor(em, 0, rax=0x1234, rcx=STATUS)
    backdoor(em, 0, rcx=STATUS, port=0x5659, size=1)
    got = events(em, path)
    assert [(e.ev, e.data["why"], e.num("port")) for e in got] == [
        ("vmport_ignored", "magic", 0x5658), ("vmport_ignored", "port", 0x5659)]
    assert got[0].regs("in")["eax"] == 0x1234


def test_no_server_for_a_forwarded_command_is_ignored(tmp_path: Path) -> None:
    d, _ = make_domain()
    path = tmp_path / "t.jsonl"
    em = Emulator(d, None, tracer=Tracer(path, domid=1))
    backdoor(em, 0, rcx=STATUS)
    (e,) = events(em, path)
    assert (e.ev, e.data["why"]) == ("vmport_ignored", "no server")


def test_forwarded_command_send_and_completion(traced: Traced
                                               ) -> None:
    em, dm, path = traced.em, traced.dm, traced.path
    dm.answer = 0xFFFF0000
    dm.vmregs = abi.VmwareRegs(esi=0x5E, edi=0xD0, ebx=0xB0, ecx=STATUS, edx=0x5658)
    ctx = backdoor(em, 1, rcx=STATUS, rbx=0x11)
    send, ioreq, done = events(em, path)
    assert (send.ev, send.num("vcpu"), send.num("sid"), send.num("cmd")) == (
        "vmport_send", 1, dm.sid, STATUS)
    assert send.regs("in") == {"eax": MAGIC, "ebx": 0x11, "ecx": STATUS, "edx": 0x5658,
                               "esi": 0x51, "edi": 0xD1}
    assert ioreq.ev == "ioreq_send"
    assert (ioreq.num("type"), ioreq.num("addr"), ioreq.num("size"), ioreq.num("dir"),
            ioreq.num("data")) == (abi.IOREQ_TYPE_VMWARE_PORT, 0x5658, 4, abi.IOREQ_READ,
                                   MAGIC)
    assert done.ev == "ioreq_complete" and done.opt_int("cmd") == STATUS
    assert done.num("data") == 0xFFFF0000 and done.num("sid") == dm.sid
    assert done.regs("out") == {"eax": 0xFFFF0000, "ebx": 0xB0, "ecx": STATUS,
                                "edx": 0x5658, "esi": 0x5E, "edi": 0xD0}
    assert (ctx.regs.rbx, ctx.regs.rsi) == (0xB0, 0x5E)
    assert send.t <= ioreq.t <= done.t and done.num("dur") >= 0


def test_plain_pio_ioreq_round_trip(traced: Traced) -> None:
    em, dm, path = traced.em, traced.dm, traced.path
    pio_sid = traced.pio_sid
    dm.sid, dm.answer = pio_sid, 0xAB
    ctx = Ctx(0, Regs())
    assert em.port_io(ctx, PortAccess(0x510, 1, False)) == b"\xab"
    em.port_io(ctx, PortAccess(0x510, 2, True, data=b"\x34\x12"))
    got = events(em, path)
    assert [e.ev for e in got] == ["ioreq_send", "ioreq_complete"] * 2
    assert [(e.num("sid"), e.num("type")) for e in got] == [(pio_sid, abi.IOREQ_TYPE_PIO)] * 4
    assert got[1].num("data") == 0xAB and got[1].opt_int("cmd") is None
    assert (got[2].num("addr"), got[2].num("dir"), got[2].num("data")) == (
        0x510, abi.IOREQ_WRITE, 0x1234)


def test_tracing_off_records_nothing_and_answers_the_same(tmp_path: Path) -> None:
    d, _ = make_domain()
    dm = DeviceModel(d, enabled_server(d))
    dm.answer = 7
    em = Emulator(d, None, waiter=dm)
    assert em.tracer is None
    ctx = backdoor(em, 0, rcx=STATUS)
    assert ctx.regs.rax == 7
    assert os.listdir(tmp_path) == []


def test_summary_and_chrome_of_a_trace(traced: Traced,
                                       tmp_path: Path) -> None:
    em, dm, path = traced.em, traced.dm, traced.path
    for _ in range(3):
        backdoor(em, 0, rcx=GETVERSION)
    for vcpu in (0, 1):
        backdoor(em, vcpu, rcx=STATUS)
    backdoor(em, 1, rax=0, rcx=STATUS)
    assert em.tracer is not None
    em.tracer.close()
    trace = read(path)
    s = summary.summarize(trace)
    rows = {(c["name"], c["route"]): c for c in s.as_json()["commands"]}
    assert rows[("GETVERSION", "hypervisor")]["count"] == 3
    assert rows[("ABSPOINTER_STATUS", "round trip")]["count"] == 2
    durs = sorted(e.num("dur") for e in trace.events if e.ev == "vmport_handled")
    version = rows[("GETVERSION", "hypervisor")]
    assert (version["p50_us"], version["max_us"]) == (durs[1] / 1000, durs[2] / 1000)
    servers = {srv["sid"]: srv for srv in s.as_json()["servers"]}
    assert servers[dm.sid]["sync"] == 2 and servers[dm.sid]["types"] == {"VMWARE_PORT": 2}
    assert s.as_json()["ignored"] == {"magic": 1}
    text = s.table()
    assert "GETVERSION (10)" in text and "ABSPOINTER_STATUS (40)" in text
    assert "ignored backdoor accesses: magic 1" in text

    out = tmp_path / "chrome.json"
    assert chrome.write(trace, out) == len(trace.events)
    doc = json.loads(out.read_text())
    evs = doc["traceEvents"]
    complete = [e for e in evs if e["ph"] == "X"]
    assert sorted(e["name"] for e in complete) == (
        ["handled GETVERSION (10)"] * 3
        + ["ioreq_complete VMWARE_PORT ABSPOINTER_STATUS (40)"] * 2)
    assert {e["tid"] for e in complete} == {0, 1}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
               if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == {(os.getpid(), 0): "vCPU 0", (os.getpid(), 1): "vCPU 1"}
    assert all(e["ts"] >= 0 and e.get("dur", 0) >= 0 for e in evs if e["ph"] != "M")
    instants = [e for e in evs if e["ph"] == "i"]
    assert {e["name"] for e in instants} >= {"send ABSPOINTER_STATUS (40)", "ignored (magic)"}
    assert all(e["s"] == "t" for e in instants)


# -- the device model's side ----------------------------------------------------------------

def test_device_model_records_its_answers(tmp_path: Path) -> None:
    from tests.test_dm_loop import answer, make_loop, post

    loop, page, regs_page, _ = make_loop()
    path = tmp_path / "dm.jsonl"
    loop.tracer = Tracer(path, domid=1, role="device-model")
    loop.server_id = 3
    regs_page[0:20] = abi.VmwareRegs(esi=0x51, edi=0xD1, ebx=0xB1, ecx=STATUS,
                                     edx=0x5658).pack()
    post(page, abi.IoReq(addr=0x5658, size=2, data=MAGIC, dir=abi.IOREQ_READ,
                         type=abi.IOREQ_TYPE_VMWARE_PORT))
    answer(loop, page)
    post(page, abi.IoReq(addr=0x512, size=2, data=0xBEEF, dir=abi.IOREQ_WRITE))
    answer(loop, page)
    post(page, abi.IoReq(addr=0x512, size=2, dir=abi.IOREQ_READ))
    answer(loop, page)
    loop.tracer.close()
    vmport, write, read_back = read(path).events
    assert (vmport.ev, vmport.num("sid"), vmport.num("cmd")) == ("vmport_dm", 3, STATUS)
    assert vmport.regs("in") == {"eax": MAGIC, "ebx": 0xB1, "ecx": STATUS, "edx": 0x5658,
                                 "esi": 0x51, "edi": 0xD1}
    # make_loop's vmport answers 0x1234 and sets EBX; a 2-byte IN replaces AX only.
    assert vmport.regs("out") == {"eax": (MAGIC & 0xFFFF0000) | 0x1234, "ebx": 0xB0B0B0B0,
                                  "ecx": STATUS, "edx": 0x5658, "esi": 0x51, "edi": 0xD1}
    assert [(e.ev, e.num("addr"), e.num("dir"), e.num("data")) for e in (write, read_back)] == [
        ("dm_ioreq", 0x512, abi.IOREQ_WRITE, 0xBEEF), ("dm_ioreq", 0x512, abi.IOREQ_READ, 0xBEEF)]
    assert all(e.num("dur") > 0 for e in (vmport, write, read_back))


def test_buffered_writes_both_ends(traced: Traced, tmp_path: Path) -> None:
    """The hypervisor's buffered sends and the device model's drain of the same ring."""
    from hvmport.core.bufring import Send
    from hvmport.core.domain import PageKind
    from hvmport.dm.ioreq_loop import IoreqLoop
    from tests.test_dm_loop import FakeChannel, make_loop

    em, dm = traced.em, traced.dm
    ring = em.domain.servers[dm.sid].pages[PageKind.BUFIOREQ].view
    assert em.send_buffered(dm.sid, abi.IOREQ_TYPE_PIO, 0x512, 2, 0xCAFE)[0] is Send.QUEUED
    # An address beyond 20 bits does not fit a buf_ioreq: it must go synchronously.
    status, port = em.send_buffered(dm.sid, abi.IOREQ_TYPE_COPY, 0x100000, 4, 1)
    assert status is Send.UNBUFFERABLE and port is None
    base, page, _, _ = make_loop()
    dm_path = tmp_path / "dm.jsonl"
    loop = IoreqLoop(1, page, [FakeChannel()], base.devices,  # type: ignore[list-item]
                     buf_page=ring.obj,  # type: ignore[arg-type]
                     tracer=Tracer(dm_path, domid=1), server_id=dm.sid)
    assert loop.serve_once()
    assert loop.tracer is not None
    loop.tracer.close()
    sent = [(e.num("addr"), e.num("size"), e.num("data"), e.data["status"])
            for e in events(em, traced.path)]
    assert sent == [(0x512, 2, 0xCAFE, "queued"), (0x100000, 4, 1, "unbufferable")]
    (drained,) = read(dm_path).events
    assert (drained.ev, drained.num("sid"), drained.num("addr"), drained.num("data")) == (
        "dm_bufioreq", dm.sid, 0x512, 0xCAFE)


def test_a_crash_while_waiting_is_in_the_trace(tmp_path: Path) -> None:
    from hvmport.hv.emulate import DomainCrashed

    d, _ = make_domain()
    sid = enabled_server(d)

    def hung(vcpu: int, port: int, regs: BackdoorRegs, what: str) -> IoResult:
        # What the waiter does at its deadline.
        d.crash("device model did not answer")
        return d.poll(vcpu, regs)

    path = tmp_path / "t.jsonl"
    em = Emulator(d, None, waiter=hung, tracer=Tracer(path, domid=1))
    with pytest.raises(DomainCrashed):
        backdoor(em, 0, rcx=STATUS)
    send, ioreq, done = events(em, path)
    assert (send.ev, ioreq.ev, done.ev) == ("vmport_send", "ioreq_send", "ioreq_complete")
    assert done.num("sid") == sid and done.data["why"] == "device model did not answer"
    assert done.opt_int("cmd") == STATUS and "out" not in done.data
