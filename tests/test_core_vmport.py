"""The in-hypervisor backdoor and vmport_check_port (vmware-port.md §2.2, §4.4)."""

from __future__ import annotations

import pytest

from hvmport.abi import vmware as vm
from hvmport.core.clock import FixedClock
from hvmport.core.cpuid import hypervisor_leaves
from hvmport.core.vmport import (
    BackdoorPlatform,
    BackdoorRegs,
    Outcome,
    apply_in,
    backdoor,
    check_port,
)

MAGIC = vm.BDOOR_MAGIC
HI = 0xDEADBEEF_00000000
PLATFORM = BackdoorPlatform(tsc_khz=2_500_000, vmware_hwver=7)


def call(cmd: int, *, port: int = 0x5658, rax: int = MAGIC, cpl: int = 0,
         platform: BackdoorPlatform = PLATFORM, clock: FixedClock | None = None,
         upper: int = 0) -> tuple[Outcome, BackdoorRegs | None, int]:
    r = BackdoorRegs(rax | upper, 0x11 | upper, cmd | upper, 0x5658 | upper, 0x22 | upper,
                     0x33 | upper)
    res = backdoor(port, r, cpl, platform, clock or FixedClock())
    return res.outcome, res.regs, res.in_value


@pytest.mark.parametrize(("port", "size", "ok"), [
    (0x5658, 4, True), (0x5658, 2, True), (0x5658, 1, True),
    (0x5659, 4, False),  # sticks out: Jan's "4-byte access only at 0x5658"
    (0x5659, 2, True), (0x5659, 1, True), (0x565A, 2, True), (0x565B, 1, True),
    (0x565B, 2, False), (0x5657, 1, False), (0x5657, 4, False),
])
def test_check_port(port: int, size: int, ok: bool) -> None:
    assert check_port(port, size) is ok


def test_getversion() -> None:
    outcome, r, eax = call(vm.BDOOR_CMD_GETVERSION)
    assert outcome is Outcome.HANDLED and r is not None
    assert (eax, r.rbx, r.rcx) == (6, MAGIC, 2)
    assert (r.rdx, r.rsi, r.rdi) == (0x5658, 0x22, 0x33)


def test_only_32_bit_halves_change() -> None:
    _, r, _ = call(vm.BDOOR_CMD_GETVERSION, upper=HI)
    assert r is not None
    assert r.rbx == HI | MAGIC
    assert r.rcx == HI | 2
    assert r.rsi == HI | 0x22


def test_command_is_low_16_bits_of_ecx() -> None:
    # vmware-checkvm passes ECX = 0xFFFF000A.
    outcome, _r, eax = call(0xFFFF0000 | vm.BDOOR_CMD_GETVERSION)
    assert outcome is Outcome.HANDLED and eax == 6


@pytest.mark.parametrize("port", [0x5659, 0x565A, 0x565B])
def test_wrong_port_is_ignored(port: int) -> None:
    assert call(vm.BDOOR_CMD_GETVERSION, port=port)[0] is Outcome.IGNORED


def test_wrong_magic_is_ignored_even_with_magic_in_upper_half() -> None:
    assert call(vm.BDOOR_CMD_GETVERSION, rax=0x12345678)[0] is Outcome.IGNORED
    # Only EAX counts: magic in the upper half of RAX with the right low half passes.
    assert call(vm.BDOOR_CMD_GETVERSION, upper=HI)[0] is Outcome.HANDLED


def test_gethz_64_bit_product() -> None:
    # v14 computed tsc_khz * 1000 in 32 bits: EBX was always 0 and EAX wrapped at 4.3 GHz.
    fast = BackdoorPlatform(tsc_khz=5_000_000, vmware_hwver=7)
    _, r, eax = call(vm.BDOOR_CMD_GETHZ, platform=fast)
    assert r is not None
    assert (r.rbx << 32) | eax == 5_000_000_000
    assert r.rbx == 1
    assert r.rcx == 100_000_000


def test_gethz_only_at_cpl0() -> None:
    outcome, r, eax = call(vm.BDOOR_CMD_GETHZ, cpl=3)
    assert outcome is Outcome.HANDLED and r is not None
    assert eax == 0xFFFFFFFF
    assert (r.rbx, r.rcx) == (0x11, vm.BDOOR_CMD_GETHZ)


def test_getmhz_and_gethwversion() -> None:
    assert call(vm.BDOOR_CMD_GETMHZ)[2] == 2500
    assert call(vm.BDOOR_CMD_GETHWVERSION)[2] == 7
    assert call(vm.BDOOR_CMD_GETHWVERSION,
                platform=BackdoorPlatform(2_500_000, 0))[2] == 4


def test_gettime_and_gettimefull() -> None:
    clock = FixedClock(wallclock_us=0x1_2345_6789 * 1_000_000 + 123_456)
    plat = BackdoorPlatform(2_500_000, 7, time_offset_s=-3600 - 59)
    _, r, eax = call(vm.BDOOR_CMD_GETTIME, clock=clock, platform=plat)
    assert r is not None
    assert eax == 0x2345_6789  # seconds, low 32 bits
    assert r.rbx == 123_456
    assert r.rcx == 1_000_000
    assert r.rdx == (-60) & 0xFFFFFFFF  # minutes, truncated toward zero as C does
    _, r, eax = call(vm.BDOOR_CMD_GETTIMEFULL, clock=clock)
    assert r is not None
    assert eax == MAGIC
    assert (r.rsi, r.rdx, r.rbx, r.rcx) == (1, 0x2345_6789, 123_456, 1_000_000)


@pytest.mark.parametrize("cmd", [vm.BDOOR_CMD_ABSPOINTER_STATUS, vm.BDOOR_CMD_MESSAGE,
                                 vm.BDOOR_CMD_GETMEMSIZE, vm.BDOOR_CMD_GETTIMEFULL_WITH_LAG,
                                 vm.BDOOR_CMD_GET_VCPU_INFO, 0xFFFF])
def test_other_commands_are_forwarded(cmd: int) -> None:
    outcome, r, _ = call(cmd)
    assert outcome is Outcome.FORWARD and r is None


def test_apply_in_sizes() -> None:
    rax = 0x1122334455667788
    assert apply_in(rax, 0xAABBCCDD, 4) == 0xAABBCCDD  # zero-extends
    assert apply_in(rax, 0xAABBCCDD, 2) == 0x112233445566CCDD
    assert apply_in(rax, 0xAABBCCDD, 1) == 0x11223344556677DD


def test_cpuid_leaves() -> None:
    leaves = hypervisor_leaves(7, 2_500_000)
    eax, ebx, ecx, edx = leaves[(0x40000000, 0)]
    assert eax == 0x40000010
    assert (ebx.to_bytes(4, "little") + ecx.to_bytes(4, "little")
            + edx.to_bytes(4, "little")) == b"VMwareVMware"
    assert leaves[(0x40000010, 0)] == (2_500_000, 100_000, 0, 0)
    assert leaves[(0x40000005, 0)] == (0, 0, 0, 0)
    # Below hardware version 7 there is no signature at all.
    assert all(v == (0, 0, 0, 0) for v in hypervisor_leaves(6, 2_500_000).values())
