"""The Unicorn software-CPU backend (PyPI ``unicorn`` 2.1.4).

Each vCPU is its own ``Uc`` in ``UC_MODE_64`` that maps the domain's memfd with
``mem_map_ptr``, so guest memory is shared with ``GuestMemory`` and with every other vCPU.
The Unicorn 2.1.4 behaviours this module is built around were all established by
experiment; the reasons are given where they are handled:

* Registers: the binding's ``reg_read`` spends ~2 µs in Python dispatch; hot paths call
  libunicorn's ``uc_reg_read_batch``/``uc_reg_write_batch`` through ctypes instead, and
  read code and guest-linear memory with ``uc_vmem_read``/``uc_vmem_translate`` (exported
  by libunicorn 2.1.4, not wrapped by its binding).
* Mode: in ``UC_MODE_64`` writing CS/DS/SS/ES only sets the selector (no descriptor load,
  EFER.LMA stays set), while 16/32-bit ``Uc``s lose the 64-bit register API. Start state is
  therefore built in a throwaway 16/32-bit ``Uc`` that loads real descriptors (from a
  private flat GDT), then moved into the vCPU's 64-bit ``Uc`` with ``context_restore``.
* ``emu_stop`` from a hook does not stop at the instruction boundary: the translation block
  runs on until its next memory access or its end. Hooks that stop therefore mute the rest
  of the block, and anything that must resume exactly (a handler changing RIP/RFLAGS, a
  handler raising) snapshots the CPU in the hook and restores it afterwards.
* ``context_restore`` leaves QEMU's lazy flags inconsistent (a restored ZF=1 is not seen
  by a following ``jz``); RFLAGS is rewritten after every restore.
* Writing RIP inside a hook is not honoured (later hooks even read the stale value back),
  and an RFLAGS write there is lost on QEMU's lazy flags (a ``jnz`` after the IN still
  sees the ZF of an earlier ``cmp``); a handler's RIP/RFLAGS changes are therefore applied
  after the run stops (see above).
* ``emu_stop`` from another thread can land between the load and the store of a
  read-modify-write instruction; the instruction is then re-executed when the vCPU is
  resumed (a kicked ``incl`` loop double-counted in ~90% of stops). A kick is still an
  ``emu_stop`` (prompt, no cost on the hot path); see ``UnicornVcpu.kick``.
* HLT ends ``emu_start`` with RIP after the ``hlt`` and no other trace; since every other
  way emulation ends is ours (a stop, an error, a hook), an unexplained return is a halt.
* ``in``/``out``/``ins``/``outs`` all go through the same IN/OUT hooks, one call per
  element; the hook's return value is merged into RAX by Unicorn after the hook (1/2 bytes
  replace AL/AX of the RAX the handler wrote, 4 bytes zero-extend), as the contract wants.
* Exceptions go to ``UC_HOOK_INTR`` (never the guest IDT), invalid opcodes to
  ``UC_HOOK_INSN_INVALID``; SYSCALL/SYSENTER only call their hooks and otherwise do nothing.
* ``ctl_exits_enabled(True)`` with no exits keeps Unicorn from translating the ``until``
  address after every run (which faults into a stale jump buffer when it is unmapped).
* Full-CPU mode (``VmConfig.interrupts`` given; Linux guests): interrupts and exceptions
  through the guest's IDT, SYSCALL, CPL changes, HLT waiting for an interrupt, slices ended
  by a C block hook instead of cross-thread stops; see ``hvmport.cpu.uc_fullcpu``.
* Unicorn's TCG is single-CPU: a ``lock``-prefixed instruction is not atomic against
  another ``Uc`` running in parallel on the same memory (an SMP guest lost counter updates
  and hung). The vCPUs of a multi-vCPU VM therefore take turns (``_Turn``, FIFO): a vCPU
  runs for ``_SLICE_BLOCKS`` translation blocks, then a block hook stops it from its own
  thread (so never inside another vCPU's instruction) and the next one runs.
* A ``Uc`` notices writes to code it has translated only when it makes them itself. Writes
  by the host, a device model or another vCPU leave it running the old code, so every
  ``run`` starts with an empty translation cache (80 µs, plus retranslation); code changed
  by someone else *during* a run is still not seen by this vCPU until its next ``run``.
"""

from __future__ import annotations

import ctypes
import operator
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86
from unicorn.unicorn_py3 import Uc, UcError

from hvmport.cpu.base import (
    MMIO_BASE,
    MMIO_END,
    SEL_CODE16,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_DATA16,
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
from hvmport.cpu.uc_fullcpu import FullCpu, InterruptSource, TripleFault
from hvmport.errors import HostError
from hvmport.hv.memory import PAGE, GuestMemory

if TYPE_CHECKING:
    from hvmport.cpu.base import Backend, Vcpu, VcpuContext, Vm

__all__ = ["UnicornBackend", "UnicornVcpu", "UnicornVm"]

_U64: Final = (1 << 64) - 1
_EFER: Final = 0xC0000080
_EFER_LME: Final = 1 << 8
_EFER_LMA: Final = 1 << 10
_CR0_PE: Final = 1 << 0
_CR0_ET: Final = 1 << 4
_CR0_PG: Final = 1 << 31
_CR4_PSE: Final = 1 << 4
_CR4_PAE: Final = 1 << 5
_ADDRESS_MASK: Final = (1 << 52) - 1
_CR4_OSXSAVE: Final = 1 << 18
_RFLAGS_FIXED: Final = 1 << 1
_RFLAGS_IF: Final = 1 << 9
_RFLAGS_DF: Final = 1 << 10
_RFLAGS_VM: Final = 1 << 17
_DESC_L: Final = 1 << 53
_DESC_D: Final = 1 << 54

#: Regs field order; Regs(*values) relies on it.
_REG_IDS: Final = (
    x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX,
    x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBP,
    x86.UC_X86_REG_R8, x86.UC_X86_REG_R9, x86.UC_X86_REG_R10, x86.UC_X86_REG_R11,
    x86.UC_X86_REG_R12, x86.UC_X86_REG_R13, x86.UC_X86_REG_R14, x86.UC_X86_REG_R15,
    x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS,
)
_REG_NAMES: Final = Regs.__slots__
_RIP_INDEX: Final = 16
_RFLAGS_INDEX: Final = 17


def _flat_gdt() -> bytes:
    """The contract's flat GDT, used privately while building start state."""
    descriptors = {
        SEL_CODE32: 0x00CF9A000000FFFF,  # base 0, 4 GiB, 32-bit code
        SEL_DATA: 0x00CF92000000FFFF,  # base 0, 4 GiB, data
        SEL_CODE64: 0x00AF9A000000FFFF,  # 64-bit code (L)
        SEL_CODE16: 0x00009A000000FFFF,  # base 0, 64 KiB, 16-bit code
        SEL_DATA16: 0x000092000000FFFF,  # base 0, 64 KiB, data
    }
    table = bytearray(max(descriptors) + 8)
    for selector, descriptor in descriptors.items():
        table[selector:selector + 8] = descriptor.to_bytes(8, "little")
    return bytes(table)


_FLAT_GDT: Final = _flat_gdt()

#: Leaves whose subleaf (ECX) selects the answer; others ignore ECX.
_INDEXED_LEAVES: Final = frozenset({
    0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1A, 0x1B, 0x1D, 0x1E, 0x1F,
    0x20, 0x23, 0x24, 0x8000001D, 0x80000020, 0x80000026,
})
_HYPERVISOR_LEAVES: Final = range(0x40000000, 0x50000000)

_VECTOR_NAMES: Final = {
    0: "#DE (divide error)", 1: "#DB (debug)", 2: "NMI", 3: "#BP (breakpoint)",
    4: "#OF (overflow)", 5: "#BR (bound range)", 6: "#UD (invalid opcode)",
    7: "#NM (no FPU)", 8: "#DF (double fault)", 10: "#TS (invalid TSS)",
    11: "#NP (segment not present)", 12: "#SS (stack fault)",
    13: "#GP (general protection)", 14: "#PF (page fault)", 16: "#MF (x87 error)",
    17: "#AC (alignment check)", 18: "#MC (machine check)", 19: "#XM (SIMD error)",
    20: "#VE (virtualization)", 21: "#CP (control protection)",
}

_LEGACY_PREFIXES: Final = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67,
                                     0xF0, 0xF2, 0xF3})
