"""The control socket between a hypervisor process and its device models.

This is hvmport's own wire format, playing the part of the hypercall boundary: a device
model sends ``struct xen_dm_op`` bytes exactly as libxendevicemodel would hand them to
Xen, and asks for the things Xen's other libraries give (foreign memory, resource frames,
event channels). File descriptors travel with SCM_RIGHTS on a SOCK_SEQPACKET socket, so
each request and reply is one message.

Request:  u32 kind, u16 domid, u16 pad, u32 arg[4], then a payload (the dm_op bytes).
Reply:    i32 rc (0 or -errno), u32 nfds, u64 value, then a payload; fds as ancillary data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

REQUEST = struct.Struct("<IHH4I")
REPLY = struct.Struct("<iIQ")
MAX_MESSAGE = 4096
MAX_FDS = 16

#: Bind this connection to one domain, like xendevicemodel_restrict().
CTL_RESTRICT = 1
#: arg: none; payload: struct xen_dm_op. Reply payload: the struct with OUT fields.
CTL_DM_OP = 2
#: arg: type, id, frame, nr_frames (XENMEM_acquire_resource). Reply: one memfd per frame.
CTL_MAP_RESOURCE = 3
#: arg: none. Reply: the guest-memory memfd, value = its size in bytes.
CTL_MAP_GUEST_MEMORY = 4
#: arg: remote port. Reply: two eventfds, [to device model, to hypervisor].
CTL_BIND_EVTCHN = 5
#: arg: none. Reply: value = number of vCPUs.
CTL_NR_VCPUS = 6

#: hvmport extensions, numbered apart from the libraries' calls above. Xen has no dm_op for
#: these (its toolstack pauses a domain); QMP's stop and cont need them from the device model.
#: arg: none. The vCPUs stop at their next exit; the reply does not wait for them.
CTL_PAUSE = 0x100
#: arg: none. Undoes CTL_PAUSE (pauses do not nest, as QMP's stop/cont do not).
CTL_UNPAUSE = 0x101

#: The three-exchange register transport (issue 6): the second and third exchanges of a
#: backdoor call forwarded as a plain PIO request. Both are refused (-ENOENT) unless the
#: vCPU has a backdoor call in flight to a three-exchange server this connection owns.
#: arg: vCPU. Reply payload: u32 EAX, then a struct vmware_regs (ESI, EDI, EBX, ECX, EDX).
CTL_VMPORT_GET_REGS = 0x102
#: arg: vCPU; payload: a struct vmware_regs, handed back when the request completes. It
#: must come before the slot is answered (IORESP_READY), which ends the call.
CTL_VMPORT_SET_REGS = 0x103

KINDS = {CTL_RESTRICT, CTL_DM_OP, CTL_MAP_RESOURCE, CTL_MAP_GUEST_MEMORY, CTL_BIND_EVTCHN,
         CTL_NR_VCPUS, CTL_PAUSE, CTL_UNPAUSE, CTL_VMPORT_GET_REGS, CTL_VMPORT_SET_REGS}


@dataclass(slots=True, frozen=True)
class Request:
    kind: int
    domid: int
    args: tuple[int, int, int, int]
    payload: bytes

    def pack(self) -> bytes:
        return REQUEST.pack(self.kind, self.domid, 0, *self.args) + self.payload

    @classmethod
    def unpack(cls, raw: bytes) -> Request | None:
        """None for a message too short to be a request (the sender is at fault)."""
        if len(raw) < REQUEST.size:
            return None
        kind, domid, _pad, a0, a1, a2, a3 = REQUEST.unpack_from(raw)
        return cls(kind, domid, (a0, a1, a2, a3), raw[REQUEST.size:])


@dataclass(slots=True, frozen=True)
class Reply:
    rc: int
    value: int = 0
    payload: bytes = b""
    nfds: int = 0

    def pack(self) -> bytes:
        return REPLY.pack(self.rc, self.nfds, self.value) + self.payload

    @classmethod
    def unpack(cls, raw: bytes) -> Reply:
        if len(raw) < REPLY.size:
            raise ValueError("short reply from the hypervisor")
        rc, nfds, value = REPLY.unpack_from(raw)
        return cls(rc, value, raw[REPLY.size:], nfds)
