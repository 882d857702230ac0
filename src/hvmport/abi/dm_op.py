"""xen/include/public/hvm/dm_op.h (and the hvm_op.h/memory.h bits it leans on), v14 flavour."""

from __future__ import annotations

import struct

from hvmport.abi.layout import Field, StructLayout

__HYPERVISOR_dm_op = 41

XEN_DMOP_create_ioreq_server = 1
XEN_DMOP_get_ioreq_server_info = 2
XEN_DMOP_map_io_range_to_ioreq_server = 3
XEN_DMOP_unmap_io_range_from_ioreq_server = 4
XEN_DMOP_set_ioreq_server_state = 5
XEN_DMOP_destroy_ioreq_server = 6
XEN_DMOP_set_isa_irq_level = 9
XEN_DMOP_remote_shutdown = 12
XEN_DMOP_map_mem_type_to_ioreq_server = 15
XEN_DMOP_set_irq_level = 19
XEN_DMOP_nr_vcpus = 20

XEN_DMOP_no_gfns = 1

XEN_DMOP_IO_RANGE_PORT = 0
XEN_DMOP_IO_RANGE_MEMORY = 1
XEN_DMOP_IO_RANGE_PCI = 2
XEN_DMOP_IO_RANGE_TIMEOFFSET = 7
XEN_DMOP_IO_RANGE_VMWARE_PORT = 9

# sched.h: the reasons of SCHEDOP_shutdown, which XEN_DMOP_remote_shutdown carries.
SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_MAX = 4

HVM_IOREQSRV_BUFIOREQ_OFF = 0
HVM_IOREQSRV_BUFIOREQ_LEGACY = 1
HVM_IOREQSRV_BUFIOREQ_ATOMIC = 2
HVM_IOREQSRV_BUFIOREQ_MASK = 3
HVM_IOREQSRV_DISABLE_VMPORT = 4
HVM_IOREQSRV_FLAGS_MASK = 7

# hvmport extensions to the create flags, above Xen's mask. A hypervisor that does not know
# them refuses them (-EINVAL), so a device model can probe for them safely.
#: Deliver VMWARE_PORT requests with QEMU's fallback type number 3 instead of 9.
HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE = 1 << 3
#: Bits 4-5: how VMWARE_PORT requests carry the guest's registers (issue 6). 0 is v14's
#: registers page, so a device model that never sets these bits gets v14's behaviour.
HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT = 4
HVMPORT_IOREQSRV_VMPORT_TRANSPORT_MASK = 3 << HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT
#: v14: EAX in ``data``, EBX/ECX/EDX/ESI/EDI in the 20-byte vmware_regs page entry.
HVMPORT_VMPORT_TRANSPORT_REGS_PAGE = 0
#: Paul Durrant's proposal: all six registers inside ioreq_t itself, no extra page.
HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION = 1
#: Jan Beulich's proposal: a 128-byte entry per vCPU with every 64-bit GPR except RSP.
HVMPORT_VMPORT_TRANSPORT_GPR64 = 2
#: The pre-patch world: a plain PIO request; registers fetched and stored with two calls.
HVMPORT_VMPORT_TRANSPORT_THREE_EXCHANGE = 3
HVMPORT_IOREQSRV_EXT_MASK = (HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE
                             | HVMPORT_IOREQSRV_VMPORT_TRANSPORT_MASK)

MAX_NR_IOREQ_SERVERS = 8
MAX_NR_IO_RANGES = 256

# memory.h: XENMEM_acquire_resource.
XENMEM_acquire_resource = 28
XENMEM_resource_ioreq_server = 0
XENMEM_resource_ioreq_server_frame_bufioreq = 0


def XENMEM_resource_ioreq_server_frame_ioreq(n: int) -> int:
    return 1 + n


#: hvmport extension (review point R2): the vmport registers page of an ioreq server as a
#: resource frame, which v14 lacked. Far above any ioreq-page frame (1 + n for n < 255).
HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT = 0x100

