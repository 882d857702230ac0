"""The small protocol every CPU backend (KVM, Unicorn) implements.

A backend executes guest code and reports only what the hypervisor must decide: port I/O,
halts, shutdowns. It holds no protocol logic: the I/O handler it is given (the hypervisor's
emulation glue) decides what every port access means. Guest-visible behaviour must be the
same on every backend; the tests run the same guests on each and compare.

Conventions every backend keeps:

* ``IoHandler.port_io`` is called once per exit. For ``in``/``ins`` it returns exactly
  ``access.count * access.size`` bytes; for ``out``/``outs`` it returns ``None``.
* The handler may read registers (``ctx.get_regs()``) and replace them
  (``ctx.set_regs(regs)``). For an ``in`` the backend applies the returned data *after* any
  registers the handler wrote, the way a CPU completes ``in``: a 4-byte ``in`` zero-extends
  into RAX, a 1- or 2-byte ``in`` replaces only AL or AX. (On this machine's KVM, writing
  registers back at an IN exit makes the guest's EAX the RAX written, so the KVM backend must
  merge the IN result into RAX itself.)
* A handler ends the vCPU by raising ``VcpuStop``; ``Vcpu.run`` returns it as the exit.
* ``Vcpu.run`` never lets a guest's misbehaviour raise into the host: a triple fault, an
  emulation failure or an unhandled exception becomes an ``Exit`` with a reason.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hvmport.hv.memory import GuestMemory


class Mode(enum.IntEnum):
    """The processor mode a vCPU starts in."""

    REAL16 = 16
    PROT32 = 32
    LONG64 = 64


#: Flat GDT that loaders write into guest memory and that backends load into GDTR so a
#: guest can reload segment registers; selectors are fixed here so both agree.
GDT_NULL = 0x00
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_CODE16 = 0x20
SEL_DATA16 = 0x28


@dataclass(slots=True)
class Regs:
    """General-purpose registers, RIP and RFLAGS as 64-bit unsigned integers."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def copy(self) -> Regs:
        return Regs(
            self.rax, self.rbx, self.rcx, self.rdx, self.rsi, self.rdi, self.rsp, self.rbp,
            self.r8, self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
            self.rip, self.rflags,
        )


@dataclass(slots=True)
class StartState:
    """Where and how a vCPU starts; produced by a loader.

    * REAL16: CS = DS = ES = SS = 0 unless ``real_cs`` is given, ``regs.rip`` is the IP.
    * PROT32: flat 4 GiB segments (CS = SEL_CODE32, data = SEL_DATA), paging off.
    * LONG64: long mode with paging on; ``page_table_root`` is the physical address of
      identity-mapping page tables the loader wrote; CS = SEL_CODE64.
    ``gdt_base``/``gdt_limit`` locate the flat GDT the loader wrote (0/0: none).
    """

    mode: Mode
    regs: Regs
    page_table_root: int = 0
    gdt_base: int = 0
    gdt_limit: int = 0
    real_cs: int = 0


@dataclass(slots=True, frozen=True)
class PortAccess:
    """One port-I/O exit.

    ``data`` carries ``count * size`` little-endian bytes for writes and is empty for reads.
    ``string`` is true for INS/OUTS (then ``count`` may exceed 1, and backends may split a
    long REP into several exits).
    """

    port: int
    size: int
    is_write: bool
    count: int = 1
    string: bool = False
    data: bytes = b""


@dataclass(slots=True, frozen=True)
class MmioAccess:
    """One memory access outside guest RAM (an MMIO exit); ``data`` as for PortAccess."""

    addr: int
    size: int
    is_write: bool
    data: bytes = b""


#: Guest-physical addresses from here to 4 GiB are MMIO on every backend (the PC's hole
#: below 4 GiB); RAM ends below it.
MMIO_BASE = 0xC0000000
MMIO_END = 0x100000000


class VcpuContext(Protocol):
    """What the I/O handler may see and change of the vCPU that exited."""

    @property
    def vcpu_id(self) -> int: ...

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None: ...

    def cpl(self) -> int:
        """Current privilege level (SS.DPL), 0..3."""
        ...


class IoHandler(Protocol):
    def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None: ...


class MmioHandler(Protocol):
    """Optional: a handler that also has ``mmio`` gets MMIO exits; one that has not gets
    all ones for reads and its writes are dropped. ``mmio`` returns ``size`` bytes for a
    read and None for a write, and may raise VcpuStop like ``port_io``."""

    def mmio(self, ctx: VcpuContext, access: MmioAccess) -> bytes | None: ...


class ExitKind(enum.Enum):
    STOPPED = "stopped"  # a handler raised VcpuStop (e.g. isa-debug-exit)
    HALTED = "halted"  # HLT with interrupts disabled
    SHUTDOWN = "shutdown"  # triple fault
    ERROR = "error"  # the backend could not continue (internal error, bad instruction)
    KICKED = "kicked"  # Vcpu.kick() from another thread (timeout, another vCPU ended)


@dataclass(slots=True)
class Exit:
    kind: ExitKind
    reason: str = ""
    status: int = 0  # for STOPPED: the status carried by VcpuStop


class VcpuStop(Exception):
    """Raised by an I/O handler to end the vCPU's run with a status."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(reason or f"status {status}")
        self.status = status
        self.reason = reason


#: CPUID leaves a domain overrides: (leaf, subleaf) -> (eax, ebx, ecx, edx). Subleaf is 0 for
#: leaves that have none. Leaves 0x40000000..0x4FFFFFFF come only from this table (a backend
#: must not show its own hypervisor signature there); other leaves come from the backend's
#: base CPU with these entries replacing them.
CpuidTable = Mapping[tuple[int, int], tuple[int, int, int, int]]


@dataclass(slots=True)
class VmConfig:
    memory: GuestMemory
    vcpus: int = 1
    cpuid: CpuidTable = field(default_factory=dict)
    #: CPUID.1:ECX bit 31, telling the guest it runs under a hypervisor.
    hypervisor_bit: bool = True
    #: The platform's interrupt controller, for a backend that delivers interrupts itself
    #: (Unicorn's full-CPU mode, hvmport.cpu.uc_fullcpu); None: the guest gets no
    #: interrupts and every exception ends the run, as for hvmport's test guests.
    interrupts: object | None = None


class Vcpu(Protocol):
    @property
    def vcpu_id(self) -> int: ...

    def run(self, handler: IoHandler) -> Exit:
        """Run until the guest halts, shuts down, a handler stops it, or it is kicked."""
        ...

    def kick(self) -> None:
        """Make ``run`` return ``Exit(KICKED)`` soon; safe to call from any thread."""
        ...

    def close(self) -> None: ...


class Vm(Protocol):
    @property
    def backend_name(self) -> str: ...

    @property
    def tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (what CPUID 0x40000010 and GETHZ report)."""
        ...

    def create_vcpu(self, vcpu_id: int, start: StartState) -> Vcpu: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def create_vm(self, config: VmConfig) -> Vm: ...