_SEGMENT_PREFIXES: Final = {
    0x26: x86.UC_X86_REG_ES, 0x2E: x86.UC_X86_REG_CS, 0x36: x86.UC_X86_REG_SS,
    0x3E: x86.UC_X86_REG_DS, 0x64: x86.UC_X86_REG_FS, 0x65: x86.UC_X86_REG_GS,
}
_SIZE_MASK: Final = (0, 0xFF, 0xFFFF, 0, 0xFFFFFFFF)
#: A REP string access is handed to the handler at most this many bytes at a time, and never
#: across a page (as KVM splits them), so a fault can never strike in the middle of a batch.
_STRING_BATCH_BYTES: Final = PAGE
_DECODE_CACHE_LIMIT: Final = 4096


# ---------------------------------------------------------------------------------------
# libunicorn entry points the binding does not wrap, or wraps too slowly for the hot path


class _Native:
    """ctypes prototypes for libunicorn's C API, loaded once per process."""

    def __init__(self) -> None:
        try:
            from unicorn.unicorn_py3 import unicorn as binding
            path = binding.uclib._name
        except (ImportError, AttributeError) as e:  # pragma: no cover - pinned version
            raise HostError(f"cannot locate libunicorn through the unicorn binding: {e}") from e
        # PyDLL keeps the GIL: these calls take well under a microsecond, and releasing and
        # re-taking the GIL around them would cost more than the calls themselves.
        lib = ctypes.PyDLL(path)
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        # The hot-path entry points have no argtypes: converting arguments costs more than
        # the call itself (0.7 µs against 0.35 µs per register read in a hook), so callers
        # pass ready-made ctypes objects.
        self.reg_read = self._proto(lib, "uc_reg_read")
        self.reg_read_batch = self._proto(lib, "uc_reg_read_batch")
        self.reg_write_batch = self._proto(lib, "uc_reg_write_batch")
        self.vmem_read = self._proto(lib, "uc_vmem_read", vp, ctypes.c_uint64, i32, vp,
                                     ctypes.c_size_t)
        self.vmem_translate = self._proto(lib, "uc_vmem_translate", vp, ctypes.c_uint64, i32,
                                          ctypes.POINTER(ctypes.c_uint64))
        # Variadic (the instruction of an INSN hook follows ``end``): called with every
        # argument as an explicit ctypes object.
        self.hook_add = self._proto(lib, "uc_hook_add")

    @staticmethod
    def _proto(lib: ctypes.PyDLL, name: str, *argtypes: Any) -> Any:
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise HostError(f"libunicorn lacks {name}: the unicorn backend needs 2.1.4") from e
        if argtypes:
            fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn


_native_lock = threading.Lock()
_native_instance: _Native | None = None


def _native() -> _Native:
    global _native_instance
    with _native_lock:
        if _native_instance is None:
            _native_instance = _Native()
        return _native_instance


class _RegBlock:
    """A fixed list of registers read or written with one batch call."""

    __slots__ = ("count", "ids", "ptrs", "vals")

    def __init__(self, ids: Sequence[int]) -> None:
        self.count = ctypes.c_int(len(ids))
        self.ids = (ctypes.c_int * len(ids))(*ids)
        self.vals = (ctypes.c_uint64 * len(ids))()
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * len(ids))(*(base + 8 * i for i in range(len(ids))))


#: Signatures of libunicorn's IN and OUT instruction hooks.
_IN_HOOK = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                            ctypes.c_void_p)
_OUT_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                             ctypes.c_uint32, ctypes.c_void_p)


#: The binding's Uc picks its subclass in an untyped __new__.
_new_uc: Any = Uc


def _uc_error(code: int) -> str:
    return str(UcError(code))


def _open_uc(mode: int) -> Any:
    try:
        return _new_uc(ucc.UC_ARCH_X86, mode)
    except UcError as e:
        raise HostError(f"cannot create a Unicorn x86 CPU: {e}") from e


def _close_uc(uc: Any) -> None:
    # The binding frees the engine only from a weakref finalizer, and its hook trampolines
    # hold references back to the Uc, so without this the engine (and its translation
    # buffer) lives until the cycle collector runs. The finalizer is idempotent.
    finalizer = getattr(uc, "_Uc__finalizer", None)
    if finalizer is not None:
        finalizer()


# ---------------------------------------------------------------------------------------
# Facts about this host's Unicorn CPU, measured once per process


_facts_lock = threading.Lock()
_leaf1: tuple[int, int, int, int] | None = None
_tsc_khz: int | None = None


def _native_leaf1() -> tuple[int, int, int, int]:
    """CPUID leaf 1 of Unicorn's own CPU model, which the CPUID hook cannot ask for."""
    global _leaf1
    with _facts_lock:
        if _leaf1 is None:
            uc = _open_uc(ucc.UC_MODE_64)
            try:
                uc.mem_map(0, PAGE)
                uc.ctl_exits_enabled(True)
                uc.mem_write(0, b"\x0f\xa2\xf4")  # cpuid; hlt
                uc.reg_write(x86.UC_X86_REG_RAX, 1)
                uc.reg_write(x86.UC_X86_REG_RCX, 0)
                uc.emu_start(0, 0)
                eax, ebx, ecx, edx = (int(uc.reg_read(r)) & 0xFFFFFFFF
                                      for r in (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX,
                                                x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX))
                _leaf1 = (eax, ebx, ecx, edx)
            except UcError as e:
                raise HostError(f"cannot probe Unicorn's CPUID: {e}") from e
            finally:
                _close_uc(uc)
        assert _leaf1 is not None
        return _leaf1


def _measured_tsc_khz() -> int:
    """How fast the guest's RDTSC counts, in kHz.

    Unicorn's RDTSC returns the host's TSC, which is invariant on the machines we run on
    (constant_tsc, nonstop_tsc), so one measurement per process serves every VM. It is
    taken through Unicorn itself: a guest ``rdtsc`` immediately followed by an ``out``
    whose hook reads the monotonic clock, 100 ms apart, after one warm-up run (the first
    hook call is slow). Both samples follow a sleep, because the hook answers ~20 µs later
    right after a wake-up than when warm (a 230 ppm error if only one sample paid it). The
    residual jitter is ~0.05 MHz; the result is rounded to whole MHz (the kernel's own
    calibration of 2596.142 MHz measures as 2596000 kHz), so every VM reports the same
    value and no digit is noise.
    """
    global _tsc_khz
    with _facts_lock:
        if _tsc_khz is not None:
            return _tsc_khz
        samples: list[tuple[int, int]] = []

        def on_out(uc: Any, port: int, size: int, value: int, _ud: Any) -> None:
            now = time.perf_counter_ns()
            tsc = (int(uc.reg_read(x86.UC_X86_REG_RDX)) << 32) | (value & 0xFFFFFFFF)
            samples.append((now, tsc))

        uc = _open_uc(ucc.UC_MODE_64)
        try:
            uc.mem_map(0, PAGE)
            uc.ctl_exits_enabled(True)
            uc.mem_write(0, b"\x0f\x31\xe7\x80\xf4")  # rdtsc; out %eax, $0x80; hlt
            uc.hook_add(ucc.UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
            uc.emu_start(0, 0)
            time.sleep(0.01)
            uc.emu_start(0, 0)
            time.sleep(0.1)
            uc.emu_start(0, 0)
        except UcError as e:
            raise HostError(f"cannot measure the TSC through Unicorn: {e}") from e
        finally:
            _close_uc(uc)
        (t0, c0), (t1, c1) = samples[1], samples[2]
        if t1 <= t0 or c1 <= c0:
            raise HostError("the TSC seen by Unicorn guests does not advance")
        khz = (c1 - c0) * 1_000_000 // (t1 - t0)
        _tsc_khz = max(1000, (khz + 500) // 1000 * 1000)
        return _tsc_khz


# ---------------------------------------------------------------------------------------
# Start state


def _initial_context(start: StartState, memory_size: int) -> Any:
    """The CPU state of ``start`` as a Unicorn context (see the module docstring for why).

    The segment registers are loaded from a private flat GDT in a helper ``Uc`` that maps
    no guest memory, so the hidden descriptor caches hold exactly the contract's flat
    segments whether or not the loader wrote a GDT; GDTR is then pointed at the loader's.
    """
    if start.mode is Mode.LONG64:
        root = start.page_table_root
        if root % PAGE or root + PAGE > memory_size:
            raise ValueError(f"page_table_root {root:#x} is not a page of guest memory")
    if start.mode is Mode.REAL16:
        if not 0 <= start.real_cs <= 0xFFFF:
            raise ValueError(f"real_cs {start.real_cs:#x} is not a 16-bit selector")
        helper = _open_uc(ucc.UC_MODE_16)
    else:
        helper = _open_uc(ucc.UC_MODE_32)
    try:
        if start.mode is Mode.REAL16:
            helper.reg_write(x86.UC_X86_REG_CR0, _CR0_ET)
            helper.reg_write(x86.UC_X86_REG_CS, start.real_cs)
            for seg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS,
                        x86.UC_X86_REG_FS, x86.UC_X86_REG_GS):
                helper.reg_write(seg, 0)
            helper.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0x3FF, 0))
        else:
            # Helper layout: GDT at 0x1000; for long mode, tables at 0x2000..0x4fff whose one
            # 2 MiB page identity-maps the GDT, so descriptor loads work with paging on.
            helper.mem_map(0, 0x5000)
            helper.mem_write(0x1000, _FLAT_GDT)
            helper.reg_write(x86.UC_X86_REG_GDTR, (0, 0x1000, len(_FLAT_GDT) - 1, 0))
            if start.mode is Mode.LONG64:
                helper.mem_write(0x2000, (0x3000 | 3).to_bytes(8, "little"))
                helper.mem_write(0x3000, (0x4000 | 3).to_bytes(8, "little"))
                helper.mem_write(0x4000, (0x83).to_bytes(8, "little"))
                helper.reg_write(x86.UC_X86_REG_CR3, 0x2000)
                helper.reg_write(x86.UC_X86_REG_CR4, _CR4_PAE)
                helper.msr_write(_EFER, _EFER_LME)
                helper.reg_write(x86.UC_X86_REG_CR0, _CR0_PG | _CR0_ET | _CR0_PE)
                code = SEL_CODE64
            else:
                helper.reg_write(x86.UC_X86_REG_CR4, 0)
                helper.msr_write(_EFER, 0)
                helper.reg_write(x86.UC_X86_REG_CR0, _CR0_ET | _CR0_PE)
                code = SEL_CODE32
            helper.reg_write(x86.UC_X86_REG_CS, code)
            for seg in (x86.UC_X86_REG_SS, x86.UC_X86_REG_DS, x86.UC_X86_REG_ES,
                        x86.UC_X86_REG_FS, x86.UC_X86_REG_GS):
                helper.reg_write(seg, SEL_DATA)
            if start.mode is Mode.LONG64:
                helper.reg_write(x86.UC_X86_REG_CR3, start.page_table_root)
            helper.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0, 0))
        helper.reg_write(x86.UC_X86_REG_GDTR, (0, start.gdt_base, start.gdt_limit, 0))
        return helper.context_save()
    except UcError as e:
        raise HostError(f"cannot build the {start.mode.name} start state in Unicorn: {e}") from e
    finally:
        _close_uc(helper)


