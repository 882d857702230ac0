"""dm_op: decode, validate and apply the very bytes a device model passes.

The input is ``struct xen_dm_op`` (op, pad, union) exactly as a device model's library
builds it; the output is the same struct with the OUT fields filled, plus the return code
(0 or a negative errno, Xen's numbers) and any effect the adapter must carry out.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from hvmport.abi import dm_op as abi
from hvmport.core.domain import Domain


@dataclass(slots=True, frozen=True)
class IrqLevel:
    irq: int
    level: int


@dataclass(slots=True, frozen=True)
class Shutdown:
    """XEN_DMOP_remote_shutdown: the domain is to shut down for ``reason`` (SHUTDOWN_*)."""

    reason: int


Effect = IrqLevel | Shutdown


@dataclass(slots=True)
class DmOpResult:
    rc: int
    out: bytes
    effects: list[Effect] = field(default_factory=list)


#: Size of each supported op's union member; an op number absent here is -EOPNOTSUPP.
MEMBER_SIZES = {
    abi.XEN_DMOP_create_ioreq_server: abi.CREATE.size,
    abi.XEN_DMOP_get_ioreq_server_info: abi.GET_INFO.size,
    abi.XEN_DMOP_map_io_range_to_ioreq_server: abi.RANGE.size,
    abi.XEN_DMOP_unmap_io_range_from_ioreq_server: abi.RANGE.size,
    abi.XEN_DMOP_set_ioreq_server_state: abi.SET_STATE.size,
    abi.XEN_DMOP_destroy_ioreq_server: abi.DESTROY.size,
    abi.XEN_DMOP_set_isa_irq_level: abi.ISA_IRQ.size,
    abi.XEN_DMOP_remote_shutdown: abi.REMOTE_SHUTDOWN.size,
}

U = abi.XEN_DM_OP_UNION_OFFSET


def apply(domain: Domain, caller: int, buf: bytes) -> DmOpResult:
    """Run one dm_op from emulator ``caller`` against ``domain``. Never raises on bad input."""
    if len(buf) < U:
        return DmOpResult(-errno.EFAULT, b"")
    op, pad = abi.HEADER.unpack_from(buf, 0)
    size = MEMBER_SIZES.get(op)
    if size is None:
        return DmOpResult(-errno.EOPNOTSUPP, bytes(buf))
    if len(buf) < U + size:
        return DmOpResult(-errno.EFAULT, bytes(buf))
    if pad:
        return DmOpResult(-errno.EINVAL, bytes(buf))
    out = bytearray(buf)
    rc = _dispatch(domain, caller, op, out)
    return DmOpResult(rc[0], bytes(out), rc[1])


def _dispatch(domain: Domain, caller: int, op: int, out: bytearray) -> tuple[int, list[Effect]]:
    if op == abi.XEN_DMOP_create_ioreq_server:
        flags, pad, _ = abi.CREATE.unpack_from(out, U)
        if any(pad):
            return -errno.EINVAL, []
        rc, sid = domain.create_server(caller, flags)
        if rc == 0:
            abi.CREATE.pack_into(out, U, flags, pad, sid)
        return rc, []
    if op == abi.XEN_DMOP_get_ioreq_server_info:
        sid, flags, _, _, _ = abi.GET_INFO.unpack_from(out, U)
        if flags & ~abi.XEN_DMOP_no_gfns:
            return -errno.EINVAL, []
        rc, info = domain.get_server_info(caller, sid, not flags & abi.XEN_DMOP_no_gfns)
        if rc == 0:
            abi.GET_INFO.pack_into(out, U, sid, flags, info.bufioreq_port, info.ioreq_gfn,
                                   info.bufioreq_gfn)
        return rc, []
    if op in (abi.XEN_DMOP_map_io_range_to_ioreq_server,
              abi.XEN_DMOP_unmap_io_range_from_ioreq_server):
        sid, pad16, rtype, start, end = abi.RANGE.unpack_from(out, U)
        if pad16:
            return -errno.EINVAL, []
        if op == abi.XEN_DMOP_map_io_range_to_ioreq_server:
            return domain.map_range(caller, sid, rtype, start, end), []
        return domain.unmap_range(caller, sid, rtype, start, end), []
    if op == abi.XEN_DMOP_set_ioreq_server_state:
        sid, enabled, pad8 = abi.SET_STATE.unpack_from(out, U)
        if pad8:
            return -errno.EINVAL, []
        return domain.set_server_state(caller, sid, bool(enabled)), []
    if op == abi.XEN_DMOP_destroy_ioreq_server:
        sid, pad16 = abi.DESTROY.unpack_from(out, U)
        if pad16:
            return -errno.EINVAL, []
        return domain.destroy_server(caller, sid), []
    if op == abi.XEN_DMOP_remote_shutdown:
        (reason,) = abi.REMOTE_SHUTDOWN.unpack_from(out, U)
        # A crashed domain stays crashed: its first reason is the one that counts.
        if reason > abi.SHUTDOWN_MAX:
            return -errno.EINVAL, []
        if domain.crashed:
            return 0, []
        return 0, [Shutdown(reason)]
    irq, level = abi.ISA_IRQ.unpack_from(out, U)
    rc = domain.set_isa_irq_level(irq, level)
    return rc, [IrqLevel(irq, level)] if rc == 0 else []


# Encoders, for device models and tests: the bytes libxendevicemodel would pass.

def create_ioreq_server(flags: int) -> bytes:
    return abi.encode(abi.XEN_DMOP_create_ioreq_server, abi.CREATE.pack(flags, b"\0\0\0", 0))


def get_ioreq_server_info(sid: int, flags: int = 0) -> bytes:
    return abi.encode(abi.XEN_DMOP_get_ioreq_server_info, abi.GET_INFO.pack(sid, flags, 0, 0, 0))


def map_io_range(sid: int, rtype: int, start: int, end: int) -> bytes:
    return abi.encode(abi.XEN_DMOP_map_io_range_to_ioreq_server,
                      abi.RANGE.pack(sid, 0, rtype, start, end))


def unmap_io_range(sid: int, rtype: int, start: int, end: int) -> bytes:
    return abi.encode(abi.XEN_DMOP_unmap_io_range_from_ioreq_server,
                      abi.RANGE.pack(sid, 0, rtype, start, end))


def set_ioreq_server_state(sid: int, enabled: bool) -> bytes:
    return abi.encode(abi.XEN_DMOP_set_ioreq_server_state,
                      abi.SET_STATE.pack(sid, int(enabled), 0))


def destroy_ioreq_server(sid: int) -> bytes:
    return abi.encode(abi.XEN_DMOP_destroy_ioreq_server, abi.DESTROY.pack(sid, 0))


def remote_shutdown(reason: int) -> bytes:
    return abi.encode(abi.XEN_DMOP_remote_shutdown, abi.REMOTE_SHUTDOWN.pack(reason))


def set_isa_irq_level(irq: int, level: int) -> bytes:
    return abi.encode(abi.XEN_DMOP_set_isa_irq_level, abi.ISA_IRQ.pack(irq, level))