XEN_DM_OP_SIZE = 32
XEN_DM_OP_UNION_OFFSET = 8
XEN_DM_OP_UNION_SIZE = 24

CREATE_IOREQ_SERVER_LAYOUT = StructLayout(
    "xen_dm_op_create_ioreq_server", 6,
    (Field("flags", 0, 1), Field("pad", 1, 3, 3), Field("id", 4, 2)),
)
GET_IOREQ_SERVER_INFO_LAYOUT = StructLayout(
    "xen_dm_op_get_ioreq_server_info", 24,
    (
        Field("id", 0, 2), Field("flags", 2, 2), Field("bufioreq_port", 4, 4),
        Field("ioreq_gfn", 8, 8), Field("bufioreq_gfn", 16, 8),
    ),
)
IOREQ_SERVER_RANGE_LAYOUT = StructLayout(
    "xen_dm_op_ioreq_server_range", 24,
    (
        Field("id", 0, 2), Field("pad", 2, 2), Field("type", 4, 4), Field("start", 8, 8),
        Field("end", 16, 8),
    ),
)
SET_IOREQ_SERVER_STATE_LAYOUT = StructLayout(
    "xen_dm_op_set_ioreq_server_state", 4,
    (Field("id", 0, 2), Field("enabled", 2, 1), Field("pad", 3, 1)),
)
DESTROY_IOREQ_SERVER_LAYOUT = StructLayout(
    "xen_dm_op_destroy_ioreq_server", 4,
    (Field("id", 0, 2), Field("pad", 2, 2)),
)
REMOTE_SHUTDOWN_LAYOUT = StructLayout(
    "xen_dm_op_remote_shutdown", 4, (Field("reason", 0, 4),),
)
SET_ISA_IRQ_LEVEL_LAYOUT = StructLayout(
    "xen_dm_op_set_isa_irq_level", 2,
    (Field("isa_irq", 0, 1), Field("level", 1, 1)),
)
XEN_DM_OP_LAYOUT = StructLayout(
    "xen_dm_op", XEN_DM_OP_SIZE,
    (Field("op", 0, 4), Field("pad", 4, 4), Field("u", 8, XEN_DM_OP_UNION_SIZE)),
)
XEN_MEM_ACQUIRE_RESOURCE_LAYOUT = StructLayout(
    "xen_mem_acquire_resource", 32,
    (
        Field("domid", 0, 2), Field("type", 2, 2), Field("id", 4, 4), Field("nr_frames", 8, 4),
        Field("pad", 12, 4), Field("frame", 16, 8), Field("frame_list", 24, 8),
    ),
)

LAYOUTS = (
    CREATE_IOREQ_SERVER_LAYOUT,
    GET_IOREQ_SERVER_INFO_LAYOUT,
    IOREQ_SERVER_RANGE_LAYOUT,
    SET_IOREQ_SERVER_STATE_LAYOUT,
    DESTROY_IOREQ_SERVER_LAYOUT,
    SET_ISA_IRQ_LEVEL_LAYOUT,
    REMOTE_SHUTDOWN_LAYOUT,
    XEN_DM_OP_LAYOUT,
    XEN_MEM_ACQUIRE_RESOURCE_LAYOUT,
)

# Codecs for the union members, offsets relative to the start of the union.
CREATE = struct.Struct("<B3sH")
GET_INFO = struct.Struct("<HHIQQ")
RANGE = struct.Struct("<HHIQQ")
SET_STATE = struct.Struct("<HBB")
DESTROY = struct.Struct("<HH")
ISA_IRQ = struct.Struct("<BB")
REMOTE_SHUTDOWN = struct.Struct("<I")
HEADER = struct.Struct("<II")


def encode(op: int, member: bytes, pad: int = 0) -> bytes:
    """A whole ``struct xen_dm_op``: header, then the member padded to the union size."""
    if len(member) > XEN_DM_OP_UNION_SIZE:
        raise ValueError("dm_op member larger than the union")
    return HEADER.pack(op, pad) + member.ljust(XEN_DM_OP_UNION_SIZE, b"\0")