# ---------------------------------------------------------------------------------------
# I/O instruction decoding


@dataclass(slots=True, frozen=True)
class _IoInsn:
    """A decoded port-I/O instruction, cached per RIP and revalidated by its bytes.

    Outside 64-bit code the linear address depends on CS, so an entry is reused only under
    the CS it was decoded with; 64-bit code has CS base 0 and skips that register read.
    """

    rip: int
    length: int  # 0: the bytes at RIP could not be decoded
    string: bool = False
    phys: int = 0  # guest-physical address of the first byte
    end: int = 0  # phys + the bytes of the instruction within its page
    code: bytes = b""  # those bytes, as decoded
    rep: bool = False
    addr_override: bool = False  # 0x67
    segment: int = 0  # OUTS source segment register (UC id)
    cs: int = -1  # -1: decoded in 64-bit code


def _decode_io(code: bytes, bits: int) -> tuple[int, bool, bool, bool, int] | None:
    """(length, string, rep, 0x67, OUTS segment) of the I/O instruction in ``code``."""
    rep = addr_override = False
    segment = x86.UC_X86_REG_DS
    i = 0
    while i < len(code) and i < 15:
        byte = code[i]
        if byte in _LEGACY_PREFIXES:
            if byte in (0xF2, 0xF3):
                rep = True
            elif byte == 0x67:
                addr_override = True
            elif byte in _SEGMENT_PREFIXES:
                segment = _SEGMENT_PREFIXES[byte]
        elif not (bits == 64 and 0x40 <= byte <= 0x4F):  # REX
            break
        i += 1
    if i >= len(code):
        return None
    op = code[i]
    if 0xE4 <= op <= 0xE7:
        return i + 2, False, False, addr_override, segment
    if 0xEC <= op <= 0xEF:
        return i + 1, False, False, addr_override, segment
    if 0x6C <= op <= 0x6F:
        return i + 1, True, rep, addr_override, segment
    return None


def _address_bits(code_bits: int, override: bool) -> int:
    if code_bits == 64:
        return 32 if override else 64
    if code_bits == 32:
        return 16 if override else 32
    return 32 if override else 16


class _Batch:
    """The rest of a REP INS/OUTS the handler has already seen, served to Unicorn's
    per-element hook calls without calling the handler again."""

    __slots__ = ("count", "data", "index", "is_write", "port", "rcx", "rcx_mask", "size")

    def __init__(self, port: int, size: int, is_write: bool, count: int, data: bytes,
                 index: int, rcx: int, rcx_mask: int) -> None:
        self.port = port
        self.size = size
        self.is_write = is_write
        self.count = count
        self.data = data
        self.index = index  # elements already given to Unicorn
        self.rcx = rcx  # the guest's count when the batch began (REP only)
        self.rcx_mask = rcx_mask  # 0 for a non-REP instruction


@dataclass(slots=True)
class _Deferred:
    """Register changes a hook cannot make (RIP, RFLAGS), applied once the run has stopped."""

    snapshot: Any  # the CPU at the I/O instruction
    regs: Regs
    insn: _IoInsn
    access: PortAccess
    data: bytes = b""  # the IN result, once the handler returned it


# ---------------------------------------------------------------------------------------
# Backend, VM, vCPU


class UnicornBackend:
    """Runs guests on Unicorn's software x86 CPU."""

    name = "unicorn"

    def create_vm(self, config: VmConfig) -> UnicornVm:
        version = (ucc.UC_VERSION_MAJOR, ucc.UC_VERSION_MINOR)
        if version != (2, 1):
            raise HostError("the unicorn backend is built for unicorn 2.1.4, found "
                            f"{ucc.UC_VERSION_MAJOR}.{ucc.UC_VERSION_MINOR}.{ucc.UC_VERSION_PATCH}")
        return UnicornVm(config)


#: Translation blocks a vCPU of a multi-vCPU VM runs before it hands over its turn.
_SLICE_BLOCKS: Final = 2000


