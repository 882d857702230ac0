"""The KVM CPU backend: guest code runs in a KVM vCPU, port I/O comes back to the handler.

How it works, and what was measured on this machine's KVM (nested, PVM-based, API 12):

Registers
    Registers travel through ``KVM_CAP_SYNC_REGS``: ``kvm_valid_regs`` asks KVM to store regs
    and sregs in the run page on every exit, and ``set_regs`` writes them back there and marks
    them dirty, so an exit costs no register ioctl. ``KvmBackend(sync_regs=False)`` (or a KVM
    without the capability) uses KVM_GET_REGS/KVM_SET_REGS/KVM_GET_SREGS instead; both paths
    behave the same and the tests run both. Writing registers at an IN exit makes KVM ignore
    the I/O data in the run page (the guest's EAX becomes the RAX written), so whenever a
    handler called ``set_regs`` at a non-string IN, the backend merges the result into RAX
    itself: 1 and 2 bytes replace AL/AX, 4 bytes zero-extend (what KVM does on its own).

String I/O
    KVM does not say whether an exit came from INS/OUTS. ``count > 1`` is string I/O. For
    ``count == 1`` the backend decodes the instruction bytes through the guest's segments and
    page tables. Where RIP points at an I/O exit differs between KVMs: mainline leaves it on
    the instruction; this PVM-based KVM has it after OUT and non-REP OUTS, and on the
    instruction for IN, INS and REP OUTS (whose RCX/RSI have then already moved: it exits
    once per element). A tiny probe guest measures the convention once per process
    (``_rip_convention``), and the decoder reads forwards or backwards from RIP to match.
    One byte pattern stays ambiguous on a KVM like this one: an OUT immediately followed by
    a REP OUTS to the same port and width. It is decided by the data (an OUT writes
    AL/AX/EAX), then by whether the previous exit was at the same RIP (a REP continuing).
    Decoded answers are cached with the code bytes they came from (see ``_StringDecoder``).

HLT and the in-kernel irqchip
    By default the VM has no in-kernel irqchip: KVM then returns every HLT to user space
    (``KVM_EXIT_HLT``), which ends ``run`` with ``Exit(HALTED)`` at once. This is the default
    because the contract has no interrupt source at all (nothing injects interrupts, and the
    Unicorn backend has no PIC/PIT/LAPIC), and because an in-kernel PIC/PIT would swallow the
    guest's accesses to ports 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 and 0x40-0x43 before the I/O
    handler could see them. ``KvmBackend(irqchip=True)`` creates the irqchip and PIT2
    (without the dummy speaker, so port 0x61 still reaches the handler). Measured here: with
    it, KVM handles HLT in the kernel and the vCPU blocks inside KVM_RUN (mp_state HALTED) —
    with IF=0, forever. A per-VM watchdog thread therefore signals any vCPU that has stayed in
    one KVM_RUN for a whole poll period (``HALT_POLL_SECONDS``); KVM_RUN returns EINTR,
    ``run`` asks KVM_GET_MP_STATE and, if the vCPU is halted with IF=0, returns
    ``Exit(HALTED)``. A halted vCPU with IF=1 keeps waiting there (the PIT may wake it); only
    ``kick`` ends that.

kick()
    ``kick`` sets a flag and ``kvm_run.immediate_exit`` under a lock and sends
    ``KICK_SIGNAL`` (a real-time signal) to the thread inside ``run``. ``run`` blocks that
    signal in its thread and hands KVM a run-time mask without it (KVM_SET_SIGNAL_MASK), so it
    is unblocked only inside KVM_RUN: KVM_RUN returns EINTR, the signal stays pending (it is
    never delivered, so no Python handler and no main thread are involved) and ``run`` drains
    it with sigtimedwait. A kick while ``run`` is between two KVM_RUN calls is caught by
    immediate_exit; a kick before ``run`` is sticky and makes the next ``run`` return KICKED
    at once. KVM_RUN is called through ctypes, which releases the GIL and hands EINTR back
    instead of retrying (PEP 475 retries only in Python's own wrappers), so vCPUs run
    concurrently in their own threads. The thread that called ``run`` keeps ``KICK_SIGNAL``
    blocked afterwards: unblocking could deliver a late kick, whose default action kills.

Costs (this machine, 64-bit guest looping on ``in (%dx), %eax``; µs per exit, best of 5):
    C loop 10.8, bare Python loop 12.5, ``run`` with a data-only handler 14.1, with a
    handler that reads and writes registers 16.9 (C doing the same: 11.1), and 44 on the
    KVM_GET_REGS/KVM_SET_REGS fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import attrgetter
from typing import Final

from hvmport.abi import kvm as k
from hvmport.cpu.base import (
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    CpuidTable,
    Exit,
    ExitKind,
    IoHandler,
    MmioAccess,
    Mode,
    PortAccess,
    Regs,
    StartState,
    VcpuStop,
    VmConfig,
)
from hvmport.errors import HostError
from hvmport.hv.memory import GuestMemory

KVM_DEVICE: Final = "/dev/kvm"
#: The signal ``kick`` and the halt watchdog send to a vCPU thread (kept blocked there).
KICK_SIGNAL: Final = int(signal.SIGRTMIN) + 3
#: How long a vCPU with an in-kernel irqchip may stay in one KVM_RUN before the watchdog
#: checks whether it is halted with interrupts off.
HALT_POLL_SECONDS: Final = 0.05
#: Three pages KVM needs for the real-mode TSS on VMX; above any RAM hvmport gives a guest.
TSS_ADDR: Final = 0xFFFB_D000

_KICK_SET: Final = frozenset({KICK_SIGNAL})

# -- ioctl through libc --------------------------------------------------------------------------
# ctypes rather than fcntl.ioctl: it takes 64-bit arguments and pointers, releases the GIL and
# returns EINTR to us instead of retrying it.

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

#: ioctl request numbers are all >= _IO(KVMIO, 0); capability and exit numbers are small.
_IOCTL_NAMES: Final = {
    value: name for name, value in vars(k).items()
    if name.startswith("KVM_") and isinstance(value, int) and value >= k.KVMIO << 8
}


def _sys(fd: int, request: int, arg: int | ctypes.Structure | None = None) -> int:
    """ioctl that raises OSError (with the request's name) on failure."""
    ptr = ctypes.addressof(arg) if isinstance(arg, ctypes.Structure) else arg
    ret: int = _ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        name = _IOCTL_NAMES.get(request, hex(request))
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def _host_ioctl(fd: int, request: int, arg: int | ctypes.Structure | None = None) -> int:
    """An ioctl that must work (setup, register access): failing, the host is at fault."""
    try:
        return _sys(fd, request, arg)
    except OSError as e:
        raise HostError(f"KVM ioctl failed: {e.strerror}") from e


def probe_kvm(device: str = KVM_DEVICE) -> str | None:
    """None if ``device`` opens and speaks KVM API 12; otherwise why not, in one line."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {device}: {e.strerror}"
    try:
        try:
            version = _sys(fd, k.KVM_GET_API_VERSION)
        except OSError as e:
            return f"{device} does not answer KVM_GET_API_VERSION: {e.strerror}"
        if version != k.KVM_API_VERSION:
            return f"{device} speaks KVM API {version}, not {k.KVM_API_VERSION}"
        return None
    finally:
        os.close(fd)


# -- CPUID --------------------------------------------------------------------------------------

#: (function, index, flags, eax, ebx, ecx, edx), as in struct kvm_cpuid_entry2.
CpuidRow = tuple[int, int, int, int, int, int, int]

_HV_FIRST: Final = 0x4000_0000
_HV_LAST: Final = 0x4FFF_FFFF


def merge_cpuid(
    supported: Iterable[CpuidRow], table: CpuidTable, hypervisor_bit: bool, apic_id: int,
) -> list[CpuidRow]:
    """The CPUID a vCPU gets: KVM's supported leaves, with ``table`` applied.

    KVM's own hypervisor leaves (0x4xxxxxxx, "KVMKVMKVM") are dropped: that range comes from
    ``table`` alone. Other table entries replace KVM's or are added. CPUID.1:ECX[31] follows
    ``hypervisor_bit`` (also over a table's leaf 1), and the APIC ID fields follow ``apic_id``.
    """
    rows: dict[tuple[int, int], list[int]] = {}
    for fn, index, flags, *regs in supported:
        if not _HV_FIRST <= fn <= _HV_LAST:
            rows[(fn, index)] = [fn, index, flags, *regs]
    # A leaf with any subleaf other than 0 in the table is indexed, even if KVM said not:
    # otherwise KVM would answer every subleaf with the first entry.
    indexed = {fn for (fn, _), row in rows.items() if row[2] & k.KVM_CPUID_FLAG_SIGNIFCANT_INDEX}
    indexed |= {leaf for leaf, sub in table if sub != 0}
    for (leaf, sub), (eax, ebx, ecx, edx) in table.items():
        rows[(leaf, sub)] = [leaf, sub, 0, eax, ebx, ecx, edx]
    for row in rows.values():
        if row[0] in indexed:
            row[2] |= k.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        else:
            row[2] &= ~k.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    leaf1 = rows.get((1, 0))
    if leaf1 is not None:
        leaf1[5] = (leaf1[5] | k.CPUID_1_ECX_HYPERVISOR if hypervisor_bit
                    else leaf1[5] & ~k.CPUID_1_ECX_HYPERVISOR)
        leaf1[4] = (leaf1[4] & 0x00FF_FFFF) | ((apic_id & 0xFF) << 24)
    for (fn, _), row in rows.items():
        if fn in (0xB, 0x1F):
            row[6] = apic_id  # x2APIC ID of this logical processor
    return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in sorted(rows.values())]


def _supported_cpuid(kvm_fd: int) -> list[CpuidRow]:
    nent = 64
    while True:
        buf = k.cpuid2_type(nent)()
        buf.nent = nent
        try:
            _sys(kvm_fd, k.KVM_GET_SUPPORTED_CPUID, buf)
        except OSError as e:
            if e.errno == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            raise HostError(f"KVM ioctl failed: {e.strerror}") from e
        entries = buf.entries
        return [
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in entries[: buf.nent]
        ]


def _set_cpuid(vcpu_fd: int, rows: Sequence[CpuidRow]) -> None:
    buf = k.cpuid2_type(len(rows))()
    buf.nent = len(rows)
    entries = buf.entries
    for i, (fn, index, flags, eax, ebx, ecx, edx) in enumerate(rows):
        e = entries[i]
        e.function, e.index, e.flags = fn, index, flags
        e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
    _host_ioctl(vcpu_fd, k.KVM_SET_CPUID2, buf)


# -- start states -------------------------------------------------------------------------------

_CODE_TYPE: Final = 0xB  # execute/read, accessed
_DATA_TYPE: Final = 0x3  # read/write, accessed


def _segment(
    seg: k.KvmSegment, selector: int, base: int, limit: int, type_: int, *,
    db: int = 0, long: int = 0, gran: int = 0,
) -> None:
    seg.selector, seg.base, seg.limit, seg.type = selector, base, limit, type_
    seg.present, seg.dpl, seg.s, seg.db, seg.l, seg.g = 1, 0, 1, db, long, gran
    seg.avl, seg.unusable = 0, 0


def apply_start_state(sregs: k.KvmSregs, start: StartState) -> None:
    """Fill ``sregs`` (KVM's reset values) for ``start``'s mode; TR and LDT stay as KVM set."""
    data_segs = (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss)
    sregs.gdt.base, sregs.gdt.limit = start.gdt_base, start.gdt_limit
    sregs.cr2, sregs.cr8 = 0, 0
    if start.mode is Mode.REAL16:
        _segment(sregs.cs, start.real_cs, start.real_cs << 4, 0xFFFF, _CODE_TYPE)
        for seg in data_segs:
            _segment(seg, 0, 0, 0xFFFF, _DATA_TYPE)
        sregs.idt.base, sregs.idt.limit = 0, 0x3FF  # the real-mode IVT
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = k.X86_CR0_ET, 0, 0, 0
        return
    flat = 0xFFFF_FFFF
    for seg in data_segs:
        _segment(seg, SEL_DATA, 0, flat, _DATA_TYPE, db=1, gran=1)
    # No IDT: until the guest loads one, any exception is a triple fault.
    sregs.idt.base, sregs.idt.limit = 0, 0
    protected = k.X86_CR0_PE | k.X86_CR0_ET | k.X86_CR0_NE
    if start.mode is Mode.PROT32:
        _segment(sregs.cs, SEL_CODE32, 0, flat, _CODE_TYPE, db=1, gran=1)
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = protected, 0, 0, 0
    elif start.mode is Mode.LONG64:
        _segment(sregs.cs, SEL_CODE64, 0, flat, _CODE_TYPE, long=1, gran=1)
        sregs.cr0 = protected | k.X86_CR0_PG
        sregs.cr3 = start.page_table_root
        sregs.cr4 = k.X86_CR4_PAE
        sregs.efer = k.X86_EFER_LME | k.X86_EFER_LMA
    else:  # pragma: no cover - Mode is closed
        raise ValueError(f"unknown mode {start.mode!r}")


# -- run-page layout, precompiled ---------------------------------------------------------------

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_IO: Final = struct.Struct(k.RUN_IO_FORMAT)
_MMIO: Final = struct.Struct(k.RUN_MMIO_FORMAT)
_REGS: Final = struct.Struct("<18Q")
_REG_TUPLE: Final = attrgetter(*k.REG_NAMES)


def _field(struct_type: type[ctypes.Structure], name: str) -> int:
    offset: int = getattr(struct_type, name).offset
    return offset


_SYNC_RAX: Final = k.RUN_SYNC_REGS + _field(k.KvmRegs, "rax")
_SYNC_RDX: Final = k.RUN_SYNC_REGS + _field(k.KvmRegs, "rdx")
_SYNC_RFLAGS: Final = k.RUN_SYNC_REGS + _field(k.KvmRegs, "rflags")
_SYNC_RIP: Final = k.RUN_SYNC_REGS + _field(k.KvmRegs, "rip")


def _packed(fields: Sequence[tuple[int, str]]) -> struct.Struct:
    """A Struct reading the (offset, format char) fields in one call, skipping the gaps."""
    fmt, pos = "<", 0
    for offset, char in sorted(fields):
        if offset < pos:
            raise ValueError("overlapping fields")
        fmt += f"{offset - pos}x" if offset > pos else ""
        fmt += char
        pos = offset + struct.calcsize("<" + char)
    return struct.Struct(fmt)


_SEG_BASE: Final = _field(k.KvmSegment, "base")
_SEG_DB: Final = _field(k.KvmSegment, "db")
_SEG_L: Final = _field(k.KvmSegment, "l")
_SEG_DPL: Final = _field(k.KvmSegment, "dpl")
_SREG_CS: Final = _field(k.KvmSregs, "cs")
_SREG_SS: Final = _field(k.KvmSregs, "ss")
_SS_DPL: Final = _SREG_SS + _SEG_DPL
#: Everything the string decoder needs, in one read of the sync area: rdx, rip, then
#: cs.base, cs.db, cs.l, cr0, cr3, cr4, efer.
_DECODE_STATE: Final = _packed([
    (_field(k.KvmRegs, "rdx"), "Q"), (_field(k.KvmRegs, "rip"), "Q"),
    *((k.RUN_SYNC_SREGS - k.RUN_SYNC_REGS + offset, char) for offset, char in [
        (_SREG_CS + _SEG_BASE, "Q"), (_SREG_CS + _SEG_DB, "B"), (_SREG_CS + _SEG_L, "B"),
        (_field(k.KvmSregs, "cr0"), "Q"), (_field(k.KvmSregs, "cr3"), "Q"),
        (_field(k.KvmSregs, "cr4"), "Q"), (_field(k.KvmSregs, "efer"), "Q"),
    ]),
])

_IN: Final = k.KVM_EXIT_IO_IN
_EXIT_IO: Final = k.KVM_EXIT_IO
_REGS_BIT: Final = k.KVM_SYNC_X86_REGS
_SIZE_MASK: Final = {1: 0xFF, 2: 0xFFFF}


# -- instruction decoding for the string flag ---------------------------------------------------

_NS: Final = 0  # IN / OUT
_S1: Final = 1  # INS / OUTS without REP
_SR: Final = 2  # REP INS / REP OUTS
_PREFIXES: Final = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_REP: Final = frozenset({0xF2, 0xF3})
_CR0_PG: Final = k.X86_CR0_PG
_CR4_PSE: Final = 1 << 4
_CR4_PAE: Final = k.X86_CR4_PAE
_CR4_LA57: Final = 1 << 12
_EFER_LMA: Final = k.X86_EFER_LMA
_PTE_ADDR64: Final = 0x000F_FFFF_FFFF_F000
_PAGE: Final = 4096

#: (direction, class) pairs for which this KVM leaves RIP after the instruction at the exit.
RipConvention = frozenset[tuple[int, int]]
MAINLINE_CONVENTION: Final[RipConvention] = frozenset()


def classify_io(op: int, imm: int | None, rep: bool, is_in: bool, size: int, port: int,
                dx: int) -> int | None:
    """The class of I/O opcode ``op`` if it could have made this exit, else None."""
    if (size == 1) == bool(op & 1):
        return None  # even opcodes move bytes, odd ones words/dwords
    base = op & ~1
    if base in (0xE4, 0xE6):
        return _NS if (base == 0xE4) == is_in and imm == port else None
    if base in (0xEC, 0xEE):
        return _NS if (base == 0xEC) == is_in and dx == port else None
    if base in (0x6C, 0x6E):
        if (base == 0x6C) != is_in or dx != port:
            return None
        return _SR if rep else _S1
    return None


def decode_forward(code: bytes, long_mode: bool, is_in: bool, size: int, port: int,
                   dx: int) -> int | None:
    """Class of the I/O instruction starting at ``code[0]``, if it matches the exit."""
    rep = False
    for i, byte in enumerate(code[:15]):
        if byte in _PREFIXES:
            rep = rep or byte in _REP
        elif not (long_mode and 0x40 <= byte <= 0x4F):  # REX
            imm = code[i + 1] if i + 1 < len(code) else None
            return classify_io(byte, imm, rep, is_in, size, port, dx)
    return None


def decode_backward(tail: bytes, is_in: bool, size: int, port: int, dx: int) -> set[int]:
    """Classes of the I/O instructions that could end exactly at the end of ``tail``."""
    found: set[int] = set()
    if len(tail) >= 1:
        rep = len(tail) >= 2 and tail[-2] in _REP
        one = classify_io(tail[-1], None, rep, is_in, size, port, dx)
        if one is not None:
            found.add(one)
    if len(tail) >= 2:
        two = classify_io(tail[-2], tail[-1], False, is_in, size, port, dx)
        if two is not None:
            found.add(two)
    return found


def translate(mem: mmap.mmap, mem_size: int, lin: int, cr0: int, cr3: int, cr4: int,
              efer: int) -> int | None:
    """Guest-physical address of linear ``lin`` under the guest's paging, None if unmapped."""
    if not cr0 & _CR0_PG:
        return lin & 0xFFFF_FFFF
    if efer & _EFER_LMA:
        levels = 5 if cr4 & _CR4_LA57 else 4
        return _walk(mem, mem_size, lin, cr3 & _PTE_ADDR64, levels, 12 + 9 * (levels - 1), 9,
                     _U64, _PTE_ADDR64, (2, 3))
    if cr4 & _CR4_PAE:
        return _walk(mem, mem_size, lin & 0xFFFF_FFFF, cr3 & 0xFFFF_FFE0, 3, 30, 9, _U64,
                     _PTE_ADDR64, (2,))
    return _walk(mem, mem_size, lin & 0xFFFF_FFFF, cr3 & 0xFFFF_F000, 2, 22, 10, _U32,
                 0xFFFF_F000, (2,) if cr4 & _CR4_PSE else ())


def _walk(mem: mmap.mmap, mem_size: int, lin: int, table: int, levels: int, shift: int,
          bits: int, entry: struct.Struct, addr_mask: int, large: tuple[int, ...]) -> int | None:
    index_mask = (1 << bits) - 1
    for level in range(levels, 0, -1):
        at = table + ((lin >> shift) & index_mask) * entry.size
        if at + entry.size > mem_size:
            return None
        pte: int = entry.unpack_from(mem, at)[0]
        if not pte & 1:
            return None
        if level in large and pte & 0x80:
            offset_mask = (1 << shift) - 1
            return (pte & addr_mask & ~offset_mask) | (lin & offset_mask)
        table = pte & addr_mask
        shift -= bits
    return table | (lin & 0xFFF)


class _StringDecoder:
    """Decides ``PortAccess.string`` for one-element exits (see the module docstring).

    Reading code through the guest's page tables costs more than the rest of an exit, so
    unambiguous answers are cached per (registers they used, exit) together with the code bytes
    they came from, and reused only while guest memory still holds those bytes. The cache
    trusts the old translation: a guest that remaps its code page without changing CR3 could
    see a stale answer for the string flag (and only for it).
    """

    _CACHE_LIMIT: Final = 1024
    _BACK: Final = 2  # the longest AFTER-class instruction: OUT imm8

    def __init__(self, memory: GuestMemory, convention: RipConvention) -> None:
        self._mem = memory.map
        self._size = memory.size
        self._after_in = frozenset(cls for d, cls in convention if d == _IN)
        self._after_out = frozenset(cls for d, cls in convention if d != _IN)
        self._cache: dict[tuple[tuple[int, ...], bool, int, int], tuple[int, int, bytes, bool]]
        self._cache = {}
        self._last_rip = -1
        self._last_port = -1

    def read_linear(self, lin: int, length: int, cr0: int, cr3: int, cr4: int,
                    efer: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes at linear ``lin`` (fewer where the mapping ends), and the
        physical address they start at if they are contiguous there, else -1."""
        out = b""
        start = expect = -1
        while length > 0:
            phys = translate(self._mem, self._size, lin, cr0, cr3, cr4, efer)
            if phys is None or phys >= self._size:
                break
            if start < 0:
                start = phys
            elif phys != expect:
                start = -2  # split across non-adjacent pages: readable, not cacheable
            chunk = min(length, _PAGE - (lin & (_PAGE - 1)), self._size - phys)
            out += self._mem[phys:phys + chunk]
            expect = phys + chunk
            lin += chunk
            length -= chunk
        return out, max(start, -1)

    def is_string(self, state: tuple[int, ...], rax: Callable[[], int], is_in: bool,
                  size: int, port: int, data: bytes) -> bool:
        """``state`` is ``_DECODE_STATE``: rdx, rip, cs.base, cs.db, cs.l, cr0, cr3, cr4, efer.

        ``rax`` is asked only when the code bytes leave the answer open.
        """
        key = (state, is_in, size, port)
        hit = self._cache.get(key)
        if hit is not None:
            lin, phys, blob, answer = hit
            if self._mem[phys:phys + len(blob)] == blob:
                self._last_rip, self._last_port = lin, port
                return answer
        rdx, rip, cs_base, cs_db, cs_l, cr0, cr3, cr4, efer = state
        dx = rdx & 0xFFFF
        long_mode = bool(cs_l and efer & _EFER_LMA)
        if long_mode:
            lin = rip
        elif cs_db:
            lin = cs_base + (rip & 0xFFFF_FFFF)
        else:
            lin = cs_base + (rip & 0xFFFF)
        repeat = self._last_rip == lin and self._last_port == port
        self._last_rip, self._last_port = lin, port
        back = min(lin, self._BACK)
        blob, phys = self.read_linear(lin - back, back + 15, cr0, cr3, cr4, efer)
        if back and not blob:  # the bytes before RIP are not mapped: read forwards only
            back = 0
            blob, phys = self.read_linear(lin, 15, cr0, cr3, cr4, efer)
        after = self._after_in if is_in else self._after_out
        found: set[int] = set()
        forward = decode_forward(blob[back:], long_mode, is_in, size, port, dx)
        if forward is not None and forward not in after:
            found.add(forward)
        if after:
            found |= {c for c in decode_backward(blob[:back], is_in, size, port, dx)
                      if c in after}
        kinds = {c != _NS for c in found}
        if len(kinds) > 1:
            # Both an instruction ending at RIP and one starting there fit (see the module
            # docstring); this depends on more than the code bytes, so it is not cached.
            if not is_in and data != (rax() & ((1 << 8 * size) - 1)).to_bytes(size, "little"):
                return True  # an OUT would have written AL/AX/EAX
            return repeat
        # No reading at all: code unreadable or not an I/O instruction; assume plain I/O.
        answer = kinds.pop() if kinds else False
        if phys >= 0 and blob:
            if len(self._cache) >= self._CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = (lin, phys, blob, answer)
        return answer


# -- RIP convention probe -----------------------------------------------------------------------

# Real-mode probe: one instruction of each I/O class, at known offsets. Hand-assembled so the
# backend needs no assembler at run time; tests/test_cpu_kvm.py checks it against GNU as.
_PROBE_ORG: Final = 0x1000
_PROBE_CODE: Final = bytes.fromhex(
    "ba8000"  # 0x00 mov $0x80, %dx
    "be0020"  # 0x03 mov $0x2000, %si
    "bf0030"  # 0x06 mov $0x3000, %di
    "b90200"  # 0x09 mov $2, %cx
    "ee"      # 0x0c out %al, (%dx)
    "6e"      # 0x0d outsb
    "f36e"    # 0x0e rep outsb
    "b90200"  # 0x10 mov $2, %cx
    "ec"      # 0x13 in (%dx), %al
    "6c"      # 0x14 insb
    "f36c"    # 0x15 rep insb
    "f4"      # 0x17 hlt
)
#: (direction, class, start offset, end offset) of each probed instruction, in exit order.
_PROBE_STEPS: Final = (
    (k.KVM_EXIT_IO_OUT, _NS, 0x0C, 0x0D),
    (k.KVM_EXIT_IO_OUT, _S1, 0x0D, 0x0E),
    (k.KVM_EXIT_IO_OUT, _SR, 0x0E, 0x10),
    (_IN, _NS, 0x13, 0x14),
    (_IN, _S1, 0x14, 0x15),
    (_IN, _SR, 0x15, 0x17),
)

_conventions: dict[str, RipConvention] = {}
_conventions_lock = threading.Lock()


def _rip_convention(device: str) -> RipConvention:
    """Where this KVM leaves RIP at I/O exits, measured once per process and device."""
    with _conventions_lock:
        known = _conventions.get(device)
        if known is None:
            known = _conventions[device] = _measure_rip_convention(device)
        return known


@contextlib.contextmanager
def _probe_vcpu(device: str, code: bytes, *, sync_regs: bool, name: str) -> Iterator[KvmVcpu]:
    """A throwaway one-vCPU real-mode VM running ``code``, for measuring this host."""
    memory = GuestMemory(2, name)
    try:
        memory.write(_PROBE_ORG, code)
        vm = KvmVm(device, VmConfig(memory), sync_regs=sync_regs, irqchip=False,
                   convention=MAINLINE_CONVENTION)
        try:
            yield vm.create_vcpu(0, StartState(Mode.REAL16, Regs(rip=_PROBE_ORG)))
        finally:
            vm.close()
    finally:
        memory.close()


def _measure_rip_convention(device: str) -> RipConvention:
    with _probe_vcpu(device, _PROBE_CODE, sync_regs=True, name="hvmport-kvm-probe") as vcpu:
        return vcpu.probe_rip_convention()


def _kernel_sigset(signals: Iterable[int]) -> int:
    """The kernel's 64-bit sigset_t with ``signals`` set (bit n-1 for signal n)."""
    mask = 0
    for sig in signals:
        if 1 <= sig <= 64:
            mask |= 1 << (sig - 1)
    return mask


# -- vCPU ---------------------------------------------------------------------------------------


class KvmVcpu:
    """One KVM vCPU; also the ``VcpuContext`` its I/O handler receives."""

    def __init__(self, vm: KvmVm, vcpu_id: int, start: StartState) -> None:
        self._vm = vm
        self._id = vcpu_id
        self._fd = _host_ioctl(vm.fd, k.KVM_CREATE_VCPU, vcpu_id)
        self._run: mmap.mmap | None = None
        try:
            self._run = mmap.mmap(self._fd, vm.run_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self._sync = vm.sync_regs
            self._decoder = _StringDecoder(vm.memory, vm.convention)
            _set_cpuid(self._fd, merge_cpuid(vm.supported_cpuid, vm.config.cpuid,
                                             vm.config.hypervisor_bit, vcpu_id))
            sregs = k.KvmSregs()
            _host_ioctl(self._fd, k.KVM_GET_SREGS, sregs)
            apply_start_state(sregs, start)
            _host_ioctl(self._fd, k.KVM_SET_SREGS, sregs)
            regs = start.regs.copy()
            regs.rflags |= 0x2
            _host_ioctl(self._fd, k.KVM_SET_REGS, self._to_kvm(regs))
            if vm.irqchip and vcpu_id:
                # With an in-kernel LAPIC the other vCPUs wait for INIT/SIPI; ours start at
                # the state we give them (and run only when the hypervisor runs them).
                _host_ioctl(self._fd, k.KVM_SET_MP_STATE,
                            k.KvmMpState(k.KVM_MP_STATE_RUNNABLE))
        except BaseException:
            self._release()
            raise
        #: The run page holds current registers: sync regs in use and KVM_RUN returned once.
        self._synced = False
        if self._sync:  # from now on KVM stores regs and sregs in the run page at every exit
            _U64.pack_into(self._run, k.RUN_KVM_VALID_REGS,
                           k.KVM_SYNC_X86_REGS | k.KVM_SYNC_X86_SREGS)
        self._regs_written = False
        self._accesses: dict[tuple[int, int, bool, int, bool, bytes], PortAccess] = {}
        # ioctl fallback state
        self._regs_cache: Regs | None = None
        self._pending_regs: Regs | None = None
        # kick / watchdog state, guarded by _lock
        self._lock = threading.RLock()
        self._thread: int | None = None
        self._kick_pending = False
        self._seq = 0
        self._seen_seq = -1
        self._run_sigmask: int | None = None
        self._closed = False

    # -- VcpuContext -----------------------------------------------------------------------------

    @property
    def vcpu_id(self) -> int:
        return self._id

    def get_regs(self) -> Regs:
        run = self._run
        if self._synced and run is not None:
            return Regs(*_REGS.unpack_from(run, k.RUN_SYNC_REGS))
        self._live()
        if self._pending_regs is not None:
            return self._pending_regs.copy()
        if self._regs_cache is None:
            raw = k.KvmRegs()
            _host_ioctl(self._fd, k.KVM_GET_REGS, raw)
            self._regs_cache = Regs(*(getattr(raw, n) for n in k.REG_NAMES))
        return self._regs_cache.copy()

    def set_regs(self, regs: Regs) -> None:
        run = self._run
        if self._synced and run is not None:
            _REGS.pack_into(run, k.RUN_SYNC_REGS, *_REG_TUPLE(regs))
            _U64.pack_into(run, k.RUN_KVM_DIRTY_REGS, _REGS_BIT)  # we never dirty sregs
        else:
            self._live()
            self._pending_regs = regs.copy()
        self._regs_written = True

    def cpl(self) -> int:
        run = self._live()
        if self._synced:
            dpl: int = run[k.RUN_SYNC_SREGS + _SS_DPL]
            return dpl & 3
        sregs = k.KvmSregs()
        _host_ioctl(self._fd, k.KVM_GET_SREGS, sregs)
        return int(sregs.ss.dpl) & 3

    # -- Vcpu ------------------------------------------------------------------------------------

    def run(self, handler: IoHandler) -> Exit:
        self._enter()
        try:
            return self._loop(handler)
        finally:
            with self._lock:
                self._thread = None

    def kick(self) -> None:
        with self._lock:
            if self._closed or self._run is None:
                return
            self._kick_pending = True
            self._run[k.RUN_IMMEDIATE_EXIT] = 1
            if self._thread is not None:
                signal.pthread_kill(self._thread, KICK_SIGNAL)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is not None:
                raise RuntimeError(f"vCPU {self._id} is still running: kick it and wait first")
            self._closed = True
        self._release()
        self._vm.forget(self)

    # -- internals -------------------------------------------------------------------------------

    def _release(self) -> None:
        self._synced = False
        if self._run is not None:
            self._run.close()
            self._run = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _live(self) -> mmap.mmap:
        if self._run is None:
            raise RuntimeError(f"vCPU {self._id} is closed")
        return self._run

    @staticmethod
    def _to_kvm(regs: Regs) -> k.KvmRegs:
        return k.KvmRegs(*_REG_TUPLE(regs))

    def _enter(self) -> None:
        self._live()
        # Block the kick signal in this thread before anyone may send it here; KVM unblocks it
        # only while the guest runs, so it interrupts KVM_RUN and is never delivered.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _KICK_SET)
        run_mask = _kernel_sigset(s for s in old if s != KICK_SIGNAL)
        if run_mask != self._run_sigmask:
            _host_ioctl(self._fd, k.KVM_SET_SIGNAL_MASK,
                   k.KvmSignalMask8(k.KERNEL_SIGSET_BYTES, run_mask))
            self._run_sigmask = run_mask
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"vCPU {self._id} is already running in another thread")
            self._thread = threading.get_ident()

    def _loop(self, handler: IoHandler) -> Exit:
        run = self._live()
        fd = self._fd
        ioctl = _ioctl
        request = k.KVM_RUN
        exit_io = _EXIT_IO
        sync = self._sync
        while True:
            if self._pending_regs is not None:
                self._flush_pending_regs()
            self._seq += 1
            if ioctl(fd, request, None) < 0:
                err = ctypes.get_errno()
                if err != errno.EINTR and err != errno.EAGAIN:
                    return Exit(ExitKind.ERROR, f"KVM_RUN failed: {os.strerror(err)}")
                self._synced = sync
                stop = self._interrupted()
                if stop is not None:
                    return stop
                continue
            self._synced = sync
            self._regs_cache = None
            reason: int = _U32.unpack_from(run, k.RUN_EXIT_REASON)[0]
            if reason == exit_io:
                stop = self._port_io(handler, run)
                if stop is not None:
                    return stop
                continue
            if reason == k.KVM_EXIT_MMIO:
                stop = self._mmio(handler, run)
                if stop is not None:
                    return stop
                continue
            return self._other_exit(reason, run)

    def _port_io(self, handler: IoHandler, run: mmap.mmap) -> Exit | None:
        direction, size, port, count, offset = _IO.unpack_from(run, k.RUN_IO)
        length = size * count
        is_in = direction == _IN
        data = b"" if is_in else run[offset:offset + length]
        string = count > 1 or self._decode_string(run, is_in, size, port, data)
        # PortAccess is frozen, so equal accesses (every IN of a polling loop) share one.
        key = (port, size, is_in, count, string, data)
        access = self._accesses.get(key)
        if access is None:
            access = PortAccess(port, size, not is_in, count, string, data)
            if length <= 8:
                if len(self._accesses) >= 256:
                    self._accesses.clear()
                self._accesses[key] = access
        self._regs_written = False
        try:
            result = handler.port_io(self, access)
        except VcpuStop as stop:
            return Exit(ExitKind.STOPPED, stop.reason or str(stop), stop.status)
        if is_in:
            if result is None or len(result) != length:
                got = "None" if result is None else f"{len(result)} bytes"
                raise TypeError(f"I/O handler returned {got} for a {length}-byte read "
                                f"of port {port:#x}")
            run[offset:offset + length] = result
            if self._regs_written and not string:
                self._merge_in_result(run, size, result)
        elif result is not None:
            raise TypeError(f"I/O handler returned data for a write to port {port:#x}")
        return None

    def _mmio(self, handler: IoHandler, run: mmap.mmap) -> Exit | None:
        addr, data, length, is_write = _MMIO.unpack_from(run, k.RUN_EXIT_UNION)
        if length not in (1, 2, 4, 8):
            return Exit(ExitKind.ERROR, f"MMIO access of {length} bytes at {addr:#x}")
        access = MmioAccess(addr, length, bool(is_write), data[:length] if is_write else b"")
        mmio = getattr(handler, "mmio", None)
        try:
            if mmio is not None:
                result = mmio(self, access)
            else:
                result = None if is_write else b"\xff" * length
        except VcpuStop as stop:
            return Exit(ExitKind.STOPPED, stop.reason or str(stop), stop.status)
        if not is_write:
            if not isinstance(result, bytes) or len(result) != length:
                raise TypeError(f"MMIO handler returned {result!r} for a {length}-byte read "
                                f"at {addr:#x}")
            # KVM completes the load from here on the next KVM_RUN.
            at = k.RUN_EXIT_UNION + 8
            run[at:at + length] = result
        return None

    def _merge_in_result(self, run: mmap.mmap, size: int, result: bytes) -> None:
        """Complete an IN into RAX ourselves: KVM drops the data once registers are written."""
        value = int.from_bytes(result, "little")
        if self._sync:
            rax: int = _U64.unpack_from(run, _SYNC_RAX)[0]
            mask = _SIZE_MASK.get(size)
            _U64.pack_into(run, _SYNC_RAX, value if mask is None else (rax & ~mask) | value)
        else:
            pending = self._pending_regs
            assert pending is not None  # _regs_written without sync regs sets it
            mask = _SIZE_MASK.get(size)
            pending.rax = value if mask is None else (pending.rax & ~mask) | value

    def _decode_string(self, run: mmap.mmap, is_in: bool, size: int, port: int,
                       data: bytes) -> bool:
        if self._sync:
            state: tuple[int, ...] = _DECODE_STATE.unpack_from(run, k.RUN_SYNC_REGS)
        else:
            sregs = k.KvmSregs()
            _host_ioctl(self._fd, k.KVM_GET_SREGS, sregs)
            regs = self.get_regs()
            state = (regs.rdx, regs.rip, sregs.cs.base, sregs.cs.db, sregs.cs.l, sregs.cr0,
                     sregs.cr3, sregs.cr4, sregs.efer)
        return self._decoder.is_string(state, self._rax, is_in, size, port, data)

    def _rax(self) -> int:
        if self._sync:
            rax: int = _U64.unpack_from(self._live(), _SYNC_RAX)[0]
            return rax
        return self.get_regs().rax

    def _flush_pending_regs(self) -> None:
        if self._pending_regs is not None:
            _host_ioctl(self._fd, k.KVM_SET_REGS, self._to_kvm(self._pending_regs))
            self._pending_regs = None
        self._regs_cache = None

    def _rflags(self) -> int:
        if self._sync:
            rflags: int = _U64.unpack_from(self._live(), _SYNC_RFLAGS)[0]
            return rflags
        return self.get_regs().rflags

    def _interrupted(self) -> Exit | None:
        """KVM_RUN returned EINTR: a kick, the halt watchdog, or a stray kick signal."""
        while signal.sigtimedwait(_KICK_SET, 0) is not None:
            pass
        with self._lock:
            if self._kick_pending:
                self._kick_pending = False
                self._live()[k.RUN_IMMEDIATE_EXIT] = 0
                return Exit(ExitKind.KICKED, "kicked")
        if self._vm.irqchip:
            state = k.KvmMpState()
            _host_ioctl(self._fd, k.KVM_GET_MP_STATE, state)
            if state.mp_state == k.KVM_MP_STATE_HALTED and not self._rflags() & k.X86_RFLAGS_IF:
                return Exit(ExitKind.HALTED,
                            "hlt with interrupts disabled (seen in the in-kernel irqchip)")
        return None

    def _other_exit(self, reason: int, run: mmap.mmap) -> Exit:
        if reason == k.KVM_EXIT_HLT:
            if self._rflags() & k.X86_RFLAGS_IF:
                return Exit(ExitKind.HALTED, "hlt with interrupts enabled, but nothing can "
                                             "interrupt it (no interrupt source)")
            return Exit(ExitKind.HALTED, "hlt with interrupts disabled")
        if reason == k.KVM_EXIT_SHUTDOWN:
            return Exit(ExitKind.SHUTDOWN, "triple fault")
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            kind, _ = struct.unpack_from(k.RUN_SYSTEM_EVENT_FORMAT, run, k.RUN_EXIT_UNION)
            return Exit(ExitKind.SHUTDOWN, f"system event {kind}")
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = struct.unpack_from(k.RUN_INTERNAL_FORMAT, run, k.RUN_EXIT_UNION)
            ndata = min(ndata, k.RUN_INTERNAL_MAX_DATA)
            words = struct.unpack_from(f"<{ndata}Q", run, k.RUN_INTERNAL_DATA)
            what = k.INTERNAL_ERROR_NAMES.get(suberror, "unknown")
            detail = "data: " + (" ".join(f"{w:#x}" for w in words) or "none")
            if (suberror == k.KVM_INTERNAL_ERROR_EMULATION and ndata >= 3
                    and words[0] & k.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                # emulation_failure: u64 flags, then u8 insn_size and 15 instruction bytes
                raw = struct.pack("<2Q", words[1], words[2])
                detail = f"instruction bytes: {raw[1:1 + min(raw[0], 15)].hex(' ')}"
            return Exit(ExitKind.ERROR, f"KVM internal error {suberror} ({what}) "
                                        f"at rip {self._rip():#x}; {detail}")
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            hw, cpu = struct.unpack_from(k.RUN_FAIL_ENTRY_FORMAT, run, k.RUN_EXIT_UNION)
            return Exit(ExitKind.ERROR, f"KVM could not enter the guest: hardware entry "
                                        f"failure reason {hw:#x} on cpu {cpu}")
        if reason == k.KVM_EXIT_UNKNOWN:
            (hw,) = struct.unpack_from(k.RUN_HW_FORMAT, run, k.RUN_EXIT_UNION)
            return Exit(ExitKind.ERROR, f"unknown KVM exit, hardware exit reason {hw:#x}")
        if reason == k.KVM_EXIT_MMIO:
            addr, = struct.unpack_from("<Q", run, k.RUN_EXIT_UNION)
            return Exit(ExitKind.ERROR, f"guest accessed {addr:#x}, which is not RAM "
                                        f"(no MMIO devices) at rip {self._rip():#x}")
        name = k.EXIT_REASON_NAMES.get(reason, "unknown")
        return Exit(ExitKind.ERROR, f"unexpected KVM exit {reason} ({name})")

    def _rip(self) -> int:
        if self._sync:
            rip: int = _U64.unpack_from(self._live(), _SYNC_RIP)[0]
            return rip
        return self.get_regs().rip

    # -- used by the VM and the probes -----------------------------------------------------------

    def poke_if_stuck(self) -> None:
        """Watchdog tick: interrupt KVM_RUN if it has not returned since the last tick."""
        with self._lock:
            if self._closed or self._thread is None:
                self._seen_seq = -1
                return
            if self._seq == self._seen_seq:
                signal.pthread_kill(self._thread, KICK_SIGNAL)
            self._seen_seq = self._seq

    def probe_rip_convention(self) -> RipConvention:
        """Run the convention probe guest (see ``_PROBE_CODE``) and report RIP per class."""
        run = self._live()
        after: set[tuple[int, int]] = set()
        steps = iter(_PROBE_STEPS)
        step = next(steps, None)
        for _ in range(16):
            if step is None:
                break
            if _ioctl(self._fd, k.KVM_RUN, None) < 0:
                break
            self._synced, self._regs_cache = self._sync, None
            if _U32.unpack_from(run, k.RUN_EXIT_REASON)[0] != _EXIT_IO:
                break
            direction, size, _, count, offset = _IO.unpack_from(run, k.RUN_IO)
            if direction == _IN:
                run[offset:offset + size * count] = bytes(size * count)
            rip = self._rip() - _PROBE_ORG
            if step[0] != direction:
                continue  # a further element of the REP before
            if rip == step[3]:
                after.add((step[0], step[1]))
            step = next(steps, None)
        return frozenset(after)


# -- VM -----------------------------------------------------------------------------------------


class KvmVm:
    """A KVM VM: one memory slot over ``config.memory``, vCPUs created on demand.

    ``config.cpuid`` is read when each vCPU is created, so a caller may still add the leaves
    that depend on ``tsc_khz`` between ``create_vm`` and ``create_vcpu``.
    """

    def __init__(self, device: str, config: VmConfig, *, sync_regs: bool, irqchip: bool,
                 convention: RipConvention) -> None:
        self.device = device
        self.config = config
        self.memory = config.memory
        self.convention = convention
        self.irqchip = irqchip
        self._vcpus: list[KvmVcpu] = []
        self._tsc_khz: int | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self.fd = -1
        try:
            kvm_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HostError(f"cannot open {device}: {e.strerror}") from e
        try:
            version = _host_ioctl(kvm_fd, k.KVM_GET_API_VERSION)
            if version != k.KVM_API_VERSION:
                raise HostError(f"{device} speaks KVM API {version}, not {k.KVM_API_VERSION}")
            has_sync = _host_ioctl(kvm_fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_SYNC_REGS)
            wanted = k.KVM_SYNC_X86_REGS | k.KVM_SYNC_X86_SREGS
            self.sync_regs = sync_regs and has_sync & wanted == wanted
            self.run_size = _host_ioctl(kvm_fd, k.KVM_GET_VCPU_MMAP_SIZE)
            if self.run_size < k.RUN_MIN_SIZE:
                raise HostError(f"KVM run page of {self.run_size} bytes is too small")
            self.supported_cpuid = _supported_cpuid(kvm_fd)
            self.fd = _host_ioctl(kvm_fd, k.KVM_CREATE_VM, 0)
        finally:
            os.close(kvm_fd)
        try:
            _host_ioctl(self.fd, k.KVM_SET_TSS_ADDR, TSS_ADDR)
            if irqchip:
                _host_ioctl(self.fd, k.KVM_CREATE_IRQCHIP)
                _host_ioctl(self.fd, k.KVM_CREATE_PIT2, k.KvmPitConfig())
            region = k.KvmUserspaceMemoryRegion(
                slot=0, flags=0, guest_phys_addr=0, memory_size=self.memory.size,
                userspace_addr=self.memory.host_address)
            _host_ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @property
    def backend_name(self) -> str:
        return KvmBackend.name

    @property
    def tsc_khz(self) -> int:
        if self._tsc_khz is None:
            self._tsc_khz = self._query_tsc_khz()
        return self._tsc_khz

    def _query_tsc_khz(self) -> int:
        # KVM_GET_TSC_KHZ is a vCPU ioctl; newer kernels also take it on the VM.
        for fd in (self.fd, *(v._fd for v in self._vcpus)):
            with contextlib.suppress(OSError):
                return _sys(fd, k.KVM_GET_TSC_KHZ)
        return measure_tsc_khz(self.device)

    def set_irq_line(self, irq: int, level: int) -> None:
        """Drive an ISA interrupt line of the in-kernel PIC/IOAPIC (KVM_IRQ_LINE)."""
        if not self.irqchip:
            raise HostError("interrupt lines need the in-kernel irqchip (irqchip=True)")
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} out of range")
        _host_ioctl(self.fd, k.KVM_IRQ_LINE, k.KvmIrqLevel(irq, 1 if level else 0))

    def create_vcpu(self, vcpu_id: int, start: StartState) -> KvmVcpu:
        if self.fd < 0:
            raise RuntimeError("VM is closed")
        if not 0 <= vcpu_id < self.config.vcpus:
            raise ValueError(f"vCPU id {vcpu_id} outside 0..{self.config.vcpus - 1}")
        if any(v.vcpu_id == vcpu_id for v in self._vcpus):
            raise ValueError(f"vCPU {vcpu_id} exists already")
        vcpu = KvmVcpu(self, vcpu_id, start)
        self._vcpus.append(vcpu)
        if self.irqchip and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch_halts, daemon=True,
                                              name="hvmport-kvm-halt-watchdog")
            self._watchdog.start()
        return vcpu

    def forget(self, vcpu: KvmVcpu) -> None:
        with contextlib.suppress(ValueError):
            self._vcpus.remove(vcpu)

    def _watch_halts(self) -> None:
        while not self._stop.wait(HALT_POLL_SECONDS):
            for vcpu in list(self._vcpus):
                vcpu.poke_if_stuck()

    def close(self) -> None:
        for vcpu in list(self._vcpus):
            vcpu.close()
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def measure_tsc_khz(device: str = KVM_DEVICE, interval: float = 0.05) -> int:
    """The guest TSC rate, timed against the host clock (when KVM_GET_TSC_KHZ is missing)."""
    # Real mode: rdtsc, then an OUT exit at which the host reads EDX:EAX; repeat.
    code = bytes.fromhex("0f31" "e680" "ebfa")  # rdtsc; out %al, $0x80; jmp back
    with _probe_vcpu(device, code, sync_regs=False, name="hvmport-kvm-tsc") as vcpu:
        samples: list[tuple[float, int]] = []
        regs = k.KvmRegs()
        for _ in range(2):
            before = time.monotonic_ns()
            _host_ioctl(vcpu._fd, k.KVM_RUN)
            after = time.monotonic_ns()
            _host_ioctl(vcpu._fd, k.KVM_GET_REGS, regs)
            tsc = (regs.rdx & 0xFFFF_FFFF) << 32 | (regs.rax & 0xFFFF_FFFF)
            samples.append(((before + after) / 2, tsc))
            time.sleep(interval)
    (t0, c0), (t1, c1) = samples
    return round((c1 - c0) / ((t1 - t0) / 1e6))


class KvmBackend:
    """``Backend`` on Linux KVM.

    ``sync_regs=False`` forces the KVM_GET_REGS/KVM_SET_REGS path even where
    KVM_CAP_SYNC_REGS exists; ``irqchip=True`` adds the in-kernel PIC/IOAPIC/LAPIC and PIT
    (see the module docstring for what that changes).
    """

    name = "kvm"

    def __init__(self, *, sync_regs: bool = True, irqchip: bool = False,
                 device: str = KVM_DEVICE) -> None:
        self.sync_regs = sync_regs
        self.irqchip = irqchip
        self.device = device

    def create_vm(self, config: VmConfig) -> KvmVm:
        reason = probe_kvm(self.device)
        if reason is not None:
            raise HostError(reason)
        return KvmVm(self.device, config, sync_regs=self.sync_regs, irqchip=self.irqchip,
                     convention=_rip_convention(self.device))
