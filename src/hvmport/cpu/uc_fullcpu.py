"""What stock Unicorn 2.1.4 leaves out of a 64-bit x86 CPU, done by hand between slices.

The unicorn backend runs in *full-CPU mode* when its VM is given an interrupt source (the
hypervisor's PIC/PIT platform); hvmport uses it for Linux guests. Then:

* **Hardware interrupts** are delivered through the guest's IDT between slices of about
  ``SLICE_BLOCKS`` translation blocks, which a C block hook ends (:mod:`uc_slicer`): when
  the PIC has a request and RFLAGS.IF is set and no STI/MOV SS shadow is active (QEMU's
  HF_INHIBIT_IRQ, read from the CPU context), the vector is acknowledged and delivered.
* **Exceptions and INT n** reach ``UC_HOOK_INTR`` (and #UD ``UC_HOOK_INSN_INVALID``), never
  the guest IDT. The hook stops the slice; the exception is then delivered through the IDT
  with the error code QEMU computed (read from the context, so #PF's P/W/U/I bits are
  exact) and QEMU's old_exception reset, so the next fault is not taken for a double fault.
  CR2 is already set by QEMU.
* **Delivery** follows the 64-bit rules: the gate's selector gives the new CPL; the stack is
  the gate's IST entry, else TSS.RSP0 on a privilege change, else the current one, aligned
  to 16; SS, RSP, RFLAGS, CS, RIP and the error code are pushed; interrupt gates clear IF;
  TF, NT, RF and VM are cleared. A gate that is absent or outside the IDT, or a stack that is
  not mapped, is a triple fault (the vCPU shuts down).
* **SYSCALL** only calls its hook in Unicorn (then RIP += 2); it is completed here: RCX and
  R11, CS/SS from STAR, RFLAGS masked by SFMASK, RIP = LSTAR, CPL 0. SYSRET, IRETQ and
  SWAPGS are native.
* **CPL** changes into the kernel go through :class:`~hvmport.cpu.uc_internals.ContextPatcher`
  (a 64-bit CS write changes only the selector).
* **HLT** ends ``emu_start`` with RIP after it and no trace, so a return that the slice
  hook did not cause is a HLT. When the slice hook did fire, a HLT may still have ended
  the block it let run on; then a suspected HLT site (RIP - 1 holds 0xF4) gets a
  one-address code hook: it fires only if an instruction starts there, and an instruction
  starting with byte 0xF4 is HLT. The first time a site is seen the guest just continues
  (a spurious wake-up, which every idle loop tolerates); from then on a HLT there is known
  exactly. Halted with IF set, the vCPU sleeps until the PIC has a request (the PIT's next
  deadline, or a device model's interrupt line, wakes it).
* **Stopping** from another thread (``uc_emu_stop``) is never used in this mode: the spike
  found that it corrupts a running kernel. A kick or an interrupt line sets the slice
  hook's stop flag, and the vCPU's own thread stops at the next block.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hvmport.cpu import uc_internals, uc_slicer
from hvmport.errors import HostError

if TYPE_CHECKING:
    from hvmport.cpu.unicorn import UnicornVcpu

#: Translation blocks per slice (about 100,000 instructions, a millisecond or two).
SLICE_BLOCKS: Final = 25_000
#: A slice while an interrupt waits for IF (or the shadow) to open: deliver it promptly.
SHORT_SLICE_BLOCKS: Final = 500
#: Longest sleep of a halted vCPU without a timer deadline (device-model lines wake it).
IDLE_WAIT_S: Final = 0.05
#: At most this many suspected HLT sites get a code hook.
MAX_HLT_SITES: Final = 256

ERROR_CODE_VECTORS: Final = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_MSR_STAR, _MSR_LSTAR, _MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
_RF_TF, _RF_IF, _RF_NT, _RF_RF, _RF_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
_HF_INHIBIT_IRQ: Final = 1 << 3
_GATE_INTERRUPT, _GATE_TRAP = 0xE, 0xF
_U64: Final = (1 << 64) - 1


class InterruptSource(Protocol):
    """The interrupt controller as the CPU sees it (hvmport.hv.platform.Platform)."""

    def poll(self) -> int | None:
        """The vector the controller would deliver now, if any."""
        ...

    def acknowledge(self) -> int | None:
        """Interrupt acknowledge: the vector to deliver, now in service."""
        ...

    def next_event_ns(self) -> int | None:
        """When (monotonic ns) a timer will next raise a request, if it will."""
        ...

    def add_listener(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever an interrupt line changes."""
        ...


@dataclass(slots=True)
class Event:
    """What a hook saw, applied after the slice stops."""

    kind: str  # "exception" or "syscall"
    vector: int
    rip: int


class TripleFault(Exception):
    pass


@dataclass(slots=True)
class Stats:
    slices: int = 0
    interrupts: int = 0
    exceptions: int = 0
    page_faults: int = 0
    syscalls: int = 0
    halts: int = 0
    cpl_changes: int = 0