class _Turn:
    """A fair (FIFO) lock: the vCPUs of one VM run guest code one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = False
        self._queue: list[threading.Event] = []

    def acquire(self) -> None:
        with self._lock:
            if not self._owner:
                self._owner = True
                return
            mine = threading.Event()
            self._queue.append(mine)
        mine.wait()

    def release(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.pop(0).set()  # ownership passes straight to the next in line
            else:
                self._owner = False

    @property
    def contended(self) -> bool:
        return bool(self._queue)


class UnicornVm:
    """A domain: the memory and CPUID every vCPU shares."""

    def __init__(self, config: VmConfig) -> None:
        if config.vcpus < 1:
            raise ValueError(f"a VM needs at least one vCPU, not {config.vcpus}")
        self.config = config
        self.memory: GuestMemory = config.memory
        self._native = _native()
        self._leaf1 = _native_leaf1()
        self._cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self._indexed = set(_INDEXED_LEAVES)
        self._load_cpuid()
        self._vcpus: dict[int, UnicornVcpu] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.turn: _Turn | None = _Turn() if config.vcpus > 1 else None

    def _load_cpuid(self) -> None:
        """Take the table as it is now. The hypervisor fills in the VMware leaves after
        creating the VM (they need its TSC frequency), so vCPU creation reads it again,
        as KVM's KVM_SET_CPUID2 at vCPU creation does."""
        table: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        indexed = set(_INDEXED_LEAVES)
        for (leaf, sub), regs in self.config.cpuid.items():
            if len(regs) != 4:
                raise ValueError(f"CPUID entry {leaf:#x}.{sub:#x} must have 4 registers")
            table[(leaf & 0xFFFFFFFF, sub & 0xFFFFFFFF)] = (
                regs[0] & 0xFFFFFFFF, regs[1] & 0xFFFFFFFF,
                regs[2] & 0xFFFFFFFF, regs[3] & 0xFFFFFFFF)
            if sub:
                indexed.add(leaf)
        self._cpuid, self._indexed = table, indexed

    @property
    def backend_name(self) -> str:
        return UnicornBackend.name

    @property
    def tsc_khz(self) -> int:
        return _measured_tsc_khz()

    def create_vcpu(self, vcpu_id: int, start: StartState) -> UnicornVcpu:
        with self._lock:
            if self._closed:
                raise HostError("the VM is closed")
            if not 0 <= vcpu_id < self.config.vcpus:
                raise ValueError(f"vcpu_id {vcpu_id} outside 0..{self.config.vcpus - 1}")
            if vcpu_id in self._vcpus:
                raise ValueError(f"vCPU {vcpu_id} already exists")
            self._load_cpuid()
            vcpu = UnicornVcpu(self, vcpu_id, start)
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    def close(self) -> None:
        with self._lock:
            self._closed = True
            vcpus = list(self._vcpus.values())
            self._vcpus.clear()
        for vcpu in vcpus:
            vcpu.close()

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
        """The table's answer for a leaf, or None to let Unicorn's CPU answer."""
        key = (leaf, subleaf if leaf in self._indexed else 0)
        answer = self._cpuid.get(key)
        if answer is None and leaf in _HYPERVISOR_LEAVES:
            # Only the table speaks for the hypervisor range, so the guest never sees a
            # signature the domain did not configure.
            return (0, 0, 0, 0)
        return answer

    def __enter__(self) -> UnicornVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnicornVcpu:
    """One vCPU: a ``Uc`` of its own; implements ``Vcpu`` and the handler's ``VcpuContext``.

    ``run`` executes the guest until something the hypervisor must see; ``kick`` may be
    called from any thread. ``get_regs``/``set_regs``/``cpl`` are meant for the I/O handler
    while it runs, and also work between runs.
    """

    def __init__(self, vm: UnicornVm, vcpu_id: int, start: StartState) -> None:
        self._vm = vm
        self._id = vcpu_id
        self._native = vm._native
        self._mem = vm.memory.map
        start_regs = _regs_tuple(start.regs)  # checked before any engine exists
        context = _initial_context(start, vm.memory.size)
        uc = _open_uc(ucc.UC_MODE_64)
        try:
            uc.mem_map_ptr(0, vm.memory.size, ucc.UC_PROT_ALL, vm.memory.host_address)
            # The PC's MMIO hole: accesses there go to the I/O handler, as KVM's MMIO exits.
            uc.mmio_map(MMIO_BASE, MMIO_END - MMIO_BASE, self._mmio_read, None,
                        self._mmio_write, None)
            uc.ctl_exits_enabled(True)
            uc.context_restore(context)
            # libunicorn holds bare pointers to these trampolines: keep them alive.
            self._raw_hooks: tuple[Any, ...] = self._add_hooks(uc)
        except UcError as e:
            _close_uc(uc)
            raise HostError(f"cannot set up Unicorn vCPU {vcpu_id}: {e}") from e
        self._uc: Any = uc
        self._h = ctypes.c_void_p(uc._uch.value)
        self._rip = ctypes.c_uint64()
        self._rip_ref = ctypes.byref(self._rip)
        self._rip_id = ctypes.c_int(x86.UC_X86_REG_RIP)
        self._cs = ctypes.c_uint64()
        self._cs_ref = ctypes.byref(self._cs)
        self._cs_id = ctypes.c_int(x86.UC_X86_REG_CS)
        self._all_regs = _RegBlock(_REG_IDS)
        self._gprs = _RegBlock(_REG_IDS[:_RIP_INDEX])
        self._cpuid_in = _RegBlock((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX))
        self._cpuid_out = _RegBlock((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX,
                                     x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX))
        self._string_regs = _RegBlock((x86.UC_X86_REG_RFLAGS, x86.UC_X86_REG_RCX,
                                       x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI))
        self._mode_regs = _RegBlock((x86.UC_X86_REG_CR0, x86.UC_X86_REG_RFLAGS,
                                     x86.UC_X86_REG_CR4, x86.UC_X86_REG_SS))

        # Set while the handler runs inside a hook: the instruction, its access, and the
        # registers the handler has seen or set during this exit.
        self._handler: IoHandler | None = None
        self._cur_insn: _IoInsn | None = None
        self._cur_access: PortAccess | None = None
        self._exit_regs: tuple[int, ...] | None = None  # as the handler sees them
        self._in_accesses: dict[int, PortAccess] = {}
        self._insns: dict[int, _IoInsn] = {}
        self._batch: _Batch | None = None

        # How the current run ends, as decided inside hooks.
        self._stopping = False  # a stop is requested: the rest of the block must be inert
        self._slice_left = _SLICE_BLOCKS  # multi-vCPU VMs: blocks left in this turn
        self._sliced = False  # the block hook ended this turn
        self._final: Exit | None = None  # latched: the vCPU cannot continue
        self._deferred: _Deferred | None = None
        self._failure: tuple[BaseException, Any] | None = None  # handler bug + snapshot
        self._parked = False  # halted with interrupts enabled: only a kick ends a run

        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._active = False  # inside run()
        self._running = False  # inside emu_start
        self._run_gen = 0
        self._run_thread = 0
        self._closed = False

        self._load_values(start_regs)
        #: Full-CPU mode (interrupts, exceptions through the IDT, SYSCALL, counted slices).
        self._full: FullCpu | None = None
        if vm.config.interrupts is not None:
            self._full = FullCpu(self, uc, cast(InterruptSource, vm.config.interrupts))

    # -- VcpuContext ---------------------------------------------------------------------

    @property
    def vcpu_id(self) -> int:
        return self._id

    @property
    def halted(self) -> bool:
        """Halted with interrupts enabled: ``run`` only waits for a kick."""
        return self._parked

    def get_regs(self) -> Regs:
        self._check_usable()
        if self._cur_insn is not None:
            return Regs(*(self._exit_regs or self._read_exit_regs()))
        block = self._all_regs
        self._native.reg_read_batch(self._h, block.ids, block.ptrs, block.count)
        return Regs(*block.vals[:])

    def set_regs(self, regs: Regs) -> None:
        self._check_usable()
        values = _regs_tuple(regs)
        if self._cur_insn is None:
            with self._lock:
                if self._running:
                    raise HostError("set_regs() from another thread while the vCPU runs")
            self._load_values(values)
            return
        if self._deferred is not None:
            self._deferred.regs = Regs(*values)
            self._exit_regs = values
            return
        current = self._exit_regs or self._read_exit_regs()
        if values[_RIP_INDEX:] != current[_RIP_INDEX:]:
            self._defer(values)
            return
        if values[:_RIP_INDEX] != current[:_RIP_INDEX]:
            # Rewriting an unchanged GPR is harmless, and one batch beats picking them out.
            block = self._gprs
            block.vals[:] = list(values[:_RIP_INDEX])
            self._native.reg_write_batch(self._h, block.ids, block.ptrs, block.count)
        self._exit_regs = values

    def _read_exit_regs(self) -> tuple[int, ...]:
        block = self._all_regs
        self._native.reg_read_batch(self._h, block.ids, block.ptrs, block.count)
        self._exit_regs = tuple(block.vals[:])
        return self._exit_regs

    def cpl(self) -> int:
        self._check_usable()
        block = self._mode_regs
        block.vals[3] = 0  # a segment register read fills only the low 16 bits
        self._native.reg_read_batch(self._h, block.ids, block.ptrs, block.count)
        cr0, rflags, _cr4, ss = block.vals
        if not cr0 & _CR0_PE:
            return 0
        if rflags & _RFLAGS_VM:
            return 3
        return int(ss & 3)

    # -- Vcpu ----------------------------------------------------------------------------

    def run(self, handler: IoHandler) -> Exit:
        """Run until the guest halts, shuts down, a handler stops it, or it is kicked.

        Halted with interrupts enabled the vCPU stays halted (nothing here can interrupt
        it), so ``run`` waits for a kick. After STOPPED, SHUTDOWN or ERROR the vCPU cannot
        continue and every later ``run`` returns the same exit. An exception other than
        ``VcpuStop`` from the handler propagates (with the guest back at the I/O
        instruction); so do invalid ``PortAccess`` replies from the handler.
        """
        with self._lock:
            if self._closed:
                raise HostError(f"vCPU {self._id} is closed")
            if self._active:
                raise HostError(f"vCPU {self._id} is already running")
            self._active = True
            self._run_thread = threading.get_ident()
            self._idle.clear()
        self._handler = handler
        try:
            self._uc.ctl_flush_tb()  # code others wrote since the last run (module notes)
            if self._full is not None:
                return self._run_full(self._full)
            while True:
                if self._final is not None:
                    return Exit(self._final.kind, self._final.reason, self._final.status)
                if self._parked:
                    self._kick.wait()
                    self._kick.clear()
                    return Exit(ExitKind.KICKED, "kicked while halted")
                if self._batch is not None:
                    self._resync_batch()
                rip = self._read_rip()
                kicked = self._enter_run()
                if kicked is not None:
                    return kicked
                error: UcError | None = None
                turn = self._vm.turn
                if turn is not None:
                    turn.acquire()
                    self._slice_left = _SLICE_BLOCKS
                try:
                    self._uc.emu_start(rip, 0)
                except UcError as e:
                    error = e
                finally:
                    with self._lock:
                        self._running = False
                    if turn is not None:
                        turn.release()
                if self._sliced:
                    self._sliced = False
                    if error is None and self._final is None and self._failure is None \
                            and self._deferred is None and not self._kick.is_set():
                        continue  # the slice ended: queue up for the next turn
                outcome = self._settle(error)
                if outcome is not None:
                    return outcome
        finally:
            self._handler = None
            with self._lock:
                self._active = False
                self._idle.set()

    def kick(self) -> None:
        """Make ``run`` return ``Exit(KICKED)`` soon; safe from any thread.

        A kick that arrives while no run is active ends the next run at once. The guest is
        stopped with ``uc_emu_stop``; Unicorn 2.1.4 may stop it inside a read-modify-write
        instruction whose store already happened, and that instruction runs again if the
        vCPU is resumed. KICKED is therefore safe as the end of a vCPU (a timeout, another
        vCPU ended); resuming a kicked vCPU can repeat one memory update.

        A kick that coincides with the guest executing HLT wins: nothing tells that HLT
        apart from an instruction ending in byte 0xF4 at which the kick stopped the guest,
        so the vCPU resumes after the ``hlt`` (a spurious wake-up, which guests tolerate)
        rather than risk halting a guest that never executed one.
        """
        with self._lock:
            if self._closed:
                return
            self._kick.set()
            if self._full is not None:
                # Never uc_emu_stop a full-CPU slice from another thread (it corrupts the
                # guest): the slice hook ends it at its next block.
                self._full.wake()
            elif self._running:
                self._uc.emu_stop()
                self._rekick_later(self._run_gen, 0.001)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            active = self._active
            if active and self._run_thread == threading.get_ident():
                raise HostError("close() called from inside run() on the same vCPU")
        if active:
            self.kick()
            self._idle.wait()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            uc, self._uc = self._uc, None
        self._batch = None
        self._insns.clear()
        _close_uc(uc)
        self._raw_hooks = ()  # only now: libunicorn calls them until the engine is closed

    # -- hooks ---------------------------------------------------------------------------

    def _hook_block(self, uc: Any, address: int, size: int, user_data: object) -> None:
        # Hand the turn over only when another vCPU waits for it; the stop is requested
        # from this vCPU's own thread, before the block runs, so it never splits an
        # instruction (a stop from another thread can, see the module notes).
        self._slice_left -= 1
        if self._slice_left <= 0:
            turn = self._vm.turn
            if turn is not None and turn.contended and not self._sliced:
                self._sliced = True
                uc.emu_stop()
            else:
                self._slice_left = _SLICE_BLOCKS

    def _add_hooks(self, uc: Any) -> tuple[Any, Any]:
        # IN and OUT are the hot path: they are registered directly with libunicorn, which
        # skips the binding's two Python trampolines (0.3 µs of the binding's 0.5 µs per
        # hooked IN). The binding is fine for the rare hooks, and guards them against
        # exceptions; the raw hooks guard themselves.
        raw_in, raw_out = _IN_HOOK(self._hook_in), _OUT_HOOK(self._hook_out)
        for callback, insn in ((raw_in, x86.UC_X86_INS_IN), (raw_out, x86.UC_X86_INS_OUT)):
            handle = ctypes.c_size_t()
            err = self._native.hook_add(
                ctypes.c_void_p(uc._uch.value), ctypes.byref(handle),
                ctypes.c_int(ucc.UC_HOOK_INSN), callback, ctypes.c_void_p(None),
                ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
            if err:
                raise UcError(err)
        if self._vm.turn is not None:
            uc.hook_add(ucc.UC_HOOK_BLOCK, self._hook_block)
        uc.hook_add(ucc.UC_HOOK_INSN, self._hook_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)
        uc.hook_add(ucc.UC_HOOK_INSN, self._hook_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(ucc.UC_HOOK_INSN, self._hook_syscall, None, 1, 0, x86.UC_X86_INS_SYSENTER)
        uc.hook_add(ucc.UC_HOOK_INTR, self._hook_intr)
        uc.hook_add(ucc.UC_HOOK_INSN_INVALID, self._hook_invalid)
        uc.hook_add(ucc.UC_HOOK_MEM_UNMAPPED, self._hook_unmapped)
        return raw_in, raw_out

    def _hook_in(self, _uc: int | None, port: int, size: int, _ud: int | None) -> int:
        try:
            if self._stopping:
                return 0
            batch = self._batch
            if batch is not None:
                if batch.port == port and batch.size == size and not batch.is_write:
                    at = batch.index * size
                    batch.index += 1
                    if batch.index == batch.count:
                        self._batch = None
                    return int.from_bytes(batch.data[at:at + size], "little")
                self._batch = None
            insn = self._classify()
            if insn.string:
                return self._string_in(insn, port, size)
            key = (port << 3) | size
            access = self._in_accesses.get(key)
            if access is None:
                access = self._in_accesses[key] = PortAccess(port, size, False)
            data = self._exchange(access, insn)
            return int.from_bytes(data, "little") if data is not None else 0
        except BaseException as exc:  # ctypes would print and drop it
            self._fail(exc)
            return 0

    def _hook_out(self, _uc: int | None, port: int, size: int, value: int,
                  _ud: int | None) -> None:
        try:
            if self._stopping:
                return
            batch = self._batch
            if batch is not None:
                if batch.port == port and batch.size == size and batch.is_write:
                    batch.index += 1
                    if batch.index == batch.count:
                        self._batch = None
                    return
                self._batch = None
            insn = self._classify()
            data = (value & _SIZE_MASK[size]).to_bytes(size, "little")
            if insn.string:
                self._string_out(insn, port, size, data)
                return
            self._exchange(PortAccess(port, size, True, 1, False, data), insn)
        except BaseException as exc:  # ctypes would print and drop it
            self._fail(exc)

    def _exchange(self, access: PortAccess, insn: _IoInsn) -> bytes | None:
        """Give one access to the handler; the IN data, or None when the run must stop."""
        handler = self._handler
        assert handler is not None
        # _cur_insn marks "inside an exit" for the VcpuContext methods; _cur_access and
        # _exit_regs are only read while it is set.
        self._cur_insn = insn
        self._cur_access = access
        self._exit_regs = None
        # The handler runs no guest instructions, so other vCPUs may run meanwhile (one
        # waiting for a device model must not stall them all).
        turn = self._vm.turn
        if turn is not None:
            turn.release()
        try:
            reply = handler.port_io(self, access)
        except VcpuStop as stop:
            self._cur_insn = None
            self._finish(Exit(ExitKind.STOPPED, stop.reason or str(stop), stop.status))
            return None
        except BaseException as exc:  # a host bug: re-raised from run()
            self._cur_insn = None
            self._fail(exc)
            return None
        finally:
            if turn is not None:
                turn.acquire()
        self._cur_insn = None
        if access.is_write:
            if reply is not None:
                self._fail(TypeError(f"port_io returned {type(reply).__name__} for an OUT "
                                     f"to {access.port:#x}; it must return None"))
            return None
        if type(reply) is not bytes or len(reply) != access.count * access.size:
            reply = self._checked_reply(reply, access)
            if reply is None:
                return None
        if self._deferred is not None:
            self._deferred.data = reply
        return reply

    def _checked_reply(self, reply: object, access: PortAccess) -> bytes | None:
        want = access.count * access.size
        if isinstance(reply, bytes | bytearray | memoryview) and len(reply) == want:
            return bytes(reply)
        got = f"{len(reply)} bytes" if isinstance(reply, bytes | bytearray) else repr(reply)
        self._fail(TypeError(f"port_io returned {got} for an IN from {access.port:#x}; "
                             f"it must return exactly {want} bytes"))
        return None

    def _string_in(self, insn: _IoInsn, port: int, size: int) -> int:
        count, _linear, _df, rcx, mask = self._string_span(insn, size, is_write=False)
        data = self._exchange(PortAccess(port, size, False, count, True), insn)
        if data is None:
            return 0
        self._start_batch(port, size, False, count, data, rcx, mask)
        return int.from_bytes(data[:size], "little")

    def _string_out(self, insn: _IoInsn, port: int, size: int, first: bytes) -> None:
        count, linear, df, rcx, mask = self._string_span(insn, size, is_write=True)
        data = first
        if count > 1:
            low = linear - (count - 1) * size if df else linear
            block = self._read_linear(low, count * size, ucc.UC_PROT_READ)
            if block is None:
                count = 1
            elif df:
                data = b"".join(block[(count - 1 - k) * size:(count - k) * size]
                                for k in range(count))
            else:
                data = block
        self._exchange(PortAccess(port, size, True, count, True, data), insn)
        self._start_batch(port, size, True, count, b"", rcx, mask)

    def _start_batch(self, port: int, size: int, is_write: bool, count: int, data: bytes,
                     rcx: int, rcx_mask: int) -> None:
        if self._stopping and self._deferred is None:
            return  # the vCPU is ending (or failing): nothing will be replayed
        # Unicorn takes element 0 now and calls the hook again for the others; after a
        # deferral the CPU is rewound to the instruction, so element 0 is asked again.
        first = 0 if self._deferred is not None else 1
        if first < count:
            self._batch = _Batch(port, size, is_write, count, data, first, rcx, rcx_mask)

    def _hook_cpuid(self, _uc: Any, _ud: Any) -> int:
        if self._stopping:
            return 0
        native = self._native
        block = self._cpuid_in
        native.reg_read_batch(self._h, block.ids, block.ptrs, block.count)
        leaf, sub = block.vals[0] & 0xFFFFFFFF, block.vals[1] & 0xFFFFFFFF
        answer = self._vm.cpuid(leaf, sub)
        if leaf == 1:
            if answer is None:
                eax, ebx, ecx, edx = self._vm._leaf1
                ebx = (ebx & 0x00FFFFFF) | ((self._id & 0xFF) << 24)  # initial APIC ID
                cr4 = int(self._uc.reg_read(x86.UC_X86_REG_CR4))
                ecx = ecx | (1 << 27) if cr4 & _CR4_OSXSAVE else ecx & ~(1 << 27)
                answer = (eax, ebx, ecx, edx)
            eax, ebx, ecx, edx = answer
            ecx = ecx | (1 << 31) if self._vm.config.hypervisor_bit else ecx & ~(1 << 31)
            answer = (eax, ebx, ecx, edx)
        if answer is None:
            return 0
        out = self._cpuid_out
        for i, value in enumerate(answer):
            out.vals[i] = value
        native.reg_write_batch(self._h, out.ids, out.ptrs, out.count)
        return 1

    def _hook_syscall(self, _uc: Any, _ud: Any) -> None:
        if self._stopping:
            return
        if self._full is not None:
            self._full.on_syscall()
            return
        rip = self._read_rip()
        self._finish(Exit(ExitKind.ERROR,
                          f"SYSCALL/SYSENTER near rip {rip:#x}: Unicorn 2.1.4 does not execute "
                          "them, so the unicorn backend cannot run this guest"))

    def _hook_intr(self, _uc: Any, vector: int, _ud: Any) -> None:
        if self._stopping:
            return
        if self._full is not None:
            self._full.on_exception(vector)
            return
        self._finish(self._exception_exit(vector, self._read_rip()))

    def _hook_invalid(self, _uc: Any, _ud: Any) -> bool:
        if self._full is not None and not self._stopping:
            self._full.on_exception(6)  # #UD through the guest's IDT
            return True
        if not self._stopping:
            rip = self._read_rip()
            exit_ = self._exception_exit(6, rip)
            code = self._read_linear(self._cs_base() + rip, 4, ucc.UC_PROT_EXEC)
            if code is not None:
                exit_.reason += f"; bytes {code.hex(' ')}"
            self._finish(exit_)
        return False

    def _hook_unmapped(self, _uc: Any, access: int, address: int, size: int, _value: int,
                       _ud: Any) -> bool:
        if not self._stopping:
            kind = {ucc.UC_MEM_READ_UNMAPPED: "read", ucc.UC_MEM_WRITE_UNMAPPED: "write",
                    ucc.UC_MEM_FETCH_UNMAPPED: "instruction fetch"}.get(access, "access")
            self._finish(Exit(ExitKind.ERROR,
                              f"guest {kind} of {size} bytes at {address:#x}, outside guest "
                              f"memory (0..{self._vm.memory.size - 1:#x}), at rip "
                              f"{self._read_rip():#x}"))
        return False

    # -- stopping and resuming -----------------------------------------------------------

    def _request_stop(self) -> None:
        # The rest of the translation block still runs after emu_stop (up to its next
        # memory access or its end); _stopping makes the hooks inert meanwhile.
        self._stopping = True
        self._uc.emu_stop()

    def _mmio_read(self, uc: Any, offset: int, size: int, user_data: object) -> int:
        reply = self._mmio(MmioAccess(MMIO_BASE + offset, size, False))
        return int.from_bytes(reply, "little") if reply else (1 << (8 * size)) - 1

    def _mmio_write(self, uc: Any, offset: int, size: int, value: int,
                    user_data: object) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._mmio(MmioAccess(MMIO_BASE + offset, size, True, data))

    def _mmio(self, access: MmioAccess) -> bytes | None:
        """One MMIO access for the handler; all ones / dropped if it has no ``mmio``."""
        handler = self._handler
        mmio = getattr(handler, "mmio", None)
        if mmio is None or self._stopping:
            return None
        turn = self._vm.turn
        if turn is not None:
            turn.release()  # as for port I/O: the handler runs no guest code
        try:
            reply: bytes | None = mmio(self, access)
        except VcpuStop as stop:
            self._finish(Exit(ExitKind.STOPPED, stop.reason or str(stop), stop.status))
            return None
        except BaseException as exc:  # a host bug: re-raised from run()
            self._fail(exc)
            return None
        finally:
            if turn is not None:
                turn.acquire()
        if not access.is_write and (not isinstance(reply, bytes) or len(reply) != access.size):
            self._fail(TypeError(f"MMIO handler returned {reply!r} for a {access.size}-byte "
                                 f"read at {access.addr:#x}"))
            return None
        return reply

    def _finish(self, exit_: Exit) -> None:
        """End the vCPU with ``exit_`` (from a hook)."""
        self._final = exit_
        self._batch = None
        self._deferred = None
        self._request_stop()

    def _fail(self, exc: BaseException) -> None:
        deferred = self._deferred
        snapshot = deferred.snapshot if deferred is not None else self._uc.context_save()
        self._failure = (exc, snapshot)
        self._batch = None
        self._deferred = None
        self._request_stop()

    def _defer(self, values: tuple[int, ...]) -> None:
        insn, access = self._cur_insn, self._cur_access
        assert insn is not None and access is not None
        self._deferred = _Deferred(self._uc.context_save(), Regs(*values), insn, access)
        self._exit_regs = values
        self._request_stop()

    def _settle(self, error: UcError | None) -> Exit | None:
        """Decide what the end of one emu_start means; None: keep running."""
        self._stopping = False
        if self._final is not None:
            return Exit(self._final.kind, self._final.reason, self._final.status)
        if self._failure is not None:
            exc, snapshot = self._failure
            self._failure = None
            self._restore(snapshot)
            raise exc
        if self._deferred is not None:
            self._complete_deferred()
            return None
        if error is not None:
            self._final = Exit(ExitKind.ERROR, f"Unicorn stopped at rip {self._read_rip():#x}: "
                                               f"{error}")
            return Exit(self._final.kind, self._final.reason)
        if self._kick.is_set():
            self._kick.clear()
            return Exit(ExitKind.KICKED, "kicked")
        return self._halt_exit()

    def _run_full(self, full: FullCpu) -> Exit:
        """The run loop of full-CPU mode: counted slices, interrupts between them."""
        uc = self._uc
        while True:
            if self._final is not None:
                return Exit(self._final.kind, self._final.reason, self._final.status)
            if self._batch is not None:
                self._resync_batch()
            full.begin_iteration()
            if full.halted and not full.wait_for_interrupt(self._kick):
                self._kick.clear()
                return Exit(ExitKind.KICKED, "kicked while halted")
            try:
                full.deliver_interrupt()
            except TripleFault as e:
                return self._shutdown(str(e))
            if full.halted:
                continue
            rip = self._read_rip()
            kicked = self._enter_run()
            if kicked is not None:
                return kicked
            error: UcError | None = None
            full.start_slice()
            try:
                uc.emu_start(rip, 0)
            except UcError as e:
                error = e
            finally:
                with self._lock:
                    self._running = False
            self._stopping = False
            if full.event is not None and self._final is None and self._failure is None \
                    and self._deferred is None:
                try:
                    full.apply_event()
                except TripleFault as e:
                    return self._shutdown(str(e))
                continue
            full.event = None
            if self._final is not None or self._failure is not None \
                    or self._deferred is not None or error is not None:
                outcome = self._settle(error)
                if outcome is not None:
                    return outcome
                continue
            if self._kick.is_set():
                self._kick.clear()
                return Exit(ExitKind.KICKED, "kicked")
            rip = self._read_rip()
            if full.check_halt(rip):
                if int(uc.reg_read(x86.UC_X86_REG_RFLAGS)) & _RFLAGS_IF:
                    full.halted = True
                    continue
                return Exit(ExitKind.HALTED, f"hlt at rip {rip - 1:#x} with interrupts "
                                             f"disabled")

    def _shutdown(self, why: str) -> Exit:
        self._final = Exit(ExitKind.SHUTDOWN, f"triple fault: {why}")
        return Exit(self._final.kind, self._final.reason)

    def _halt_exit(self) -> Exit | None:
        rip = self._read_rip()
        linear = self._cs_base() + rip
        start = max(0, linear - 3)
        before = self._read_linear(start, linear - start, ucc.UC_PROT_EXEC) or b""
        if before.endswith(b"\xf4") or before == b"\x0f\x01\xc9":  # hlt, mwait
            rflags = int(self._uc.reg_read(x86.UC_X86_REG_RFLAGS))
            if rflags & _RFLAGS_IF:
                self._parked = True
                return None
            return Exit(ExitKind.HALTED, f"hlt at rip {rip - 1:#x} with interrupts disabled")
        self._final = Exit(ExitKind.ERROR, f"Unicorn stopped without a cause at rip {rip:#x}")
        return Exit(self._final.kind, self._final.reason)

    def _complete_deferred(self) -> None:
        deferred = self._deferred
        assert deferred is not None
        self._deferred = None
        self._restore(deferred.snapshot)
        regs, insn, access = deferred.regs, deferred.insn, deferred.access
        if regs.rip != insn.rip:
            self._batch = None  # the instruction is abandoned, as KVM does when RIP moved
        elif insn.length == 0:
            self._final = Exit(ExitKind.ERROR, f"cannot decode the I/O instruction at rip "
                                               f"{insn.rip:#x} to complete it")
            return
        elif not insn.string:
            regs.rip = insn.rip + insn.length
            if not access.is_write:
                value = int.from_bytes(deferred.data, "little")
                if access.size == 4:
                    regs.rax = value
                else:
                    mask = _SIZE_MASK[access.size]
                    regs.rax = (regs.rax & ~mask) | value
        # A string instruction stays at RIP and is replayed from the batch.
        self._load_regs(regs)

    def _resync_batch(self) -> None:
        """Line a REP batch up with the elements the guest has really completed.

        A kick can stop Unicorn after an INS element's store but before RCX counts it; the
        element then runs again, and must get the same data again.
        """
        batch = self._batch
        assert batch is not None
        if not batch.rcx_mask:
            return
        rcx = int(self._uc.reg_read(x86.UC_X86_REG_RCX))
        done = (batch.rcx - rcx) & batch.rcx_mask
        if 0 <= done < batch.count:
            batch.index = done
        else:
            self._batch = None

    def _restore(self, snapshot: Any) -> None:
        self._uc.context_restore(snapshot)
        # context_restore leaves QEMU's lazy flags stale; writing RFLAGS resynchronises them.
        self._uc.reg_write(x86.UC_X86_REG_RFLAGS, self._uc.reg_read(x86.UC_X86_REG_RFLAGS))

    def _rekick_later(self, gen: int, delay: float) -> None:
        # uc_emu_start clears a stop requested just before it starts, so a kick racing the
        # start of a run is repeated until that run ends.
        timer = threading.Timer(delay, self._rekick, (gen, delay))
        timer.daemon = True
        timer.start()

    def _rekick(self, gen: int, delay: float) -> None:
        with self._lock:
            if (self._closed or not self._running or self._run_gen != gen
                    or not self._kick.is_set()):
                return
            self._uc.emu_stop()
        self._rekick_later(gen, min(delay * 2, 0.05))

    # -- state helpers -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise HostError(f"vCPU {self._id} is closed")

    def _load_regs(self, regs: Regs) -> None:
        self._load_values(_regs_tuple(regs))

    def _load_values(self, values: tuple[int, ...]) -> None:
        """Write every register (outside emulation, where RIP/RFLAGS writes are safe)."""
        block = self._all_regs
        block.vals[:] = list(values)
        err = self._native.reg_write_batch(self._h, block.ids, block.ptrs, block.count)
        if err:
            raise HostError(f"Unicorn refused a register write: {_uc_error(err)}")

    def _enter_run(self) -> Exit | None:
        """Mark the vCPU running, unless a kick came first: then the KICKED exit."""
        with self._lock:
            if self._kick.is_set():
                self._kick.clear()
                return Exit(ExitKind.KICKED, "kicked")
            self._running = True
            self._run_gen += 1
        return None

    def _read_rip(self) -> int:
        self._native.reg_read(self._h, self._rip_id, self._rip_ref)
        return self._rip.value

    def _read_linear(self, address: int, length: int, prot: int) -> bytes | None:
        if address < 0 or length <= 0:
            return None
        buf = ctypes.create_string_buffer(length)
        if self._native.vmem_read(self._h, address & _U64, prot, buf, length):
            return None
        return buf.raw

    def _translate(self, address: int, prot: int) -> int | None:
        phys = ctypes.c_uint64()
        if self._native.vmem_translate(self._h, address & _U64, prot, ctypes.byref(phys)):
            return None
        return phys.value

    def _mode(self, cs: int) -> tuple[int, bool, int]:
        """(code bits, real-or-vm86, CS base) of the CPU as it is now."""
        block = self._mode_regs
        self._native.reg_read_batch(self._h, block.ids, block.ptrs, block.count)
        cr0, rflags = block.vals[0], block.vals[1]
        if not cr0 & _CR0_PE or rflags & _RFLAGS_VM:
            return 16, True, cs << 4
        long_mode = bool(int(self._uc.msr_read(_EFER)) & _EFER_LMA)
        descriptor = self._descriptor(cs)
        if descriptor is None:
            return (64 if long_mode else 32), False, 0
        if long_mode and descriptor & _DESC_L:
            return 64, False, 0
        return (32 if descriptor & _DESC_D else 16), False, _descriptor_base(descriptor)

    def _cs_base(self) -> int:
        return self._mode(self._read_cs())[2]

    def _descriptor(self, selector: int) -> int | None:
        """The 8-byte descriptor for ``selector`` as the guest's tables hold it now.

        Unicorn does not expose its segment caches; a guest that changed a descriptor after
        loading it is rare enough that the table is taken as the truth.
        """
        if selector & 0x4:
            _sel, base, limit, _flags = self._uc.reg_read(x86.UC_X86_REG_LDTR)
        else:
            _sel, base, limit, _flags = self._uc.reg_read(x86.UC_X86_REG_GDTR)
        index = selector & ~0x7
        if index == 0 or index + 7 > limit:
            return None
        # Not uc_vmem_read: it translates with the current CPL, and at CPL 3 the GDT is
        # normally a supervisor page.
        phys = self._walk(base + index)
        if phys is None or phys + 8 > len(self._mem):
            return None
        return int.from_bytes(self._mem[phys:phys + 8], "little")

    def _walk(self, linear: int) -> int | None:
        """Guest-physical address of ``linear`` through the guest's page tables, ignoring
        access rights (the CPU's own descriptor loads are supervisor accesses)."""
        cr0 = int(self._uc.reg_read(x86.UC_X86_REG_CR0))
        if not cr0 & _CR0_PG:
            return linear & 0xFFFFFFFF
        cr3 = int(self._uc.reg_read(x86.UC_X86_REG_CR3))
        cr4 = int(self._uc.reg_read(x86.UC_X86_REG_CR4))
        levels: tuple[int, ...]
        if int(self._uc.msr_read(_EFER)) & _EFER_LMA:
            table, levels, width = cr3 & _ADDRESS_MASK & ~0xFFF, (39, 30, 21, 12), 8
        elif cr4 & _CR4_PAE:
            pdpte = self._page_entry((cr3 & ~0x1F) + ((linear >> 30) & 3) * 8, 8)
            if pdpte is None or not pdpte & 1:
                return None
            table, levels, width = pdpte & _ADDRESS_MASK & ~0xFFF, (21, 12), 8
        else:
            table, levels, width = cr3 & 0xFFFFF000, (22, 12), 4
        for shift in levels:
            index_bits = 9 if width == 8 else 10
            entry = self._page_entry(table + ((linear >> shift) & ((1 << index_bits) - 1))
                                     * width, width)
            if entry is None or not entry & 1:
                return None
            if shift > 12 and entry & 0x80 and (width == 8 or cr4 & _CR4_PSE):
                if width == 4:  # 4 MiB page; bits 13..20 extend the address (PSE-36)
                    frame = (entry & 0xFFC00000) | ((entry & 0x1FE000) << 19)
                else:
                    frame = entry & _ADDRESS_MASK & ~((1 << shift) - 1)
                return frame | (linear & ((1 << shift) - 1))
            table = entry & (_ADDRESS_MASK & ~0xFFF if width == 8 else 0xFFFFF000)
        return table | (linear & 0xFFF)

    def _page_entry(self, phys: int, width: int) -> int | None:
        if phys + width > len(self._mem):
            return None
        return int.from_bytes(self._mem[phys:phys + width], "little")

    def _segment_base(self, segment: int, bits: int, real: bool) -> int:
        if bits == 64:
            if segment == x86.UC_X86_REG_FS:
                return int(self._uc.reg_read(x86.UC_X86_REG_FS_BASE))
            if segment == x86.UC_X86_REG_GS:
                return int(self._uc.reg_read(x86.UC_X86_REG_GS_BASE))
            return 0
        selector = int(self._uc.reg_read(segment)) & 0xFFFF
        if real:
            return selector << 4
        descriptor = self._descriptor(selector)
        return _descriptor_base(descriptor) if descriptor is not None else 0

    def _classify(self) -> _IoInsn:
        """The I/O instruction at RIP, from the cache when its bytes are unchanged."""
        self._native.reg_read(self._h, self._rip_id, self._rip_ref)
        rip = self._rip.value
        insn = self._insns.get(rip)
        if (insn is not None and self._mem[insn.phys:insn.end] == insn.code
                and (insn.cs < 0 or self._read_cs() == insn.cs)):
            return insn
        return self._decode(rip)

    def _read_cs(self) -> int:
        self._native.reg_read(self._h, self._cs_id, self._cs_ref)
        return self._cs.value & 0xFFFF

    def _decode(self, rip: int) -> _IoInsn:
        cs = self._read_cs()
        bits, _real, cs_base = self._mode(cs)
        linear = cs_base + rip if bits == 64 else (cs_base + rip) & 0xFFFFFFFF
        in_page = PAGE - (linear & (PAGE - 1))
        code = self._read_linear(linear, min(15, in_page), ucc.UC_PROT_EXEC)
        if code is not None and in_page < 15:
            more = self._read_linear(linear + in_page, 15 - in_page, ucc.UC_PROT_EXEC)
            code += more or b""
        phys = self._translate(linear, ucc.UC_PROT_EXEC)
        decoded = _decode_io(code, bits) if code is not None else None
        if decoded is None or phys is None:
            return _IoInsn(rip=rip, length=0)
        length, string, rep, addr_override, segment = decoded
        end = phys + min(length, in_page)
        insn = _IoInsn(rip, length, string, phys, end, self._mem[phys:end], rep, addr_override,
                       segment, -1 if bits == 64 else cs)
        if len(self._insns) >= _DECODE_CACHE_LIMIT:
            self._insns.clear()
        self._insns[rip] = insn
        return insn

    def _string_span(self, insn: _IoInsn, size: int,
                     is_write: bool) -> tuple[int, int, int, int, int]:
        """(elements in this batch, linear address of the first, DF, RCX, RCX mask; 0 when
        not REP) of an INS/OUTS."""
        block = self._string_regs
        self._native.reg_read_batch(self._h, block.ids, block.ptrs, block.count)
        rflags, rcx, rsi, rdi = block.vals
        bits, real, _cs_base = self._mode(self._read_cs())
        mask = (1 << _address_bits(bits, insn.addr_override)) - 1
        wanted = max(1, rcx & mask) if insn.rep else 1
        offset = (rsi if is_write else rdi) & mask
        segment = insn.segment if is_write else x86.UC_X86_REG_ES
        linear = self._segment_base(segment, bits, real) + offset
        df = 1 if rflags & _RFLAGS_DF else 0
        if df:
            in_page = (linear & (PAGE - 1)) // size + 1
            in_segment = offset // size + 1
        else:
            in_page = (PAGE - (linear & (PAGE - 1))) // size
            in_segment = (mask + 1 - offset) // size
        count = max(1, min(wanted, in_page, in_segment, _STRING_BATCH_BYTES // size))
        return count, linear, df, rcx, mask if insn.rep else 0

    def _exception_exit(self, vector: int, rip: int) -> Exit:
        name = _VECTOR_NAMES.get(vector, f"interrupt {vector:#x}")
        if vector == 14:
            name += f" at address {int(self._uc.reg_read(x86.UC_X86_REG_CR2)):#x}"
        _sel, _base, limit, _flags = self._uc.reg_read(x86.UC_X86_REG_IDTR)
        cr0 = int(self._uc.reg_read(x86.UC_X86_REG_CR0))
        if not cr0 & _CR0_PE:
            gate = 4
        elif int(self._uc.msr_read(_EFER)) & _EFER_LMA:
            gate = 16
        else:
            gate = 8
        if (vector + 1) * gate - 1 > limit:
            # A CPU cannot deliver it: #GP, then #DF, through the same empty IDT, then shutdown.
            return Exit(ExitKind.SHUTDOWN, f"triple fault: {name} at rip {rip:#x} and the IDT "
                                           f"(limit {limit:#x}) has no gate for it")
        return Exit(ExitKind.ERROR, f"guest exception {name} at rip {rip:#x}: delivering it "
                                    "through the guest IDT is not implemented on the unicorn "
                                    "backend")


_regs_getter: Final = operator.attrgetter(*_REG_NAMES)


def _regs_tuple(regs: Regs) -> tuple[int, ...]:
    """The registers in _REG_IDS order, range-checked, with RFLAGS' fixed bit set.

    Non-integers that compare like numbers are refused by ctypes when written.
    """
    values: tuple[int, ...] = _regs_getter(regs)
    try:
        valid = min(values) >= 0 and max(values) <= _U64
    except TypeError:
        valid = False
    if not valid:
        bad = next(f"{n} = {v!r}" for n, v in zip(_REG_NAMES, values, strict=True)
                   if not isinstance(v, int) or not 0 <= v <= _U64)
        raise ValueError(f"register {bad} is not a 64-bit unsigned value")
    if not values[_RFLAGS_INDEX] & _RFLAGS_FIXED:
        values = (*values[:_RFLAGS_INDEX], values[_RFLAGS_INDEX] | _RFLAGS_FIXED)
    return values


def _descriptor_base(descriptor: int) -> int:
    return ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24)


if TYPE_CHECKING:

    def _conforms(backend: UnicornBackend, vm: UnicornVm,
                  vcpu: UnicornVcpu) -> tuple[Backend, Vm, Vcpu, VcpuContext]:
        return backend, vm, vcpu, vcpu
