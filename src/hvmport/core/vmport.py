"""The VMware backdoor as the hypervisor sees it (series patches 5/8 and 7/8).

Pure functions over register values: ``Regs -> Regs``. The hypervisor answers a handful of
commands itself; everything else with the right port and magic is forwarded to an ioreq
server as IOREQ_TYPE_VMWARE_PORT.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hvmport.abi import vmware as vm
from hvmport.core.clock import Clock

MASK32 = 0xFFFFFFFF
ALL_ONES = MASK32
#: 1 000 000 000 / APIC_BUS_CYCLE_NS (10 ns): the LAPIC bus clock GETHZ reports, in Hz.
BUS_HZ = 100_000_000
#: GETTIME's "maxTimeLag" constant, in µs.
MAX_TIME_LAG_US = 1_000_000


def check_port(port: int, size: int) -> bool:
    """``vmport_check_port``: the access lies inside 0x5658..0x565B.

    So a 4-byte access is allowed only at 0x5658; 1- and 2-byte accesses anywhere in the
    four ports. The caller also requires the domain to have vmware_port enabled.
    """
    return port >= vm.BDOOR_PORT and port + size <= vm.BDOOR_PORT_END


@dataclass(slots=True)
class BackdoorRegs:
    """The six registers the backdoor uses, as full 64-bit values."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    #: RBP and R8..R15, for the gpr64 transport, which carries every GPR but RSP; empty
    #: where nobody needs them (the other transports and the in-hypervisor commands).
    others: tuple[int, ...] = ()
    #: EBP for the high-bandwidth port (string I/O on 0x5659), where it is an argument.
    rbp: int = 0


class Outcome(enum.Enum):
    HANDLED = "handled"  # answered in the hypervisor
    IGNORED = "ignored"  # wrong port or magic: reads all ones, never forwarded
    FORWARD = "forward"  # not a command the hypervisor knows: send to an ioreq server


@dataclass(slots=True)
class BackdoorResult:
    outcome: Outcome
    #: Registers after the call (only the 32-bit halves changed); None unless HANDLED.
    regs: BackdoorRegs | None = None
    #: The value an IN reads (new EAX, 32 bits); all ones unless set by the command.
    in_value: int = ALL_ONES
    command: int = 0


@dataclass(slots=True, frozen=True)
class BackdoorPlatform:
    """What the in-hypervisor commands report about this domain."""

    tsc_khz: int
    vmware_hwver: int
    #: The domain's RTC offset from UTC in seconds (``time_offset.seconds``).
    time_offset_s: int = 0
    #: What GETVERSION answers in EAX and ECX (hvmport knobs; v14 fixes them at 6 and
    #: 2): clients refuse other versions, and print the product type.
    version: int = vm.VERSION_MAGIC
    vmx_type: int = vm.VMX_TYPE_SCALABLE_SERVER


def _set32(old: int, value: int) -> int:
    """Replace the low 32 bits, keeping the upper half (VMware's register convention)."""
    return (old & ~MASK32 & 0xFFFFFFFFFFFFFFFF) | (value & MASK32)


def backdoor(
    port: int, regs: BackdoorRegs, cpl: int, platform: BackdoorPlatform, clock: Clock
) -> BackdoorResult:
    """The in-hypervisor port handler for an access lying inside 0x5658..0x565B.

    Direction matters only to the caller (only IN loads ``in_value`` into EAX); the
    handler itself runs the command for IN and OUT alike, as the series does.
    """
    if port != vm.BDOOR_PORT or (regs.rax & MASK32) != vm.BDOOR_MAGIC:
        return BackdoorResult(Outcome.IGNORED)
    cmd = regs.rcx & 0xFFFF
    if cmd not in _OURS:
        # Decided before copying registers: forwarding is the device-model hot path.
        return BackdoorResult(Outcome.FORWARD, command=cmd)
    new_eax = ALL_ONES
    out = BackdoorRegs(regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.others)
    if cmd == vm.BDOOR_CMD_GETMHZ:
        new_eax = platform.tsc_khz // 1000
    elif cmd == vm.BDOOR_CMD_GETVERSION:
        new_eax = platform.version
        out.rbx = _set32(out.rbx, vm.BDOOR_MAGIC)
        out.rcx = _set32(out.rcx, platform.vmx_type)
    elif cmd == vm.BDOOR_CMD_GETHWVERSION:
        new_eax = platform.vmware_hwver or vm.VMWARE_HWVER_DEFAULT_ANSWER
    elif cmd == vm.BDOOR_CMD_GETHZ:
        # CPL 0 only. v14 computed tsc_khz * 1000 in 32 bits, so EBX was always 0 and EAX
        # wrapped for TSCs of 4.3 GHz and up; the full 64-bit product is what VMware means.
        if cpl == 0:
            hz = platform.tsc_khz * 1000
            new_eax = hz & MASK32
            out.rbx = _set32(out.rbx, hz >> 32)
            out.rcx = _set32(out.rcx, BUS_HZ)
    elif cmd == vm.BDOOR_CMD_GETTIME:
        t_us = clock.wallclock_us()
        new_eax = (t_us // 1_000_000) & MASK32
        out.rbx = _set32(out.rbx, t_us % 1_000_000)
        out.rcx = _set32(out.rcx, MAX_TIME_LAG_US)
        # C's division truncates toward zero, also for a negative offset.
        out.rdx = _set32(out.rdx, int(platform.time_offset_s / 60) & MASK32)
    elif cmd == vm.BDOOR_CMD_GETTIMEFULL:
        t_us = clock.wallclock_us()
        seconds = t_us // 1_000_000
        new_eax = vm.BDOOR_MAGIC
        out.rbx = _set32(out.rbx, t_us % 1_000_000)
        out.rdx = _set32(out.rdx, seconds & MASK32)
        out.rsi = _set32(out.rsi, (seconds >> 32) & MASK32)
        out.rcx = _set32(out.rcx, MAX_TIME_LAG_US)
    else:
        return BackdoorResult(Outcome.FORWARD, command=cmd)
    return BackdoorResult(Outcome.HANDLED, out, new_eax, cmd)


#: The commands the hypervisor answers itself (the v14 series); everything else forwards.
_OURS = frozenset({vm.BDOOR_CMD_GETMHZ, vm.BDOOR_CMD_GETVERSION, vm.BDOOR_CMD_GETHWVERSION,
                   vm.BDOOR_CMD_GETHZ, vm.BDOOR_CMD_GETTIME, vm.BDOOR_CMD_GETTIMEFULL})


def apply_in(rax: int, value: int, size: int) -> int:
    """How an IN of ``size`` bytes lands in RAX: 4 bytes zero-extend, 1/2 replace AL/AX."""
    if size == 4:
        return value & MASK32
    mask = (1 << (8 * size)) - 1
    return (rax & ~mask & 0xFFFFFFFFFFFFFFFF) | (value & mask)
