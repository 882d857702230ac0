"""The control socket and the device-model client library, in one process, no CPU."""

from __future__ import annotations

import array
import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvmport import atomic
from hvmport.abi import control as ctl
from hvmport.abi import dm_op as dmop
from hvmport.core.clock import FixedClock
from hvmport.core.domain import Domain, PageKind
from hvmport.dm.client import DeviceModel
from hvmport.errors import DmOpError
from hvmport.hv.control import ControlServer
from hvmport.hv.evtchn import Channel
from hvmport.hv.memory import GuestMemory
from hvmport.hv.shmem import MemfdPages

DOMID = 3


class Host:
    def __init__(self, path: str) -> None:
        self.memory = GuestMemory(4)
        self.pages = MemfdPages()
        self.domain = Domain(DOMID, 2, self.pages, FixedClock(), vmware_port=True,
                             vmware_hwver=7, tsc_khz=1_000_000, cas64=atomic.cas64)
        self.channels: dict[int, Channel] = {}
        self.irqs: list[tuple[int, int]] = []
        self.crashed = threading.Event()
        self.domain.on_crash = lambda crash: self.crashed.set()
        self.server = ControlServer(path, self.domain, threading.Lock(), self.memory,
                                    self.pages, self.channels,
                                    irq=lambda i, lv: self.irqs.append((i, lv)))
        self.server.start()

    def close(self) -> None:
        self.server.close()
        for chan in self.channels.values():
            chan.close()
        self.pages.close()
        self.memory.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(str(tmp_path / "control"))
    yield h
    h.close()


@pytest.fixture
def dm(host: Host) -> Iterator[DeviceModel]:
    client = DeviceModel(host.server.path)
    client.restrict(DOMID)
    yield client
    client.close()


def test_restricted_to_one_domain(host: Host, dm: DeviceModel) -> None:
    with pytest.raises(DmOpError) as e:
        dm.create_ioreq_server(DOMID + 1, 0)
    assert e.value.errno == errno.EPERM
    with pytest.raises(DmOpError):
        dm.restrict(DOMID + 1)
    assert dm.nr_vcpus(DOMID) == 2


def test_resource_frames_are_shared_memory(host: Host, dm: DeviceModel) -> None:
    sid = dm.create_ioreq_server(DOMID, dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC)
    buf, ioreq = dm.map_resource(DOMID, sid, 0, 2)
    (vmport,) = dm.map_resource(DOMID, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)
    server = host.domain.servers[sid]
    ioreq[100] = 0x5A
    vmport[7] = 0xA5
    assert server.pages[PageKind.IOREQ].view[100] == 0x5A
    assert server.pages[PageKind.VMPORT].view[7] == 0xA5
    server.pages[PageKind.BUFIOREQ].view[9] = 0x77
    assert buf[9] == 0x77
    for m in (buf, ioreq, vmport):
        m.close()


def test_frames_a_server_lacks_are_refused(host: Host, dm: DeviceModel) -> None:
    sid = dm.create_ioreq_server(DOMID, dmop.HVM_IOREQSRV_DISABLE_VMPORT)
    with pytest.raises(DmOpError) as e:
        dm.map_resource(DOMID, sid, 0)  # no buffered ring
    assert e.value.errno == errno.ENOENT
    with pytest.raises(DmOpError) as e:
        dm.map_resource(DOMID, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)
    assert e.value.errno == errno.ENOENT


def test_guest_memory_is_mapped_shared(host: Host, dm: DeviceModel) -> None:
    mem = dm.map_guest_memory(DOMID)
    assert len(mem) == host.memory.size
    host.memory.write(0x1234, b"hello")
    assert mem[0x1234:0x1239] == b"hello"
    mem.close()


def test_event_channels(host: Host, dm: DeviceModel) -> None:
    sid = dm.create_ioreq_server(DOMID, 0)
    dm.set_ioreq_server_state(DOMID, sid, True)
    port = host.domain.servers[sid].vcpu_ports[1]
    chan = dm.bind_interdomain(DOMID, port)
    assert not chan.pending()
    os.eventfd_write(host.channels[port].to_dm, 1)
    assert chan.pending() and not chan.pending()
    chan.notify()
    assert os.eventfd_read(host.channels[port].to_hv) == 1
    with pytest.raises(DmOpError):
        dm.bind_interdomain(DOMID, 9999)
    chan.close()


