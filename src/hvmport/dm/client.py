"""A device model's view of the hypervisor, shaped like Xen's libraries.

``DeviceModel`` covers libxendevicemodel (the dm_ops), libxenforeignmemory
(``map_resource``, guest memory) and libxenevtchn (``bind_interdomain``, ``notify``,
``pending``). Failed dm_ops raise ``DmOpError`` with Xen's errno.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from dataclasses import dataclass

from hvmport.abi import control as ctl
from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import dmop as ops
from hvmport.errors import DmOpError, HostError
from hvmport.hv import evtchn

PAGE = 4096

#: The register transports a VMWARE_PORT server can ask for at creation (issue 6), by the
#: names the device model's ``--vmport-transport`` and ``hvmport bench`` use.
VMPORT_TRANSPORTS = {
    "regs-page": dmop.HVMPORT_VMPORT_TRANSPORT_REGS_PAGE,
    "ioreq-union": dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION,
    "gpr64": dmop.HVMPORT_VMPORT_TRANSPORT_GPR64,
    "three-exchange": dmop.HVMPORT_VMPORT_TRANSPORT_THREE_EXCHANGE,
}


def vmport_transport_flags(name: str) -> int:
    """The create_ioreq_server flag bits that select a register transport."""
    return VMPORT_TRANSPORTS[name] << dmop.HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT


def vmport_frames(name: str, nr_vcpus: int) -> int:
    """How many registers frames (from 0x100) a server with this transport has."""
    if name == "gpr64":
        return -(-nr_vcpus // abi.VMPORT_GPR64_PER_PAGE)
    return 1 if name == "regs-page" else 0


@dataclass(slots=True)
class EventChannel:
    """A bound interdomain port: wait on ``fd``, ``notify`` the hypervisor."""

    port: int
    fd: int  # readable when the hypervisor notified us
    _to_hv: int

    def notify(self) -> None:
        evtchn.notify(self._to_hv)

    def pending(self) -> bool:
        """Consume and report a notification, without blocking."""
        return evtchn.drain(self.fd)

    def close(self) -> None:
        for fd in (self.fd, self._to_hv):
            if fd >= 0:
                os.close(fd)
        self.fd = self._to_hv = -1


@dataclass(slots=True, frozen=True)
class ServerInfo:
    ioreq_gfn: int
    bufioreq_gfn: int
    bufioreq_port: int


class DeviceModel:
    def __init__(self, path: str) -> None:
        #: The guest's RAM size, known once map_guest_memory has run.
        self.guest_ram_size = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise HostError(f"cannot reach the hypervisor at {path}: {e.strerror}") from e

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _call(self, kind: int, domid: int, args: tuple[int, int, int, int] = (0, 0, 0, 0),
              payload: bytes = b"") -> tuple[ctl.Reply, list[int]]:
        self.sock.sendmsg([ctl.Request(kind, domid, args, payload).pack()])
        raw, anc, _flags, _ = self.sock.recvmsg(ctl.MAX_MESSAGE,
                                                socket.CMSG_SPACE(4 * ctl.MAX_FDS))
        if not raw:
            raise HostError("the hypervisor closed the control socket")
        fds: list[int] = []
        for level, kind_, data in anc:
            if level == socket.SOL_SOCKET and kind_ == socket.SCM_RIGHTS:
                fds += array.array("i", data[: len(data) - len(data) % 4]).tolist()
        return ctl.Reply.unpack(raw), fds

    def _op(self, name: str, domid: int, buf: bytes) -> bytes:
        reply, _ = self._call(ctl.CTL_DM_OP, domid, payload=buf)
        if reply.rc:
            raise DmOpError(name, -reply.rc)
        return reply.payload

    # -------------------------------------------------------------- libxendevicemodel

    def _checked(self, kind: int, name: str, domid: int) -> int:
        """A control call without descriptors; its value, or DmOpError with its errno."""
        reply, _ = self._call(kind, domid)
        if reply.rc:
            raise DmOpError(name, -reply.rc)
        return reply.value

    def restrict(self, domid: int) -> None:
        self._checked(ctl.CTL_RESTRICT, "restrict", domid)

    def nr_vcpus(self, domid: int) -> int:
        return self._checked(ctl.CTL_NR_VCPUS, "nr_vcpus", domid)

    def create_ioreq_server(self, domid: int, flags: int) -> int:
        out = self._op("create_ioreq_server", domid, ops.create_ioreq_server(flags))
        return int(dmop.CREATE.unpack_from(out, 8)[2])

    def get_ioreq_server_info(self, domid: int, sid: int, *, gfns: bool = False) -> ServerInfo:
        flags = 0 if gfns else dmop.XEN_DMOP_no_gfns
        out = self._op("get_ioreq_server_info", domid, ops.get_ioreq_server_info(sid, flags))
        _, _, port, ioreq_gfn, buf_gfn = dmop.GET_INFO.unpack_from(out, 8)
        return ServerInfo(ioreq_gfn, buf_gfn, port)

    def map_io_range_to_ioreq_server(self, domid: int, sid: int, range_type: int, start: int,
                                     end: int) -> None:
        self._op("map_io_range_to_ioreq_server", domid,
                 ops.map_io_range(sid, range_type, start, end))

    def unmap_io_range_from_ioreq_server(self, domid: int, sid: int, range_type: int,
                                         start: int, end: int) -> None:
        self._op("unmap_io_range_from_ioreq_server", domid,
                 ops.unmap_io_range(sid, range_type, start, end))

    def set_ioreq_server_state(self, domid: int, sid: int, enabled: bool) -> None:
        self._op("set_ioreq_server_state", domid, ops.set_ioreq_server_state(sid, enabled))

    def destroy_ioreq_server(self, domid: int, sid: int) -> None:
        self._op("destroy_ioreq_server", domid, ops.destroy_ioreq_server(sid))

    def set_isa_irq_level(self, domid: int, irq: int, level: int) -> None:
        self._op("set_isa_irq_level", domid, ops.set_isa_irq_level(irq, level))

    def remote_shutdown(self, domid: int, reason: int) -> None:
        """xendevicemodel_shutdown: ask for the domain to shut down (SHUTDOWN_* reason)."""
        self._op("remote_shutdown", domid, ops.remote_shutdown(reason))

    def pause(self, domid: int) -> None:
        """hvmport extension (QMP stop): the vCPUs stop at their next exit."""
        self._checked(ctl.CTL_PAUSE, "pause", domid)

    def unpause(self, domid: int) -> None:
        self._checked(ctl.CTL_UNPAUSE, "unpause", domid)

    def dm_op(self, domid: int, buf: bytes) -> tuple[int, bytes]:
        """Raw access: the rc and the bytes the hypervisor wrote back."""
        reply, _ = self._call(ctl.CTL_DM_OP, domid, payload=buf)
        return reply.rc, reply.payload

    def vmport_get_regs(self, domid: int, vcpu: int) -> tuple[int, abi.VmwareRegs]:
        """Three-exchange transport, second exchange: the calling vCPU's EAX and registers."""
        reply, _ = self._call(ctl.CTL_VMPORT_GET_REGS, domid, (vcpu, 0, 0, 0))
        if reply.rc or len(reply.payload) != 4 + abi.VMWARE_REGS_SIZE:
            raise DmOpError("vmport_get_regs", -reply.rc if reply.rc else 22)
        eax = int.from_bytes(reply.payload[:4], "little")
        return eax, abi.VmwareRegs.unpack(reply.payload, 4)

    def vmport_set_regs(self, domid: int, vcpu: int, regs: abi.VmwareRegs) -> None:
        """Three-exchange transport, third exchange: registers to hand back (before the
        slot is answered)."""
        reply, _ = self._call(ctl.CTL_VMPORT_SET_REGS, domid, (vcpu, 0, 0, 0), regs.pack())
        if reply.rc:
            raise DmOpError("vmport_set_regs", -reply.rc)

    # -------------------------------------------------------------- libxenforeignmemory

    def map_resource(self, domid: int, sid: int, frame: int, nr: int = 1) -> list[mmap.mmap]:
        """Map ioreq-server frames (0: buffered ring, 1: slots, 0x100 on: vmport regs)."""
        reply, fds = self._call(ctl.CTL_MAP_RESOURCE, domid,
                                (dmop.XENMEM_resource_ioreq_server, sid, frame, nr))
        try:
            if reply.rc:
                raise DmOpError("map_resource", -reply.rc)
            return [mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)

    def map_guest_memory(self, domid: int) -> mmap.mmap:
        reply, fds = self._call(ctl.CTL_MAP_GUEST_MEMORY, domid)
        try:
            if reply.rc or len(fds) != 1:
                raise DmOpError("map_guest_memory", -reply.rc if reply.rc else 22)
            self.guest_ram_size = reply.value
            mapped = int.from_bytes(reply.payload[:8], "little") if len(reply.payload) >= 8 \
                else reply.value
            return mmap.mmap(fds[0], mapped, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            for fd in fds:
                os.close(fd)

    # -------------------------------------------------------------- libxenevtchn

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        reply, fds = self._call(ctl.CTL_BIND_EVTCHN, domid, (remote_port, 0, 0, 0))
        if reply.rc or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise DmOpError("bind_interdomain", -reply.rc if reply.rc else 22)
        return EventChannel(remote_port, fds[0], fds[1])
