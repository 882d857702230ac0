"""xen/include/public/hvm/ioreq.h and params.h as the v14 series leaves them.

Byte-exact, little-endian, x86-64. Names are Xen's, verbatim. The codecs take a private
``bytes`` copy of a slot (one fetch), never a live view of shared memory.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from hvmport.abi.layout import BitField, Field, StructLayout

Buffer = bytes | bytearray | memoryview | mmap.mmap

# Directions and slot states.
IOREQ_READ = 1
IOREQ_WRITE = 0

STATE_IOREQ_NONE = 0
STATE_IOREQ_READY = 1
STATE_IOREQ_INPROCESS = 2
STATE_IORESP_READY = 3

# Request types. 3 is QEMU's fallback number for VMWARE_PORT when Xen's headers lack it
# (hw/i386/xen/xen-hvm.c); 9 is what the v14 patch assigns.
IOREQ_TYPE_PIO = 0
IOREQ_TYPE_COPY = 1
IOREQ_TYPE_PCI_CONFIG = 2
IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT = 3
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8
IOREQ_TYPE_VMWARE_PORT = 9

IOREQ_BUFFER_SLOT_NUM = 511
IOREQ_SIZE = 32
BUF_IOREQ_SIZE = 8
PAGE_SIZE = 4096
VMWARE_REGS_SIZE = 20
#: hvmport extension: EBP of each vCPU (4 bytes, little-endian, vCPU n at + 4 * n) after
#: the vmport registers slots of a page, for the high-bandwidth backdoor (string I/O on
#: 0x5659), whose cookie half travels in EBP. Xen's page has nothing there.
HVMPORT_VMPORT_EBP_OFFSET = 0xA00
#: vCPUs one 4 KiB page serves: 128 ioreq slots, 204 vmware_regs entries.
IOREQ_SLOTS_PER_PAGE = PAGE_SIZE // IOREQ_SIZE
VMPORT_REGS_PER_PAGE = PAGE_SIZE // VMWARE_REGS_SIZE

# params.h
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_VMPORT_REGS_PFN = 7
HVM_PARAM_BUFIOREQ_EVTCHN = 26
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33

# libxc special pages (xc_dom_x86.c), with v14's ninth page for the vmport registers.
X86_HVM_NR_SPECIAL_PAGES = 9
X86_HVM_END_SPECIAL_REGION = 0xFF000
SPECIALPAGE_PAGING = 0
SPECIALPAGE_ACCESS = 1
SPECIALPAGE_SHARING = 2
SPECIALPAGE_BUFIOREQ = 3
SPECIALPAGE_XENSTORE = 4
SPECIALPAGE_IOREQ = 5
SPECIALPAGE_IDENT_PT = 6
SPECIALPAGE_CONSOLE = 7
SPECIALPAGE_VMPORT_REGS = 8

#: XEN_X86_EMU_VMWARE_PORT: bit 11 of the arch emulation flags (patch 6/8).
XEN_X86_EMU_VMWARE_PORT = 1 << 11


def special_pfn(index: int) -> int:
    return X86_HVM_END_SPECIAL_REGION - X86_HVM_NR_SPECIAL_PAGES + index


IOREQ_LAYOUT = StructLayout(
    "ioreq",
    32,
    (
        Field("addr", 0, 8),
        Field("data", 8, 8),
        Field("count", 16, 4),
        Field("size", 20, 4),
        Field("vp_eport", 24, 4),
        Field("_pad0", 28, 2),
        BitField("state", 240, 4),
        BitField("data_is_ptr", 244, 1),
        BitField("dir", 245, 1),
        BitField("df", 246, 1),
        BitField("_pad1", 247, 1),
        Field("type", 31, 1),
    ),
)

BUF_IOREQ_LAYOUT = StructLayout(
    "buf_ioreq",
    8,
    (
        Field("type", 0, 1),
        BitField("pad", 8, 1),
        BitField("dir", 9, 1),
        BitField("size", 10, 2),
        BitField("addr", 12, 20),
        Field("data", 4, 4),
    ),
)

BUFFERED_IOPAGE_LAYOUT = StructLayout(
    "buffered_iopage",
    4096,
    (
        Field("read_pointer", 0, 4),
        Field("write_pointer", 4, 4),
        Field("buf_ioreq", 8, IOREQ_BUFFER_SLOT_NUM * 8, IOREQ_BUFFER_SLOT_NUM),
    ),
)

SHARED_IOPAGE_LAYOUT = StructLayout(
    "shared_iopage",
    32,
    (Field("vcpu_ioreq", 0, 32, 1),),
)

VMWARE_REGS_LAYOUT = StructLayout(
    "vmware_regs",
    20,
    (
        Field("esi", 0, 4),
        Field("edi", 4, 4),
        Field("ebx", 8, 4),
        Field("ecx", 12, 4),
        Field("edx", 16, 4),
    ),
)

SHARED_VMPORT_IOPAGE_LAYOUT = StructLayout(
    "shared_vmport_iopage",
    20,
    (Field("vcpu_vmport_regs", 0, 20, 1),),
)

#: hvmport extension (issue 6, review point R23 and Jan Beulich's proposal): the gpr64
#: transport's per-vCPU entry. Every 64-bit GPR except RSP, in the order of the x86
#: register numbers without RSP, padded from 120 to 128 bytes (a multiple of 16).
GPR64_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
               "r12", "r13", "r14", "r15")
VMPORT_GPR64_ENTRY_SIZE = 128
VMPORT_GPR64_PER_PAGE = PAGE_SIZE // VMPORT_GPR64_ENTRY_SIZE

VMPORT_GPR64_LAYOUT = StructLayout(
    "vmport_gpr64",
    VMPORT_GPR64_ENTRY_SIZE,
    (*(Field(name, 8 * i, 8) for i, name in enumerate(GPR64_NAMES)),
     Field("_pad", 120, 8)),
)

LAYOUTS = (
    IOREQ_LAYOUT,
    BUF_IOREQ_LAYOUT,
    BUFFERED_IOPAGE_LAYOUT,
    SHARED_IOPAGE_LAYOUT,
    VMWARE_REGS_LAYOUT,
    SHARED_VMPORT_IOPAGE_LAYOUT,
    VMPORT_GPR64_LAYOUT,
)

_IOREQ = struct.Struct("<QQIIIHBB")
_VMREGS = struct.Struct("<IIIII")


@dataclass(slots=True)
class IoReq:
    """One ``ioreq_t``, decoded. ``_pad0``/``_pad1`` are kept so a round trip is exact."""

    addr: int = 0
    data: int = 0
    count: int = 1
    size: int = 0
    vp_eport: int = 0
    state: int = STATE_IOREQ_NONE
    data_is_ptr: bool = False
    dir: int = IOREQ_WRITE
    df: bool = False
    type: int = IOREQ_TYPE_PIO
    pad0: int = 0
    pad1: int = 0

    def pack(self) -> bytes:
        bits = (
            (self.state & 0xF)
            | (int(self.data_is_ptr) << 4)
            | ((self.dir & 1) << 5)
            | (int(self.df) << 6)
            | ((self.pad1 & 1) << 7)
        )
        return _IOREQ.pack(
            self.addr, self.data, self.count, self.size, self.vp_eport, self.pad0, bits,
            self.type,
        )

    @classmethod
    def unpack(cls, raw: Buffer, offset: int = 0) -> IoReq:
        addr, data, count, size, port, pad0, bits, typ = _IOREQ.unpack_from(raw, offset)
        return cls(
            addr, data, count, size, port, bits & 0xF, bool(bits & 0x10), (bits >> 5) & 1,
            bool(bits & 0x40), typ, pad0, bits >> 7,
        )


#: Byte offset of the state/data_is_ptr/dir/df byte in a slot (the only byte both sides
#: write: the hypervisor sets READY/NONE, the device model INPROCESS/IORESP_READY).
IOREQ_STATE_BYTE = 30
IOREQ_DATA_OFFSET = 8


@dataclass(slots=True)
class VmwareRegs:
    esi: int = 0
    edi: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def pack(self) -> bytes:
        return _VMREGS.pack(self.esi, self.edi, self.ebx, self.ecx, self.edx)

    @classmethod
    def unpack(cls, raw: Buffer, offset: int = 0) -> VmwareRegs:
        return cls(*_VMREGS.unpack_from(raw, offset))


_BUF = struct.Struct("<II")
BUF_SIZE_CODES = {1: 0, 2: 1, 4: 2, 8: 3}
BUF_SIZE_FROM_CODE = {0: 1, 1: 2, 2: 4, 3: 8}


@dataclass(slots=True)
class BufIoReq:
    type: int
    dir: int
    size_code: int
    addr: int
    data: int
    pad: int = 0

    def pack(self) -> bytes:
        word = (
            (self.type & 0xFF) | ((self.pad & 1) << 8) | ((self.dir & 1) << 9)
            | ((self.size_code & 3) << 10) | ((self.addr & 0xFFFFF) << 12)
        )
        return _BUF.pack(word, self.data & 0xFFFFFFFF)

    @classmethod
    def unpack(cls, raw: Buffer, offset: int = 0) -> BufIoReq:
        word, data = _BUF.unpack_from(raw, offset)
        return cls(word & 0xFF, (word >> 9) & 1, (word >> 10) & 3, word >> 12, data,
                   (word >> 8) & 1)


_GPR64 = struct.Struct("<15Q8x")


def pack_gpr64(values: tuple[int, ...]) -> bytes:
    """One ``vmport_gpr64`` entry from the 15 registers in ``GPR64_NAMES`` order."""
    return _GPR64.pack(*values)


def unpack_gpr64(raw: Buffer, offset: int = 0) -> tuple[int, ...]:
    return tuple(_GPR64.unpack_from(raw, offset))


# The ioreq-union transport (hvmport extension, issue 6; Paul Durrant's proposal). A
# VMWARE_PORT request carries the six 32-bit registers in the fields a port access does not
# need, and the port and access size in the padding:
#   data  = EAX | EDX << 32        addr = EBX | ECX << 32
#   count = ESI                    size = EDI
#   _pad0 = (port - 0x5658) | access size << 8
# The device model writes back data, addr, count and size; everything else is frozen.
UNION_PORT_BASE = 0x5658


@dataclass(slots=True, frozen=True)
class UnionRegs:
    eax: int
    ebx: int
    ecx: int
    edx: int
    esi: int
    edi: int

    def fields(self) -> tuple[int, int, int, int]:
        """(addr, data, count, size) for ``ioreq_t``."""
        return (self.ebx | self.ecx << 32, self.eax | self.edx << 32, self.esi, self.edi)

    @classmethod
    def from_fields(cls, addr: int, data: int, count: int, size: int) -> UnionRegs:
        return cls(data & 0xFFFFFFFF, addr & 0xFFFFFFFF, addr >> 32 & 0xFFFFFFFF,
                   data >> 32 & 0xFFFFFFFF, count & 0xFFFFFFFF, size & 0xFFFFFFFF)


def union_access(port: int, size: int) -> int:
    """``_pad0`` of a union request: which backdoor port, and how wide the access was."""
    return (port - UNION_PORT_BASE) & 0xFF | (size & 0xFF) << 8


def union_port_size(pad0: int) -> tuple[int, int]:
    return UNION_PORT_BASE + (pad0 & 0xFF), pad0 >> 8
