"""The hypervisor's end of the control socket: the device models' "hypercalls".

One thread accepts connections and serves each in turn with ``select``; every request is
small and handled under the domain lock. Each connection is one emulator identity: the ids
are ours to assign, so a device model cannot pose as another. A device model is not
trusted: anything malformed gets an errno, and a connection that closes while it still
owns ioreq servers crashes the domain with the name and pid of the process.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hvmport import unixsock
from hvmport.abi import control as ctl
from hvmport.abi import dm_op as dmop
from hvmport.core import dmop as ops
from hvmport.core.domain import Domain
from hvmport.hv import evtchn
from hvmport.hv.evtchn import Channel
from hvmport.hv.memory import GuestMemory
from hvmport.hv.shmem import MemfdPages

IrqSink = Callable[[int, int], None]


class Lifecycle(Protocol):
    """What the device models may ask of the domain as a whole (hvmport's run provides it)."""

    def pause(self) -> None: ...

    def unpause(self) -> None: ...

    def shutdown(self, reason: int, who: str) -> None: ...


@dataclass(slots=True)
class Peer:
    sock: socket.socket
    emulator: int
    pid: int
    restricted: int | None = None


class ControlServer:
    def __init__(self, path: str, domain: Domain, lock: threading.Lock, memory: GuestMemory,
                 pages: MemfdPages, channels: dict[int, Channel],
                 irq: IrqSink | None = None,
                 describe_peer: Callable[[int], str] | None = None,
                 lifecycle: Lifecycle | None = None) -> None:
        self.path = path
        self.lifecycle = lifecycle
        self.domain = domain
        self.lock = lock
        self.memory = memory
        self.pages = pages
        self.channels = channels
        self.irq = irq
        self.describe_peer = describe_peer
        self.listener = unixsock.listen(path, kind=socket.SOCK_SEQPACKET)
        self._stop_r, self._stop_w = os.pipe()
        self._peers: dict[int, Peer] = {}
        self._next_emulator = 1
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        #: Set when a peer first connects; lets the launcher wait for its device model.
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        for peer in list(self._peers.values()):
            peer.sock.close()
        self._peers.clear()
        self.listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        unixsock.remove(self.path)

    # ------------------------------------------------------------------ loop

    def _serve(self) -> None:
        while True:
            fds = [self._stop_r, self.listener.fileno(), *self._peers]
            ready, _, _ = select.select(fds, [], [])
            if self._stop_r in ready:
                return
            if self.listener.fileno() in ready:
                self._accept()
            for fd in ready:
                peer = self._peers.get(fd)
                if peer is not None:
                    self._receive(peer)

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        peer = Peer(sock, self._next_emulator, pid)
        self._next_emulator += 1
        self._peers[sock.fileno()] = peer
        self.connected.set()

    def _receive(self, peer: Peer) -> None:
        try:
            raw, anc, _flags, _ = peer.sock.recvmsg(ctl.MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
        except OSError:
            raw = b""
            anc = []
        for level, kind, data in anc:  # a device model has no business sending us fds
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", data[: len(data) - len(data) % 4]):
                    os.close(fd)
        if not raw:
            self._gone(peer)
            return
        request = ctl.Request.unpack(raw)
        if request is None:
            self._reply(peer, ctl.Reply(-errno.EINVAL))
            return
        try:
            with self.lock:
                reply, fds = self._handle(peer, request)
        except Exception as e:  # a host bug: answer, say so, and keep serving
            print(f"hvmport: control request {request.kind} failed: {e!r}", file=sys.stderr)
            reply, fds = ctl.Reply(-errno.EIO), []
        self._reply(peer, reply, fds)

    def _reply(self, peer: Peer, reply: ctl.Reply, fds: list[int] | None = None) -> None:
        fds = fds or []
        msg = ctl.Reply(reply.rc, reply.value, reply.payload, len(fds)).pack()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            peer.sock.sendmsg([msg], anc)
        except OSError:
            self._gone(peer)

    def _gone(self, peer: Peer) -> None:
        self._peers.pop(peer.sock.fileno(), None)
        peer.sock.close()
        with self.lock:
            owned = [sid for sid, s in self.domain.servers.items() if s.emulator == peer.emulator]
        if not owned:
            return
        who = self._who(peer)
        with self.lock:
            self.domain.crash(f"{who}; it closed its control connection while it owned "
                              f"ioreq server(s) {', '.join(map(str, owned))}")

    def _who(self, peer: Peer) -> str:
        return (self.describe_peer(peer.pid) if self.describe_peer is not None
                else f"device model (pid {peer.pid})")

    # ------------------------------------------------------------------ requests

    def _handle(self, peer: Peer, req: ctl.Request) -> tuple[ctl.Reply, list[int]]:
        if req.kind not in ctl.KINDS:
            return ctl.Reply(-errno.EOPNOTSUPP), []
        if req.kind == ctl.CTL_RESTRICT:
            if req.domid != self.domain.domid or peer.restricted not in (None, req.domid):
                return ctl.Reply(-errno.EPERM), []
            peer.restricted = req.domid
            return ctl.Reply(0), []
        # Like a restricted libxendevicemodel handle: only the bound domain.
        if req.domid != self.domain.domid or peer.restricted not in (None, req.domid):
            return ctl.Reply(-errno.EPERM), []
        if req.kind == ctl.CTL_DM_OP:
            result = ops.apply(self.domain, peer.emulator, req.payload)
            for effect in result.effects:
                if isinstance(effect, ops.Shutdown):
                    if self.lifecycle is not None:
                        self.lifecycle.shutdown(effect.reason,
                                                f"device model (pid {peer.pid})")
                elif self.irq is not None:
                    self.irq(effect.irq, effect.level)
            return ctl.Reply(result.rc, payload=result.out), []
        if req.kind in (ctl.CTL_PAUSE, ctl.CTL_UNPAUSE):
            if self.lifecycle is None:
                return ctl.Reply(-errno.EOPNOTSUPP), []
            if req.kind == ctl.CTL_PAUSE:
                self.lifecycle.pause()
            else:
                self.lifecycle.unpause()
            return ctl.Reply(0), []
        if req.kind == ctl.CTL_VMPORT_GET_REGS:
            rc, raw = self.domain.vmport_get_regs(peer.emulator, req.args[0])
            return ctl.Reply(rc, payload=raw), []
        if req.kind == ctl.CTL_VMPORT_SET_REGS:
            return ctl.Reply(self.domain.vmport_set_regs(peer.emulator, req.args[0],
                                                         req.payload)), []
        if req.kind == ctl.CTL_NR_VCPUS:
            return ctl.Reply(0, self.domain.nr_vcpus), []
        if req.kind == ctl.CTL_MAP_GUEST_MEMORY:
            # value: the guest's RAM; payload (hvmport extension): how much to map, RAM
            # and the hypervisor's string-I/O staging area after it.
            return (ctl.Reply(0, self.memory.size,
                              payload=self.memory.mapped_size.to_bytes(8, "little")),
                    [self.memory.fd])
        if req.kind == ctl.CTL_MAP_RESOURCE:
            return self._map_resource(peer, *req.args)
        return self._bind(peer, req.args[0])

    def _map_resource(self, peer: Peer, rtype: int, sid: int, frame: int,
                      nr: int) -> tuple[ctl.Reply, list[int]]:
        if rtype != dmop.XENMEM_resource_ioreq_server:
            return ctl.Reply(-errno.EOPNOTSUPP), []
        if not 1 <= nr <= ctl.MAX_FDS:
            return ctl.Reply(-errno.EINVAL), []
        fds = []
        for f in range(frame, frame + nr):
            rc, view = self.domain.acquire_resource(peer.emulator, sid, f)
            if rc or view is None:
                return ctl.Reply(rc or -errno.EINVAL), []
            fds.append(self.pages.fd_of(view))
        return ctl.Reply(0), fds

    def _bind(self, peer: Peer, port: int) -> tuple[ctl.Reply, list[int]]:
        for server in self.domain.servers.values():
            if port in server.vcpu_ports or (port and port == server.buf_port):
                if server.emulator != peer.emulator:
                    return ctl.Reply(-errno.EPERM), []
                chan = evtchn.channel(self.channels, port)
                return ctl.Reply(0, port), [chan.to_dm, chan.to_hv]
        return ctl.Reply(-errno.EINVAL), []