def test_another_emulators_ports_and_servers_are_off_limits(host: Host,
                                                            dm: DeviceModel) -> None:
    sid = dm.create_ioreq_server(DOMID, 0)
    other = DeviceModel(host.server.path)
    try:
        with pytest.raises(DmOpError) as e:
            other.bind_interdomain(DOMID, host.domain.servers[sid].vcpu_ports[0])
        assert e.value.errno == errno.EPERM
        with pytest.raises(DmOpError) as e:
            other.map_resource(DOMID, sid, 1)
        assert e.value.errno == errno.EPERM
        with pytest.raises(DmOpError) as e:
            other.destroy_ioreq_server(DOMID, sid)
        assert e.value.errno == errno.EPERM
    finally:
        other.close()


def test_irq_level_reaches_the_sink(host: Host, dm: DeviceModel) -> None:
    dm.set_isa_irq_level(DOMID, 12, 1)
    dm.set_isa_irq_level(DOMID, 12, 0)
    assert host.irqs == [(12, 1), (12, 0)]
    with pytest.raises(DmOpError):
        dm.set_isa_irq_level(DOMID, 16, 1)


def test_malformed_requests_get_errors_and_the_server_lives(host: Host) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(host.server.path)
    try:
        sock.send(b"\x01")
        assert ctl.Reply.unpack(sock.recv(4096)).rc == -errno.EINVAL
        sock.send(ctl.Request(99, DOMID, (0, 0, 0, 0), b"").pack())
        assert ctl.Reply.unpack(sock.recv(4096)).rc == -errno.EOPNOTSUPP
        # Descriptors sent to the hypervisor are closed, not kept.
        r, w = os.pipe()
        link = os.readlink(f"/proc/self/fd/{r}")
        sock.sendmsg([ctl.Request(ctl.CTL_NR_VCPUS, DOMID, (0, 0, 0, 0), b"").pack()],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
        os.close(r)
        assert ctl.Reply.unpack(sock.recv(4096)).value == 2
        holders = [fd for fd in os.listdir("/proc/self/fd")
                   if _link(fd) == link]
        assert holders == [str(w)]
        os.close(w)
    finally:
        sock.close()
    client = DeviceModel(host.server.path)
    assert client.nr_vcpus(DOMID) == 2
    client.close()


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_closing_while_owning_a_server_crashes_the_domain(host: Host) -> None:
    client = DeviceModel(host.server.path)
    client.create_ioreq_server(DOMID, 0)
    client.close()
    assert host.crashed.wait(5)
    assert host.domain.crash_info is not None
    assert f"pid {os.getpid()}" in host.domain.crash_info.reason


def test_closing_without_servers_is_fine(host: Host) -> None:
    client = DeviceModel(host.server.path)
    client.nr_vcpus(DOMID)
    client.close()
    assert not host.crashed.wait(0.3)


def test_three_exchange_calls_through_the_control_socket(host: Host, dm: DeviceModel) -> None:
    from hvmport.abi import ioreq as abi
    from hvmport.core import slots
    from hvmport.core.vmport import BackdoorRegs
    from hvmport.dm.client import vmport_transport_flags

    sid = dm.create_ioreq_server(DOMID, vmport_transport_flags("three-exchange"))
    with pytest.raises(DmOpError) as e:
        dm.map_resource(DOMID, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)
    assert e.value.errno == errno.ENOENT  # this transport has no registers page
    (ioreq,) = dm.map_resource(DOMID, sid, 1)
    dm.set_ioreq_server_state(DOMID, sid, True)
    with pytest.raises(DmOpError) as e:
        dm.vmport_get_regs(DOMID, 1)
    assert e.value.errno == errno.ENOENT  # no call in flight
    regs = BackdoorRegs(0x564D5868, 0x11, 40, 0x5658, 0x55, 0x66)
    with host.server.lock:
        assert host.domain.pio(1, 0x5658, 4, False, 0, regs, 0).route.value == "server"
    # Another device model may not look at this one's call.
    other = DeviceModel(host.server.path)
    try:
        with pytest.raises(DmOpError) as e:
            other.vmport_get_regs(DOMID, 1)
        assert e.value.errno == errno.EPERM
    finally:
        other.close()
    view = memoryview(ioreq)
    assert slots.take(view, 1) is not None
    assert dm.vmport_get_regs(DOMID, 1) == (0x564D5868,
                                             abi.VmwareRegs(0x55, 0x66, 0x11, 40, 0x5658))
    dm.vmport_set_regs(DOMID, 1, abi.VmwareRegs(1, 2, 3, 4, 5))
    slots.respond(view, 1, 9)
    with host.server.lock:
        done = host.domain.poll(1, regs)
    assert done.value == 9 and done.regs is not None
    assert (done.regs.rbx, done.regs.rcx, done.regs.rdx, done.regs.rsi, done.regs.rdi) == (
        3, 4, 5, 1, 2)
    view.release()
    ioreq.close()
