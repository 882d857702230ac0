"""The 16550A: Linux's 8250 probe (autoconfig, THRE test), console TX/RX, loopback, IRQs."""

from __future__ import annotations

import random

import pytest

from hvmport.dm.devices.bus import PortBus
from hvmport.dm.devices.uart import (
    FIFO_DEPTH,
    IIR_NO_INT,
    LCR,
    LSR,
    MCR,
    MSR,
    SCR,
    Uart16550,
)
from hvmport.dm.devices.uart import IER_DLM as IER
from hvmport.dm.devices.uart import IIR_FCR as IIR
from hvmport.dm.devices.uart import RBR_THR_DLL as RBR

BASE = 0x3F8


class Rig:
    def __init__(self, base: int = BASE, backlog: int = 4096) -> None:
        self.tx = bytearray()
        self.irqs: list[int] = []
        self.uart = Uart16550(self.tx.extend, self.irqs.append, base=base, rx_backlog=backlog)
        self.base = base

    def r(self, off: int) -> int:
        return self.uart.port_read(self.base + off, 1)

    def w(self, off: int, value: int) -> None:
        self.uart.port_write(self.base + off, 1, value)


@pytest.fixture
def u() -> Rig:
    return Rig()


def test_reset_state(u: Rig) -> None:
    assert u.r(LSR) == 0x60  # THRE | TEMT, never 0xFF ("LSR safety check")
    assert u.r(IIR) == IIR_NO_INT
    assert u.r(IER) == 0
    assert u.r(MSR) == 0xB0  # CTS, DSR, DCD from the host end
    assert u.irqs == []
    assert u.uart.baud == 9600


def test_linux_autoconfig(u: Rig) -> None:
    """serial8250's autoconfig: IER scratch test, loopback test, FIFO detection."""
    saved_ier = u.r(IER)
    u.w(IER, 0)
    assert u.r(IER) & 0x0F == 0
    u.w(IER, 0x0F)
    assert u.r(IER) & 0x0F == 0x0F
    u.w(IER, saved_ier)
    # Loopback: RTS -> CTS, OUT2 -> DCD.
    saved_mcr, _ = u.r(MCR), u.r(MSR)
    u.w(MCR, 0x10 | 0x0A)
    assert u.r(MSR) & 0xF0 == 0x90
    u.w(MCR, saved_mcr)
    # EFR probe with LCR = 0xBF lands on FCR/IIR: a 16550A has no EFR.
    u.w(LCR, 0xBF)
    u.w(IIR, 0)
    u.w(LCR, 0)
    u.w(IIR, 0x01)
    assert u.r(IIR) >> 6 == 3  # 16550A
    u.w(LCR, 0x80)
    assert u.r(IIR) != 0  # no ST16C650V1 EFR behind DLAB either
    # TI16750 check: bit 5 of IIR never follows FCR bit 5 on a 16550A.
    u.w(LCR, 0)
    u.w(IIR, 0x01 | 0x20)
    status1 = u.r(IIR) & 0xE0
    u.w(LCR, 0x80)
    u.w(IIR, 0x01 | 0x20)
    status2 = u.r(IIR) & 0xE0
    u.w(LCR, 0)
    assert (status1, status2) == (0xC0, 0xC0)
    assert u.r(MCR) == saved_mcr
    assert u.tx == b""  # nothing leaked to the console while probing


def test_thre_test_passes(u: Rig) -> None:
    """serial8250_do_startup: a real 16550 re-asserts THRE when THRI is re-enabled."""
    u.w(IIR, 0x07)
    u.w(IER, 0x02)
    iir1 = u.r(IIR)
    u.w(IER, 0)
    u.w(IER, 0x02)
    iir = u.r(IIR)
    u.w(IER, 0)
    assert iir1 == 0xC2
    assert not iir & IIR_NO_INT
    assert u.irqs == [1, 0, 1, 0]


def test_console_transmit(u: Rig) -> None:
    u.w(LCR, 0x83)
    u.w(RBR, 0x01)  # DLL = 1: 115200 baud, not a byte on the wire
    u.w(IER, 0x00)
    u.w(LCR, 0x03)
    assert u.uart.baud == 115200
    for ch in b"Linux\n":
        assert u.r(LSR) & 0x60 == 0x60
        u.w(RBR, ch)
    assert bytes(u.tx) == b"Linux\n"


