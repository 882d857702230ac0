"""Three fields of Unicorn 2.1.4's CPU state that its API does not reach, found by probing.

A stock kernel needs three things the API of Unicorn 2.1.4 cannot do (found by the Linux
spike, shared/spec/linux-on-unicorn.md):

* **CPL.** In 64-bit mode a CS or SS write changes only the selector; the privilege level
  lives in QEMU's ``env->hflags`` (its low two bits). Entering the kernel from user mode by
  hand (an interrupt, SYSCALL, a fault in user mode) must change it.
* **old_exception.** QEMU resets ``env->old_exception`` only when it delivers an exception
  itself, which Unicorn never does; left alone, the second #PF of a boot becomes a #DF and
  the third a silent shutdown. It must be reset to -1 after each exception we deliver.
* **error_code.** QEMU stores the exception's error code (a #PF's P/W/U/I bits, a #GP's
  selector) in ``env->error_code``; Unicorn's interrupt hook does not pass it on.

All three are in the blob ``uc_context_save`` copies (the CPUX86State), at offsets that
depend on the build. :func:`probe` finds them once per process by running small programs
in a scratch ``Uc`` and diffing the blobs: a CPL 0 and a CPL 3 context differ by 3 in exactly
one word whose other bits say long mode (hflags); a #PF at a known address sets exactly one
word from -1 to 14 (old_exception) and, with two different causes, exactly one word to the
two known error codes (error_code). If any search finds zero or several candidates, or the
result does not change the CPU's behaviour as expected, :func:`probe` raises HostError: the
unicorn package is not the build this was written for, and guessing would corrupt guests.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass
from typing import Any

from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86
from unicorn.unicorn_py3 import Uc, UcError

from hvmport.errors import HostError

EXPECTED_VERSION = "2.1.4"

#: QEMU's hflags: CPL in bits 0-1; set in 64-bit mode are HF_PE (7), HF_LMA (14) and
#: HF_CS64 (15).
_HF_LONG = (1 << 7) | (1 << 14) | (1 << 15)
_PF = 14
_GP = 13

# Scratch machine for the probes: GDT at 0x1000, page tables at 0x2000..0x4fff, code at
# 0x5000 (user-accessible), a read-only page at 0x6000, stacks below 0x8000 and 0x9000.
_GDT = 0x1000
_PML4, _PDPT, _PT_DIR, _PT = 0x2000, 0x3000, 0x4000, 0xA000
_CODE, _RO_PAGE, _ABSENT = 0x5000, 0x6000, 0x7000
_USER_STACK, _KERNEL_STACK = 0x8FF0, 0x9FF0
_SEL_KCODE, _SEL_KDATA, _SEL_UDATA, _SEL_UCODE = 0x08, 0x10, 0x1B, 0x23


@dataclass(frozen=True, slots=True)
class Offsets:
    """Byte offsets of fields inside the context blob."""

    hflags: int
    old_exception: int
    error_code: int
    size: int


_lock = threading.Lock()
_found: Offsets | None = None


def probe() -> Offsets:
    """The offsets for the installed libunicorn (probed once per process)."""
    global _found
    with _lock:
        if _found is None:
            _found = _probe()
        return _found


def blob(context: Any, size: int) -> Any:
    """A writable view of a saved context's bytes."""
    address = context.context.value if hasattr(context.context, "value") else context.context
    return (ctypes.c_char * size).from_address(address)


class ContextPatcher:
    """Changes CPL and resets old_exception of one ``Uc`` through a reusable context."""

    def __init__(self, uc: Any, offsets: Offsets) -> None:
        self.uc = uc
        self.offsets = offsets
        self.context = uc.context_save()
        self.view = blob(self.context, offsets.size)

    def error_code(self) -> int:
        self.uc.context_update(self.context)
        return int(struct.unpack_from("<i", self.view, self.offsets.error_code)[0]) & 0xFFFFFFFF

    def patch(self, *, cpl: int | None = None) -> None:
        """Reset old_exception to -1 and, if given, set the CPL; registers are unchanged."""
        uc = self.uc
        uc.context_update(self.context)
        struct.pack_into("<i", self.view, self.offsets.old_exception, -1)
        if cpl is not None:
            hflags = struct.unpack_from("<I", self.view, self.offsets.hflags)[0]
            struct.pack_into("<I", self.view, self.offsets.hflags, (hflags & ~3) | cpl)
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        uc.context_restore(self.context)
        # context_restore leaves QEMU's lazy flags stale; writing RFLAGS resynchronises them.
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags)


# --- the probes ----------------------------------------------------------------------------


def _probe() -> Offsets:
    import unicorn

    version = getattr(unicorn, "__version__", "?")
    if not str(version).startswith(EXPECTED_VERSION):
        raise HostError(f"the unicorn package is {version}, not {EXPECTED_VERSION}: the "
                        f"full-CPU mode reads Unicorn's internal CPU state and is only "
                        f"validated on {EXPECTED_VERSION} (pyproject.toml pins it)")
    try:
        hflags, size = _find_hflags()
        old_exception, error_code = _find_exception_fields(size)
        offsets = Offsets(hflags, old_exception, error_code, size)
        _validate(offsets)
    except UcError as e:
        raise HostError(f"probing Unicorn's CPU state failed: {e}") from e
    return offsets