class FullCpu:
    def __init__(self, vcpu: UnicornVcpu, uc: Any, interrupts: InterruptSource) -> None:
        self.vcpu = vcpu
        self.uc = uc
        self.interrupts = interrupts
        self.patcher = uc_internals.ContextPatcher(uc, uc_internals.probe())
        self.event: Event | None = None
        self.halted = False
        self.wakeup = threading.Event()
        # The C block hook ends slices (uc_slicer); its state is shared memory.
        self.slice = uc_slicer.Slice(0, 0, 0, uc_slicer.emu_stop_address())
        handle = ctypes.c_size_t()
        native = vcpu._native
        err = native.hook_add(ctypes.c_void_p(uc._uch.value), ctypes.byref(handle),
                              ctypes.c_int(ucc.UC_HOOK_BLOCK),
                              ctypes.c_void_p(uc_slicer.hook_address()),
                              ctypes.c_void_p(ctypes.addressof(self.slice)),
                              ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise HostError(f"cannot add the slice hook to Unicorn (error {err})")
        interrupts.add_listener(self.wake)
        self.stats = Stats()
        self._hlt_sites: dict[int, Any] = {}
        self._hlt_hit: int | None = None

    # -- hooks (inside emu_start) ---------------------------------------------------------

    def on_exception(self, vector: int) -> None:
        self.event = Event("exception", vector, int(self.uc.reg_read(x86.UC_X86_REG_RIP)))
        self.uc.emu_stop()

    def on_syscall(self) -> None:
        self.event = Event("syscall", 0, int(self.uc.reg_read(x86.UC_X86_REG_RIP)))
        self.uc.emu_stop()

    def _on_hlt_site(self, _uc: Any, address: int, _size: int, _ud: Any) -> None:
        self._hlt_hit = address

    # -- between slices ---------------------------------------------------------------------

    def wake(self) -> None:
        """From any thread: end the running slice at its next block, wake a halted CPU."""
        self.slice.stop = 1
        self.wakeup.set()

    def begin_iteration(self) -> None:
        """Before looking for interrupts: a wake-up after this ends the next slice."""
        self.slice.stop = 0

    def start_slice(self) -> None:
        self.stats.slices += 1
        self._hlt_hit = None
        self.slice.fired = 0
        pending = self.interrupts.poll() is not None
        self.slice.left = SHORT_SLICE_BLOCKS if pending else SLICE_BLOCKS

    def apply_event(self) -> None:
        """Deliver what a hook saw. Raises TripleFault if the guest cannot take it."""
        event, self.event = self.event, None
        assert event is not None
        if event.kind == "syscall":
            self._syscall()
            return
        self.stats.exceptions += 1
        if event.vector == 14:
            self.stats.page_faults += 1
        error = self.patcher.error_code() if event.vector in ERROR_CODE_VECTORS else None
        self.patcher.patch()  # old_exception = -1: the next fault is a fault, not a #DF
        self.deliver(event.vector, event.rip, error)

    def deliver_interrupt(self) -> bool:
        """Deliver the PIC's request if the CPU takes interrupts now; True if delivered."""
        if self.interrupts.poll() is None:
            return False
        rflags = int(self.uc.reg_read(x86.UC_X86_REG_RFLAGS))
        if not rflags & _RF_IF or self._interrupt_shadow():
            return False
        vector = self.interrupts.acknowledge()
        if vector is None:
            return False
        self.stats.interrupts += 1
        self.halted = False
        self.deliver(vector, int(self.uc.reg_read(x86.UC_X86_REG_RIP)), None)
        return True

    def check_halt(self, rip: int) -> bool:
        """After a slice that no hook of ours ended: was it a HLT at rip - 1?"""
        site = (rip - 1) & _U64
        if not self.slice.fired:
            # Nothing but HLT ends emu_start without a hook saying so.
            self.stats.halts += 1
            return True
        if self._hlt_hit == site:
            self.stats.halts += 1
            return True
        if site not in self._hlt_sites and len(self._hlt_sites) < MAX_HLT_SITES:
            phys = self.vcpu._walk(site)
            mem = self.vcpu._mem
            if phys is not None and phys < len(mem) and mem[phys] == 0xF4:
                handle = self.uc.hook_add(ucc.UC_HOOK_CODE, self._on_hlt_site, None, site,
                                          site)
                self._hlt_sites[site] = handle
                self.uc.ctl_remove_cache(site, site + 1)
        return False

    def wait_for_interrupt(self, kicked: threading.Event) -> bool:
        """Sleep while halted until the PIC has a request (True) or a kick (False)."""
        while True:
            if kicked.is_set():
                return False
            if self.interrupts.poll() is not None:
                return True
            deadline = self.interrupts.next_event_ns()
            timeout = IDLE_WAIT_S
            if deadline is not None:
                timeout = min(timeout, max(0.0, (deadline - time.monotonic_ns()) / 1e9))
            if timeout > 0:
                self.wakeup.wait(timeout)
                self.wakeup.clear()

    # -- mechanisms -------------------------------------------------------------------------

    def _interrupt_shadow(self) -> bool:
        self.uc.context_update(self.patcher.context)
        hflags = struct.unpack_from("<I", self.patcher.view, self.patcher.offsets.hflags)[0]
        return bool(hflags & _HF_INHIBIT_IRQ)

    def deliver(self, vector: int, rip: int, error: int | None) -> None:
        uc = self.uc
        _sel, idt_base, idt_limit, _flags = uc.reg_read(x86.UC_X86_REG_IDTR)
        if vector * 16 + 15 > idt_limit:
            raise TripleFault(f"vector {vector} is outside the IDT (limit {idt_limit:#x})")
        gate = self._read_u64(idt_base + vector * 16), self._read_u64(idt_base + vector * 16 + 8)
        if gate[0] is None or gate[1] is None:
            raise TripleFault(f"the IDT entry of vector {vector} is not mapped")
        low, high = gate[0], gate[1]
        kind = (low >> 40) & 0xF
        if not low >> 47 & 1 or kind not in (_GATE_INTERRUPT, _GATE_TRAP):
            raise TripleFault(f"vector {vector} has no present interrupt or trap gate")
        target = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | (high & 0xFFFFFFFF) << 32
        selector = (low >> 16) & 0xFFFF
        ist = (low >> 32) & 7
        descriptor = self.vcpu._descriptor(selector)
        if descriptor is None:
            raise TripleFault(f"vector {vector}'s gate selector {selector:#x} is not in the GDT")
        new_cpl = (descriptor >> 45) & 3
        cs = int(uc.reg_read(x86.UC_X86_REG_CS)) & 0xFFFF
        ss = int(uc.reg_read(x86.UC_X86_REG_SS)) & 0xFFFF
        rsp = int(uc.reg_read(x86.UC_X86_REG_RSP))
        rflags = int(uc.reg_read(x86.UC_X86_REG_RFLAGS))
        cpl = cs & 3
        if ist or new_cpl < cpl:
            _tsel, tss, _tlimit, _tflags = uc.reg_read(x86.UC_X86_REG_TR)
            slot = tss + 0x24 + 8 * (ist - 1) if ist else tss + 4 + 8 * new_cpl
            stack = self._read_u64(slot)
            if stack is None:
                raise TripleFault(f"the TSS stack pointer for vector {vector} is not mapped")
        else:
            stack = rsp
        frame = [ss, rsp, rflags, cs, rip] + ([error] if error is not None else [])
        top = (stack & ~0xF) - 8 * len(frame)
        for i, value in enumerate(reversed(frame)):
            if not self._write_u64(top + 8 * i, value):
                raise TripleFault(f"the stack at {top:#x} for vector {vector} is not mapped")
        if new_cpl != cpl:
            self.stats.cpl_changes += 1
            self.patcher.patch(cpl=new_cpl)
            uc.reg_write(x86.UC_X86_REG_SS, new_cpl)  # 64-bit: SS becomes NULL
        uc.reg_write(x86.UC_X86_REG_CS, (selector & ~3) | new_cpl)
        new_flags = rflags & ~(_RF_TF | _RF_NT | _RF_RF | _RF_VM)
        if kind == _GATE_INTERRUPT:
            new_flags &= ~_RF_IF
        uc.reg_write(x86.UC_X86_REG_RFLAGS, new_flags)
        uc.reg_write(x86.UC_X86_REG_RSP, top)
        uc.reg_write(x86.UC_X86_REG_RIP, target)

    def _syscall(self) -> None:
        uc = self.uc
        self.stats.syscalls += 1
        rip = int(uc.reg_read(x86.UC_X86_REG_RIP))  # Unicorn already stepped past it
        rflags = int(uc.reg_read(x86.UC_X86_REG_RFLAGS))
        star = int(uc.msr_read(_MSR_STAR))
        lstar = int(uc.msr_read(_MSR_LSTAR))
        fmask = int(uc.msr_read(_MSR_FMASK))
        if int(uc.reg_read(x86.UC_X86_REG_CS)) & 3:
            self.stats.cpl_changes += 1
            self.patcher.patch(cpl=0)
        kernel_cs = (star >> 32) & 0xFFFC
        uc.reg_write(x86.UC_X86_REG_RCX, rip)
        uc.reg_write(x86.UC_X86_REG_R11, rflags & ~_RF_RF)
        uc.reg_write(x86.UC_X86_REG_CS, kernel_cs)
        uc.reg_write(x86.UC_X86_REG_SS, kernel_cs + 8)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags & ~fmask & ~_RF_RF)
        uc.reg_write(x86.UC_X86_REG_RIP, lstar)

    def _read_u64(self, linear: int) -> int | None:
        phys = self.vcpu._walk(linear & _U64)
        mem = self.vcpu._mem
        if phys is None or phys + 8 > len(mem):
            return None
        return int.from_bytes(mem[phys:phys + 8], "little")

    def _write_u64(self, linear: int, value: int) -> bool:
        phys = self.vcpu._walk(linear & _U64)
        mem = self.vcpu._mem
        if phys is None or phys + 8 > len(mem):
            return False
        mem[phys:phys + 8] = (value & _U64).to_bytes(8, "little")
        return True