def test_thre_interrupt_cycle(u: Rig) -> None:
    u.w(IER, 0x02)
    assert u.irqs == [1]
    assert u.r(IIR) == 0x02  # FIFO off: no 0xC0
    assert u.irqs == [1, 0]
    u.w(RBR, ord("x"))  # sent at once: THRE pending again
    assert u.irqs == [1, 0, 1]
    u.w(RBR, ord("y"))  # still pending: no new change
    assert u.irqs == [1, 0, 1]
    u.w(IER, 0)
    assert u.irqs == [1, 0, 1, 0]
    assert bytes(u.tx) == b"xy"


def test_receive_with_fifo(u: Rig) -> None:
    u.w(IIR, 0x01 | 0x80)  # FIFO on, trigger level 8
    u.w(IER, 0x01)
    assert u.uart.feed(b"hello") == 5
    assert u.irqs == [1]
    assert u.r(IIR) == 0xCC  # below the trigger: timeout code
    assert u.uart.feed(b" world") == 6
    assert u.r(IIR) == 0xC4  # 11 >= 8: data available
    got = bytearray()
    while u.r(LSR) & 0x01:
        got.append(u.r(RBR))
    assert bytes(got) == b"hello world"
    assert u.r(IIR) == 0xC1
    assert u.irqs == [1, 0]


def test_receive_beyond_fifo_drains_from_backlog(u: Rig) -> None:
    u.w(IIR, 0x01)
    data = bytes(range(100))
    assert u.uart.feed(data) == 100
    assert u.uart.rx_pending == 100
    got = bytearray()
    while u.r(LSR) & 0x01:
        assert not u.r(LSR) & 0x02  # host input never overruns
        got.append(u.r(RBR))
    assert bytes(got) == data


def test_receive_without_fifo_holds_one_byte(u: Rig) -> None:
    u.uart.feed(b"ab")
    u.w(IER, 0x01)
    assert u.r(IIR) == 0x04
    assert u.r(RBR) == ord("a")
    assert u.r(RBR) == ord("b")
    assert u.r(IIR) == IIR_NO_INT
    assert u.r(RBR) == 0  # empty


def test_backlog_is_bounded() -> None:
    u = Rig(backlog=4096)
    assert u.uart.feed(bytes(5000)) == 4096
    assert u.uart.rx_dropped == 904
    # One byte already moved on into the (1-byte, FIFO off) receiver: one slot is free.
    assert u.uart.feed(b"xy") == 1
    assert u.uart.feed(b"z") == 0
    assert u.uart.rx_pending == 4097
    assert u.r(RBR) == 0
    assert u.uart.feed(b"zz") == 1


def test_fifo_clear_and_mode_switch(u: Rig) -> None:
    u.w(IIR, 0x01)
    u.uart.feed(bytes(40))
    u.w(IIR, 0x01 | 0x02)  # clear the receive FIFO: 16 bytes gone, backlog refills it
    assert u.uart.rx_pending == 40 - 16
    u.w(IIR, 0x00)  # FIFO off: cleared again, now one byte deep
    assert u.uart.rx_pending == 40 - 32
    assert u.r(IIR) >> 6 == 0


def test_loopback(u: Rig) -> None:
    u.w(MCR, 0x10)
    u.w(IIR, 0x01)
    u.w(IER, 0x05)  # RDI + RLSI
    u.uart.feed(b"host")  # waits: in loopback the receiver hears only the transmitter
    for ch in b"loop":
        u.w(RBR, ch)
    assert u.tx == b""
    assert bytes(u.r(RBR) for _ in range(4)) == b"loop"
    for i in range(FIFO_DEPTH + 1):
        u.w(RBR, i)
    lsr = u.r(LSR)
    assert lsr & 0x03 == 0x03  # data ready + overrun
    assert u.r(LSR) & 0x02 == 0  # reading LSR clears OE
    u.w(RBR, 0xEE)  # overrun again: RLS outranks data available
    assert u.r(IIR) == 0xC6
    u.r(LSR)
    assert u.r(IIR) == 0xC4
    assert [u.r(RBR) for _ in range(FIFO_DEPTH)] == list(range(FIFO_DEPTH))
    u.w(MCR, 0x00)
    assert bytes(u.r(RBR) for _ in range(4)) == b"host"