def _machine() -> Any:
    uc: Any = Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    gdt = struct.pack("<5Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF,
                      0x00CFF2000000FFFF, 0x00AFFA000000FFFF)
    uc.mem_write(_GDT, gdt)
    user = 7
    uc.mem_write(_PML4, struct.pack("<Q", _PDPT | user))
    uc.mem_write(_PDPT, struct.pack("<Q", _PT_DIR | user))
    uc.mem_write(_PT_DIR, struct.pack("<Q", _PT | user))
    entries = []
    for page in range(16):
        address = page << 12
        if address == _ABSENT:
            entries.append(0)
        elif address == _RO_PAGE:
            entries.append(address | 5)  # present, user, read-only
        else:
            entries.append(address | user)
    uc.mem_write(_PT, struct.pack("<16Q", *entries))
    uc.reg_write(x86.UC_X86_REG_CR3, _PML4)
    uc.reg_write(x86.UC_X86_REG_CR4, 1 << 5)  # PAE
    uc.msr_write(0xC0000080, (1 << 8) | (1 << 10))
    uc.reg_write(x86.UC_X86_REG_CR0, (1 << 31) | (1 << 16) | (1 << 4) | 1)  # PG WP ET PE
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, _GDT, len(gdt) - 1, 0))
    uc.reg_write(x86.UC_X86_REG_RSP, _KERNEL_STACK)
    uc.ctl_exits_enabled(True)
    return uc


def _run_until_exception(uc: Any, code: bytes) -> tuple[int, Any]:
    """Run ``code`` at _CODE; the vector of the first exception and the context then."""
    uc.mem_write(_CODE, code)
    got: dict[str, Any] = {}

    def on_intr(u: Any, vector: int, _ud: Any) -> None:
        if "vector" not in got:
            got["vector"] = vector
            got["context"] = u.context_save()
        u.emu_stop()

    handle = uc.hook_add(ucc.UC_HOOK_INTR, on_intr)
    try:
        uc.emu_start(_CODE, 0, count=50)
    finally:
        uc.hook_del(handle)
    if "vector" not in got:
        raise HostError("Unicorn probe: the probe program raised no exception")
    return got["vector"], got["context"]


def _find_hflags() -> tuple[int, int]:
    uc = _machine()
    kernel = uc.context_save()
    size = int(kernel.size)
    before = bytes(blob(kernel, size))
    # iretq to CPL 3 at _CODE + 0x100, where hlt raises #GP (a privileged instruction).
    frame = struct.pack("<5Q", _CODE + 0x100, _SEL_UCODE, 0x2, _USER_STACK, _SEL_UDATA)
    uc.mem_write(_KERNEL_STACK - len(frame), frame)
    uc.reg_write(x86.UC_X86_REG_RSP, _KERNEL_STACK - len(frame))
    uc.mem_write(_CODE + 0x100, b"\x90\xf4")
    vector, user = _run_until_exception(uc, b"\x48\xcf")
    if vector != _GP:
        raise HostError(f"Unicorn probe: hlt at CPL 3 raised vector {vector}, not #GP")
    after = bytes(blob(user, size))
    candidates = []
    for off in range(0, size - 3, 4):
        x, y = struct.unpack_from("<II", before[off:off + 4] + after[off:off + 4])
        if x ^ y == 3 and x & 3 == 0 and x & _HF_LONG == _HF_LONG:
            candidates.append(off)
    if len(candidates) != 1:
        raise HostError(f"Unicorn probe: {len(candidates)} candidates for hflags (CPL) in the "
                        f"CPU context, expected exactly one: not Unicorn {EXPECTED_VERSION}")
    return candidates[0], size


def _find_exception_fields(size: int) -> tuple[int, int]:
    """old_exception: -1 before a #PF, 14 after. error_code: 2 for a write to a page that
    is not present, 3 for a write to a read-only page (CR0.WP), in the same word."""
    uc = _machine()
    initial = bytes(blob(uc.context_save(), size))
    # mov %eax, (_ABSENT)
    vector, absent = _run_until_exception(uc, b"\x89\x04\x25" + struct.pack("<I", _ABSENT))
    if vector != _PF:
        raise HostError(f"Unicorn probe: a write to an absent page raised {vector}, not #PF")
    uc2 = _machine()
    vector, readonly = _run_until_exception(uc2, b"\x89\x04\x25" + struct.pack("<I", _RO_PAGE))
    if vector != _PF:
        raise HostError(f"Unicorn probe: a write to a read-only page raised {vector}, not #PF")
    a, b = bytes(blob(absent, size)), bytes(blob(readonly, size))
    old, codes = [], []
    for off in range(0, size - 3, 4):
        i0 = struct.unpack_from("<i", initial, off)[0]
        ia, ib = struct.unpack_from("<i", a, off)[0], struct.unpack_from("<i", b, off)[0]
        if i0 == -1 and ia == _PF and ib == _PF:
            old.append(off)
        if ia == 2 and ib == 3:
            codes.append(off)
    if len(old) != 1 or len(codes) != 1:
        raise HostError(f"Unicorn probe: {len(old)} candidates for old_exception and "
                        f"{len(codes)} for error_code, expected one each: not Unicorn "
                        f"{EXPECTED_VERSION}")
    return old[0], codes[0]


def _validate(offsets: Offsets) -> None:
    """Patching CPL to 3 must make hlt fault; resetting old_exception must keep a second
    #PF a #PF (not a #DF)."""
    uc = _machine()
    patcher = ContextPatcher(uc, offsets)
    patcher.patch(cpl=3)
    vector, _ = _run_until_exception(uc, b"\xf4")
    if vector != _GP:
        raise HostError("Unicorn probe: setting CPL 3 through hflags did not make hlt fault")
    uc = _machine()
    store = b"\x89\x04\x25" + struct.pack("<I", _ABSENT)
    _run_until_exception(uc, store)
    ContextPatcher(uc, offsets).patch()
    vector, _ = _run_until_exception(uc, store)
    if vector != _PF:
        raise HostError(f"Unicorn probe: a second #PF after resetting old_exception raised "
                        f"{vector}")
