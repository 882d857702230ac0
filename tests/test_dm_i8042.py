"""The i8042 with its PS/2 keyboard and mouse, probed the way Linux's i8042, atkbd and
psmouse drivers do, plus the fake aux packet vmmouse relies on."""

from __future__ import annotations

import random

import pytest

from hvmport.abi import vmware as vm
from hvmport.dm.devices.i8042 import (
    CTR_AUXDIS,
    CTR_AUXINT,
    CTR_KBDDIS,
    CTR_KBDINT,
    CTR_POWER_ON,
    CTR_XLATE,
    I8042,
    STR_AUXDATA,
    STR_CMD,
    STR_IBF,
    STR_OBF,
)
from hvmport.dm.devices.pointer import BUTTON_LEFT
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.devices.vmport import Vmport, VmportRegs

ACK = 0xFA


class Guest:
    """Drives the controller like Linux's i8042.c: poll status, write, read."""

    def __init__(self) -> None:
        self.irqs: list[tuple[int, int]] = []
        self.resets = 0
        self.kbc = I8042(lambda line, level: self.irqs.append((line, level)), self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.kbc.port_read(0x64, 1)

    def cmd(self, c: int, *params: int) -> None:
        assert not self.status() & STR_IBF
        self.kbc.port_write(0x64, 1, c)
        for p in params:
            assert not self.status() & STR_IBF
            self.kbc.port_write(0x60, 1, p)

    def read(self) -> int:
        assert self.status() & STR_OBF, "no data"
        return self.kbc.port_read(0x60, 1)

    def read_tagged(self) -> tuple[int, bool]:
        st = self.status()
        assert st & STR_OBF, "no data"
        return self.kbc.port_read(0x60, 1), bool(st & STR_AUXDATA)

    def drain(self) -> list[tuple[int, bool]]:
        out = []
        while self.status() & STR_OBF:
            out.append(self.read_tagged())
        return out

    def flush(self) -> None:
        for _ in range(16):  # I8042_BUFFER_SIZE
            if not self.status() & STR_OBF:
                return
            self.kbc.port_read(0x60, 1)
        raise AssertionError("controller does not flush")

    def ctr(self) -> int:
        self.cmd(0x20)
        return self.read()

    def write_ctr(self, value: int) -> None:
        self.cmd(0x60, value)

    def kbd(self, byte: int) -> list[int]:
        self.kbc.port_write(0x60, 1, byte)
        return [b for b, aux in self.drain() if not aux]

    def aux(self, *data: int) -> list[int]:
        """psmouse's ps2_command through I8042_CMD_AUX_SEND: one 0xD4 per byte."""
        answer: list[int] = []
        for b in data:
            self.cmd(0xD4, b)
            got = self.drain()
            assert all(aux for _, aux in got), got
            answer += [x for x, _ in got]
        return answer


@pytest.fixture
def g() -> Guest:
    return Guest()


# -- controller -----------------------------------------------------------------------------

def test_power_on_state(g: Guest) -> None:
    assert g.status() == 0x14  # keylock off, SYS (POST passed), empty
    assert g.ctr() == CTR_POWER_ON
    assert g.status() & STR_CMD  # the last write went to 0x64
    g.kbc.port_write(0x60, 1, 0xF4)
    assert not g.status() & STR_CMD
    assert g.kbc.translate
    assert g.kbc.a20


def test_linux_i8042_probe(g: Guest) -> None:
    """i8042_controller_check/selftest/init and i8042_check_aux, in order."""
    g.flush()
    g.cmd(0xAA)
    assert g.read() == 0x55
    ctr = g.ctr()
    # i8042_controller_init: both ports disabled, interrupts off, while probing.
    ctr = (ctr | CTR_KBDDIS | CTR_AUXDIS) & ~(CTR_KBDINT | CTR_AUXINT)
    g.write_ctr(ctr)
    assert g.ctr() == ctr
    # i8042_check_aux: loopback through the aux port must come back tagged as aux.
    g.flush()
    g.cmd(0xD3, 0x5A)
    assert g.read_tagged() == (0x5A, True)
    g.cmd(0xA7)
    assert g.ctr() & CTR_AUXDIS
    g.cmd(0xA8)
    assert not g.ctr() & CTR_AUXDIS
    # AUX IRQ delivery test: enable the aux port with its interrupt, loop 0xA5, expect IRQ 12.
    g.write_ctr((g.ctr() | CTR_AUXINT) & ~CTR_AUXDIS)
    g.irqs.clear()
    g.cmd(0xD3, 0xA5)
    assert g.irqs == [(12, 1)]
    assert g.status() & STR_AUXDATA
    assert g.kbc.port_read(0x60, 1) == 0xA5
    assert g.irqs == [(12, 1), (12, 0)]
    g.cmd(0xA9)
    assert g.read() == 0x00
    g.cmd(0xAB)
    assert g.read() == 0x00
    # Keyboard port up with its interrupt.
    g.write_ctr((g.ctr() | CTR_KBDINT) & ~CTR_KBDDIS)
    assert g.ctr() & (CTR_KBDINT | CTR_AUXINT) == CTR_KBDINT | CTR_AUXINT
    assert g.irqs[-1] == (1, 0)  # the CTR read raised and dropped IRQ 1


def test_no_mux(g: Guest) -> None:
    """i8042_set_mux_mode: a plain loopback echoes 0xA4, so Linux sees no MUX."""
    for b in (0xF0, 0x56, 0xA4):
        g.cmd(0xD3, b)
        assert g.read() == b


def test_kbd_loopback_and_ram(g: Guest) -> None:
    g.cmd(0xD2, 0x77)
    assert g.read_tagged() == (0x77, False)
    g.cmd(0x61, 0x5C)
    g.cmd(0x21)
    assert g.read() == 0x5C
    assert g.ctr() == CTR_POWER_ON  # RAM byte 1 is not the CTR


def test_new_command_abandons_pending_parameter(g: Guest) -> None:
    g.cmd(0x60)  # waits for a CTR byte...
    g.cmd(0x20)  # ...but a new command arrives
    assert g.read() == CTR_POWER_ON
    assert g.kbd(0xF2)[0] == ACK  # the next data byte goes to the keyboard again


def test_reset_line(g: Guest) -> None:
    g.cmd(0xFE)
    assert g.resets == 1
    g.cmd(0xFF)  # pulses nothing
    g.cmd(0xD1, 0x00)  # bit 0 low: reset; bit 1 low: A20 off
    assert g.resets == 2
    assert not g.kbc.a20
    g.cmd(0xD0)
    assert g.read() & 0x03 == 0x01


def test_reset_restores_power_on(g: Guest) -> None:
    g.write_ctr(0)
    g.kbc.queue_key(b"\x1e")
    g.kbc.reset()
    assert g.ctr() == CTR_POWER_ON
    assert not g.drain()


# -- keyboard -------------------------------------------------------------------------------

def test_atkbd_probe(g: Guest) -> None:
    assert g.kbd(0xF2) == [ACK, 0xAB, 0x41]  # translated, as atkbd expects with XLATE
    g.write_ctr(CTR_KBDINT | CTR_AUXINT)
    assert g.kbd(0xF2) == [ACK, 0xAB, 0x83]
    assert g.kbd(0xFF) == [ACK, 0xAA]
    assert g.kbd(0xED) == [ACK]
    assert g.kbd(0x07) == [ACK]
    assert g.kbc.kbd.leds == 7
    assert g.kbd(0xF0) == [ACK]
    assert g.kbd(0x00) == [ACK, 2]
    assert g.kbd(0xF3) == [ACK]
    assert g.kbd(0x20) == [ACK]
    assert g.kbd(0xEE) == [0xEE]
    assert g.kbd(0x01) == [0xFE]  # unknown: resend


def test_keyboard_scanning_gate(g: Guest) -> None:
    assert g.kbd(0xF5) == [ACK]
    assert not g.kbc.queue_key(b"\x1e")
    assert g.kbd(0xF4) == [ACK]
    assert g.kbc.queue_key(b"\xe0\x48")
    assert g.drain() == [(0xE0, False), (0x48, False)]


def test_keyboard_queue_bounded(g: Guest) -> None:
    accepted = sum(g.kbc.queue_key(b"\xe0\x4b") for _ in range(1000))
    # The first key's 0xE0 moves to the output buffer; 63 bytes fill the queue after it
    # and no key is ever cut in half.
    assert accepted == 32
    got = g.drain()
    assert [b for b, _ in got] == [0xE0, 0x4B] * 32


def test_kbd_disable_holds_data(g: Guest) -> None:
    g.cmd(0xAD)
    g.kbc.queue_key(b"\x1e")
    assert not g.status() & STR_OBF
    g.cmd(0x20)  # controller answers still come through
    assert g.read() & CTR_KBDDIS
    g.cmd(0xAE)
    assert g.read() == 0x1E


# -- interrupt lines ------------------------------------------------------------------------

def test_irq1_pulses_per_byte(g: Guest) -> None:
    g.kbc.queue_key(b"\xe0\x48")
    assert g.irqs == [(1, 1)]
    assert g.kbc.port_read(0x60, 1) == 0xE0
    assert g.irqs == [(1, 1), (1, 0), (1, 1)]
    assert g.kbc.port_read(0x60, 1) == 0x48
    assert g.irqs == [(1, 1), (1, 0), (1, 1), (1, 0)]
    assert g.kbc.irq_level(1) == 0
    assert g.kbc.port_read(0x60, 1) == 0x48  # stale re-read, no new edges
    assert len(g.irqs) == 4


def test_irq_follows_ctr_enable(g: Guest) -> None:
    g.write_ctr(CTR_XLATE)
    g.kbc.queue_key(b"\x1e")
    assert g.status() & STR_OBF
    assert g.irqs == []  # polled mode
    g.write_ctr(CTR_XLATE | CTR_KBDINT)
    assert g.irqs == [(1, 1)]
    g.write_ctr(CTR_XLATE)
    assert g.irqs == [(1, 1), (1, 0)]
    assert g.read() == 0x1E


def test_kbd_and_aux_lines_are_separate_and_fair(g: Guest) -> None:
    assert g.aux(0xF4) == [ACK]
    g.irqs.clear()
    g.kbc.queue_key(b"\x1e\x9e")
    g.kbc.fake_aux_movement()
    got = g.drain()
    assert got == [(0x1E, False), (0x08, True), (0x9E, False), (0x01, True), (0x00, True)]
    assert g.irqs == [(1, 1), (1, 0), (12, 1), (12, 0), (1, 1), (1, 0), (12, 1), (12, 0),
                      (12, 1), (12, 0)]


def test_controller_answer_wins_over_waiting_device_data(g: Guest) -> None:
    g.kbc.queue_key(b"\x1e\x1f")  # 0x1E latched, 0x1F waits
    g.cmd(0xAA)
    assert [b for b, _ in g.drain()] == [0x1E, 0x55, 0x1F]


def test_controller_queue_bounded(g: Guest) -> None:
    for _ in range(1000):
        g.kbc.port_write(0x64, 1, 0x20)
    assert len(g.drain()) == 1 + 16


# -- mouse and psmouse ----------------------------------------------------------------------

def test_psmouse_probe(g: Guest) -> None:
    assert g.aux(0xF2) == [ACK, 0x00]  # psmouse_probe: a mouse answers 0x00
    assert g.aux(0xF6) == [ACK]
    assert g.aux(0xFF) == [ACK, 0xAA, 0x00]  # psmouse_reset
    # Genius / Logitech style probes look at the status bytes; ours are plain.
    assert g.aux(0xE8, 0x03, 0xE6, 0xE6, 0xE6) == [ACK] * 5
    assert g.aux(0xE9) == [ACK, 0x00, 0x03, 100]
    # IntelliMouse knock, then the Explorer knock.
    assert g.aux(0xF3, 200, 0xF3, 100, 0xF3, 80) == [ACK] * 6
    assert g.aux(0xF2) == [ACK, 0x03]
    assert g.aux(0xF3, 200, 0xF3, 200, 0xF3, 80) == [ACK] * 6
    assert g.aux(0xF2) == [ACK, 0x04]
    # psmouse_initialize + activate.
    assert g.aux(0xF3, 100, 0xE8, 0x03, 0xE6, 0xF4) == [ACK] * 6
    assert g.aux(0xE9) == [ACK, 0x20, 0x03, 100]
    assert g.aux(0xF5) == [ACK]
    assert g.aux(0xE7, 0xE9) == [ACK, ACK, 0x10, 0x03, 100]
    assert g.aux(0xFF) == [ACK, 0xAA, 0x00]
    assert g.aux(0xF2) == [ACK, 0x00]  # the reset dropped the wheel modes


def test_knock_out_of_order_does_nothing(g: Guest) -> None:
    g.aux(0xF3, 100, 0xF3, 200, 0xF3, 80)
    assert g.aux(0xF2) == [ACK, 0x00]
    g.aux(0xF3, 200, 0xF3, 200, 0xF3, 80)  # Explorer knock needs IntelliMouse first
    assert g.aux(0xF2) == [ACK, 0x00]


def test_mouse_unknown_command_and_wrap_mode(g: Guest) -> None:
    assert g.aux(0xE1) == [0xFE]
    assert g.aux(0xEE) == [ACK]
    assert g.aux(0x12, 0xF4) == [0x12, 0xF4]  # echoed, not executed
    assert not g.kbc.mouse.enabled
    assert g.aux(0xEC) == [ACK]
    assert g.aux(0xF4) == [ACK]
    assert g.kbc.mouse.enabled


def test_fake_movement_needs_streaming(g: Guest) -> None:
    g.kbc.fake_aux_movement()
    assert g.drain() == []
    assert g.irqs == []
    assert g.aux(0xF4) == [ACK]
    g.irqs.clear()
    g.kbc.fake_aux_movement()
    assert g.irqs == [(12, 1)]
    assert g.drain() == [(0x08, True), (0x01, True), (0x00, True)]
    assert g.aux(0xF0) == [ACK]  # remote mode: no unprompted packets
    g.kbc.fake_aux_movement()
    assert g.drain() == []
    assert g.aux(0xEB) == [ACK, 0x08, 0x01, 0x00]  # the count waited for a read
    assert g.aux(0xEB) == [ACK, 0x08, 0x00, 0x00]


def test_fake_movement_packet_shape(g: Guest) -> None:
    g.aux(0xF3, 200, 0xF3, 100, 0xF3, 80, 0xF4)
    g.kbc.mouse_event(0, 0, 0, BUTTON_LEFT)
    assert [b for b, _ in g.drain()] == [0x09, 0, 0, 0]
    g.kbc.fake_aux_movement()
    assert [b for b, _ in g.drain()] == [0x09, 1, 0, 0]  # bit 3, button kept, dx = 1


def test_aux_disabled_holds_mouse_data(g: Guest) -> None:
    g.aux(0xF4)
    g.cmd(0xA7)
    g.irqs.clear()
    g.kbc.fake_aux_movement()
    assert not g.status() & STR_OBF
    g.cmd(0xA8)
    assert g.irqs == [(12, 1)]
    assert len(g.drain()) == 3


def test_mouse_motion_encoding(g: Guest) -> None:
    g.aux(0xF4)
    g.kbc.mouse_event(-3, 5, 0, 0)  # 5 down on screen = -5 in PS/2
    assert [b for b, _ in g.drain()] == [0x08 | 0x10 | 0x20, 0xFD, 0xFB]
    g.kbc.mouse_event(300, 0, 0, 0)  # beyond 9 bits: split over packets
    assert [b for b, _ in g.drain()] == [0x08, 0xFF, 0x00, 0x08, 45, 0x00]


def test_mouse_flood_bounded(g: Guest) -> None:
    g.aux(0xF4)
    for _ in range(10_000):
        g.kbc.fake_aux_movement()
        g.kbc.mouse_event(10_000, -10_000, 0, 0)
    assert len(g.kbc.mouse.out) <= g.kbc.mouse.QUEUE_LIMIT
    assert len(g.drain()) <= g.kbc.mouse.QUEUE_LIMIT + 1


def test_command_discards_stale_stream_data(g: Guest) -> None:
    g.aux(0xF4)
    g.kbc.fake_aux_movement()  # byte 0 latched, two wait in the mouse
    g.cmd(0xD4, 0xF5)
    assert [b for b, _ in g.drain()] == [0x08, ACK]


# -- vmmouse wiring -------------------------------------------------------------------------

def test_vmmouse_event_reaches_guest_as_irq12(g: Guest) -> None:
    port = Vmport()
    vmm = Vmmouse(port, g.kbc.fake_aux_movement)

    def bd(ecx: int, ebx: int = 0) -> VmportRegs:
        r = VmportRegs(vm.BDOOR_MAGIC, ebx, ecx, 0x5658, 0, 0)
        port.handle(r, False, 4)
        return r

    g.aux(0xFF, 0xF4)
    bd(vm.BDOOR_CMD_ABSPOINTER_COMMAND, vm.VMMOUSE_READ_ID)
    assert bd(vm.BDOOR_CMD_ABSPOINTER_DATA, 1).eax == vm.VMMOUSE_VERSION
    bd(vm.BDOOR_CMD_ABSPOINTER_COMMAND, vm.VMMOUSE_REQUEST_ABSOLUTE)
    g.irqs.clear()
    assert vmm.queue_event(100, 200, 0, 0)
    assert g.irqs == [(12, 1)]
    packet = [b for b, _ in g.drain()]
    assert len(packet) == 3 and packet[0] & 0x08  # what vmmouse_process_byte checks
    r = bd(vm.BDOOR_CMD_ABSPOINTER_DATA, 4)
    assert (r.ebx, r.ecx) == (200, 400)


# -- hostile guest --------------------------------------------------------------------------

def test_bad_sizes_and_ports(g: Guest) -> None:
    assert g.kbc.port_read(0x60, 2) == 0xFFFF
    assert g.kbc.port_read(0x64, 4) == 0xFFFFFFFF
    assert g.kbc.port_read(0x61, 1) == 0xFF
    g.kbc.port_write(0x64, 2, 0xAA)
    g.kbc.port_write(0x62, 1, 0xAA)
    assert not g.status() & STR_OBF


def test_random_traffic_never_raises_and_stays_bounded() -> None:
    rng = random.Random(1234)
    levels: dict[int, int] = {1: 0, 12: 0}

    def set_irq(line: int, level: int) -> None:
        assert line in (1, 12)
        assert level != levels[line]  # only changes are reported
        levels[line] = level

    kbc = I8042(set_irq, lambda: None)
    for _ in range(50_000):
        op = rng.randrange(6)
        port = rng.choice((0x60, 0x64, 0x60, 0x64, rng.randrange(-2, 0x10002)))
        size = rng.choice((1, 1, 1, 2, 4, 0, 3, 8))
        if op == 0:
            v = kbc.port_read(port, size)
            assert 0 <= v <= 0xFFFFFFFF
        elif op < 4:
            kbc.port_write(port, size, rng.randrange(-(1 << 40), 1 << 40))
        elif op == 4:
            kbc.fake_aux_movement()
            kbc.mouse_event(rng.randrange(-5000, 5000), rng.randrange(-5000, 5000),
                            rng.randrange(-9, 9), rng.randrange(0, 256))
        else:
            kbc.queue_key(bytes(rng.randrange(256) for _ in range(rng.randrange(4))))
        assert len(kbc.kbd.out) <= kbc.kbd.QUEUE_LIMIT
        assert len(kbc.mouse.out) <= kbc.mouse.QUEUE_LIMIT
        assert levels == {1: kbc.irq_level(1), 12: kbc.irq_level(12)}