def test_loopback_overrun_without_fifo(u: Rig) -> None:
    u.w(MCR, 0x10)
    u.w(RBR, 1)
    u.w(RBR, 2)
    assert u.r(LSR) & 0x03 == 0x03
    assert u.r(RBR) == 1  # the later byte is the one lost


def test_modem_status_deltas_and_interrupt(u: Rig) -> None:
    u.w(IER, 0x08)
    u.w(MCR, 0x10)  # loopback with all outputs off: CTS/DSR/DCD drop
    assert u.irqs == [1]
    assert u.r(IIR) == 0x00
    assert u.r(MSR) == 0x0B  # DCTS | DDSR | DDCD, lines low
    assert u.irqs == [1, 0]
    u.w(MCR, 0x10 | 0x04)  # OUT1 -> RI rises: no TERI on a rising edge
    assert u.r(MSR) == 0x40
    u.w(MCR, 0x10)
    assert u.r(MSR) == 0x04  # trailing edge of RI
    u.w(MCR, 0x10 | 0x01)
    assert u.r(MSR) == 0x22  # DSR + DDSR


def test_interrupt_priority(u: Rig) -> None:
    u.w(MCR, 0x10)
    u.w(IER, 0x0F)
    u.w(RBR, 1)
    u.w(RBR, 2)  # overrun
    assert u.r(IIR) == 0x06
    u.r(LSR)
    assert u.r(IIR) == 0x04
    u.r(RBR)
    assert u.r(IIR) == 0x02  # THRE, acknowledged by this read
    assert u.r(IIR) == 0x00  # modem status (loopback changed the lines)
    u.r(MSR)
    assert u.r(IIR) == IIR_NO_INT
    assert u.irqs[-1] == 0


def test_divisor_latch_and_scratch(u: Rig) -> None:
    u.w(LCR, 0x80)
    u.w(RBR, 0x34)
    u.w(IER, 0x12)
    assert (u.r(RBR), u.r(IER)) == (0x34, 0x12)
    assert u.uart.divisor == 0x1234
    u.w(LCR, 0x03)
    assert u.r(IER) == 0
    assert u.tx == b""
    u.w(SCR, 0xA5)
    assert u.r(SCR) == 0xA5
    u.w(LCR, 0x80)
    u.w(RBR, 0)
    u.w(IER, 0)
    assert u.uart.baud is None


def test_mcr_and_ier_masked(u: Rig) -> None:
    u.w(MCR, 0xFF)
    assert u.r(MCR) == 0x1F
    u.w(IER, 0xF0)
    assert u.r(IER) == 0


def test_on_a_bus_at_com1() -> None:
    rig = Rig()
    bus = PortBus()
    bus.register(BASE, BASE + 7, rig.uart, "com1")
    bus.write(BASE, 1, ord("!"))
    assert rig.tx == b"!"
    assert bus.read(BASE + 5, 1) == 0x60
    assert bus.read(BASE + 7, 2) == 0xFFFF  # sticks out of the range
    assert bus.read(BASE, 2) == 0xFFFF  # inside, but the UART is byte-wide


def test_hostile_traffic() -> None:
    rng = random.Random(99)
    rig = Rig(base=0x2F8, backlog=64)
    for _ in range(50_000):
        port = rng.choice((0x2F8 + rng.randrange(8), rng.randrange(-1, 0x10001)))
        size = rng.choice((1, 1, 1, 2, 4, 0, 3))
        if rng.random() < 0.5:
            v = rig.uart.port_read(port, size)
            assert 0 <= v <= 0xFFFFFFFF
        else:
            rig.uart.port_write(port, size, rng.randrange(-(1 << 40), 1 << 40))
        if rng.random() < 0.05:
            rig.uart.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        assert rig.uart.rx_pending <= 64 + FIFO_DEPTH
        assert rig.irqs == [] or rig.irqs[-1] == rig.uart.irq_level
    assert all(a != b for a, b in zip(rig.irqs, rig.irqs[1:], strict=False))
    assert rig.uart.port_read(0x2F0, 1) == 0xFF
