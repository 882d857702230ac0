"""QEMU's vmmouse behind vmport (qemu-vmport-vmmouse.md §3, §4; guest-clients.md §2, §3)."""

from __future__ import annotations

import pytest

from hvmport.abi import vmware as vm
from hvmport.dm.devices.pointer import BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.devices.vmport import Vmport, VmportProperties, VmportRegs
from hvmport.errors import ConfigError

MAGIC = vm.BDOOR_MAGIC
ONES = 0xFFFFFFFF
DATA = vm.BDOOR_CMD_ABSPOINTER_DATA
STATUS = vm.BDOOR_CMD_ABSPOINTER_STATUS
COMMAND = vm.BDOOR_CMD_ABSPOINTER_COMMAND


class Rig:
    def __init__(self, props: VmportProperties | None = None) -> None:
        self.port = Vmport(props)
        self.nudges = 0
        self.mouse = Vmmouse(self.port, self._nudge)

    def _nudge(self) -> None:
        self.nudges += 1

    def call(self, ecx: int, ebx: int = 0) -> tuple[int, VmportRegs]:
        # The X.org driver leaves ECX's high half as garbage; put some there.
        r = VmportRegs(MAGIC, ebx, ecx, 0x5658, 0xAAAA_AAAA, 0xBBBB_BBBB)
        return self.port.handle(r, False, 4), r

    def status(self) -> int:
        return self.call(STATUS)[0]

    def command(self, sub: int) -> int:
        return self.call(COMMAND, sub)[0]

    def data(self, n: int) -> VmportRegs:
        return self.call(DATA, n)[1]

    def enable(self) -> None:
        self.command(vm.VMMOUSE_READ_ID)
        assert self.status() == 1
        assert self.data(1).eax == vm.VMMOUSE_VERSION


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_disabled_after_construction_and_reset(rig: Rig) -> None:
    assert rig.status() == 0xFFFF_0000
    assert not rig.mouse.enabled
    rig.enable()
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    rig.mouse.queue_event(1, 2, 0, 0)
    rig.mouse.reset()
    assert rig.status() == 0xFFFF_0000
    assert rig.mouse.queued == 0
    assert rig.mouse.absolute  # QEMU's reset keeps the mode
    assert not rig.mouse.queue_event(1, 2, 0, 0)


def test_typical_guest_sequence(rig: Rig) -> None:
    """§4 step by step, with QEMU's default (current) vmport flags."""
    value, r = rig.call(vm.BDOOR_CMD_GETVERSION)
    assert (value, r.ebx) == (6, MAGIC)

    value, r = rig.call(COMMAND, vm.VMMOUSE_READ_ID)
    assert value == MAGIC  # EAX is returned unchanged
    assert rig.mouse.enabled

    assert rig.status() == 0x0000_0001
    value, r = rig.call(DATA, 1)
    assert value == r.eax == 0x3442554A

    value, _ = rig.call(vm.BDOOR_CMD_ABSPOINTER_RESTRICT, 1)
    assert value == ONES  # QEMU does not know 86

    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    assert rig.mouse.absolute
    assert rig.nudges == 0

    assert rig.mouse.queue_event(0x4000, 0x7FFF, 0, BUTTON_LEFT)
    assert rig.nudges == 1
    assert rig.status() == 4
    value, r = rig.call(DATA, 4)
    assert (value, r.eax, r.ebx, r.ecx, r.edx) == (0x20, 0x20, 0x8000, 0xFFFE, 0)
    assert (r.esi, r.edi) == (0xAAAA_AAAA, 0xBBBB_BBBB)
    assert rig.status() == 0


def test_linux_driver_checks_pass(rig: Rig) -> None:
    """vmmouse_init: STATUS low half non-zero, DATA(1) = version; disable shows error."""
    rig.command(vm.VMMOUSE_READ_ID)
    assert rig.status() & 0xFFFF != 0
    assert rig.data(1).eax == 0x3442554A
    rig.command(vm.VMMOUSE_DISABLE)
    assert rig.status() & 0xFFFF_0000 == 0xFFFF_0000


def test_events_ignored_until_read_id(rig: Rig) -> None:
    assert not rig.mouse.queue_event(5, 5, 0, 0)
    assert rig.mouse.queued == 0
    assert rig.nudges == 0
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)  # ignored while disabled
    assert not rig.mouse.absolute


def test_relative_packets(rig: Rig) -> None:
    rig.enable()
    assert not rig.mouse.absolute
    rig.mouse.queue_event(-3, 7, -1, BUTTON_RIGHT | BUTTON_MIDDLE)
    r = rig.data(4)
    assert r.eax == vm.VMMOUSE_RELATIVE_PACKET | 0x10 | 0x08
    assert (r.ebx, r.ecx, r.edx) == (0xFFFF_FFFD, 7, 0xFFFF_FFFF)


def test_mode_switches(rig: Rig) -> None:
    rig.enable()
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    rig.mouse.queue_event(10, 20, 0, 0)
    rig.command(vm.VMMOUSE_REQUEST_RELATIVE)
    assert not rig.mouse.absolute
    rig.mouse.queue_event(10, 20, 0, 0)
    a, b = rig.data(4), rig.data(4)
    assert (a.eax, a.ebx, a.ecx) == (0, 20, 40)
    assert (b.eax, b.ebx, b.ecx) == (vm.VMMOUSE_RELATIVE_PACKET, 10, 20)


@pytest.mark.parametrize(("x", "y", "gx", "gy"), [
    (0, 0, 0, 0), (0x7FFF, 1, 0xFFFE, 2), (-5, 0x9000, 0, 0xFFFE),
])
def test_absolute_scaling_and_clamping(rig: Rig, x: int, y: int, gx: int, gy: int) -> None:
    rig.enable()
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    rig.mouse.queue_event(x, y, 0, 0)
    r = rig.data(4)
    assert (r.ebx, r.ecx) == (gx, gy)


@pytest.mark.parametrize("n", [0, 7, 5, 0xFFFF_FFFF])
def test_bad_data_request_disables_until_read_id(rig: Rig, n: int) -> None:
    rig.enable()
    rig.mouse.queue_event(1, 1, 0, BUTTON_LEFT)  # 4 dwords queued
    before = rig.call(DATA, n)[1]
    assert before.ebx == n  # registers untouched
    assert rig.status() == 0xFFFF_0004  # disabled, queue not flushed
    assert not rig.mouse.enabled
    assert not rig.mouse.queue_event(2, 2, 0, 0)
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    assert not rig.mouse.absolute
    rig.command(vm.VMMOUSE_READ_ID)
    assert rig.status() == 5  # the old packet plus a new version word
    assert rig.data(4).eax == vm.VMMOUSE_RELATIVE_PACKET | 0x20
    assert rig.data(1).eax == vm.VMMOUSE_VERSION


def test_data_spreads_over_six_registers(rig: Rig) -> None:
    rig.enable()
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    rig.mouse.queue_event(1, 2, 3, 0)
    rig.mouse.queue_event(4, 5, 6, BUTTON_LEFT)
    r = rig.data(6)
    assert r.as_tuple() == (0, 2, 4, 3, 0x20, 8)
    assert rig.status() == 2
    r = rig.data(2)
    assert (r.eax, r.ebx, r.ecx) == (10, 6, DATA)  # ECX keeps the command


def test_disable_keeps_queue(rig: Rig) -> None:
    rig.enable()
    rig.mouse.queue_event(1, 1, 0, 0)
    rig.command(vm.VMMOUSE_DISABLE)
    assert rig.status() == 0xFFFF_0004
    assert not rig.mouse.queue_event(1, 1, 0, 0)
    # Reading what is there is still allowed while disabled (QEMU checks counts only).
    assert rig.data(4).ebx == 1


def test_unknown_subcommand_is_harmless(rig: Rig) -> None:
    rig.enable()
    value, r = rig.call(COMMAND, 0x1234_5678)
    assert value == MAGIC
    assert r.ebx == 0x1234_5678
    assert rig.mouse.enabled
    assert rig.status() == 0


def test_vmmouse_uses_sixteen_bits_of_ecx(rig: Rig) -> None:
    rig.enable()
    rig.mouse.queue_event(1, 1, 0, 0)
    assert rig.call(0xDEAD_0000 | STATUS)[0] == 4  # high half ignored: STATUS
    value, r = rig.call(0x0100 | STATUS)  # vmport sees 0x28, vmmouse 0x128: unknown
    assert value == MAGIC
    assert (r.ebx, r.ecx, r.edx) == (0, 0x0128, 0x5658)
    assert rig.mouse.queued == 4


def test_queue_bounded_under_a_flood(rig: Rig) -> None:
    rig.enable()
    queued = sum(rig.mouse.queue_event(i & 0x7FFF, 0, 0, 0) for i in range(100_000))
    assert rig.mouse.queued == vm.VMMOUSE_QUEUE_SIZE
    assert queued == rig.nudges == 256
    assert rig.mouse.dropped == 100_000 - 256
    assert rig.status() == 1024


def test_drop_rule_is_more_than_1020(rig: Rig) -> None:
    rig.command(vm.VMMOUSE_READ_ID)  # version word stays: 1 + 4k never hits 1024
    while rig.mouse.queue_event(0, 0, 0, 0):
        pass
    assert rig.mouse.queued == 1021


def test_read_id_needs_room(rig: Rig) -> None:
    rig.enable()
    for _ in range(256):
        assert rig.mouse.queue_event(0, 0, 0, 0)
    rig.command(vm.VMMOUSE_DISABLE)
    rig.command(vm.VMMOUSE_READ_ID)  # full: does nothing, stays disabled
    assert rig.status() == 0xFFFF_0400


def test_drain_loop_like_the_linux_driver(rig: Rig) -> None:
    rig.enable()
    rig.command(vm.VMMOUSE_REQUEST_ABSOLUTE)
    for i in range(10):
        rig.mouse.queue_event(i * 100, i * 200, 0, BUTTON_LEFT if i % 2 else 0)
    seen = []
    for _ in range(255):
        st = rig.status()
        assert st & 0xFFFF_0000 != 0xFFFF_0000
        if st & 0xFFFF == 0:
            break
        assert st % 4 == 0
        r = rig.data(4)
        seen.append((r.eax, r.ebx, r.ecx))
    assert seen == [(0x20 if i % 2 else 0, i * 200, i * 400) for i in range(10)]


def test_commands_registered_whatever_the_compat_level() -> None:
    rig = Rig(VmportProperties.compat_5_0())
    value, _ = rig.call(COMMAND, vm.VMMOUSE_READ_ID)
    assert value == MAGIC
    assert rig.status() == 1


def test_one_vmmouse_per_vmport(rig: Rig) -> None:
    with pytest.raises(ConfigError):
        Vmmouse(rig.port, lambda: None)
