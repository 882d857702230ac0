"""The hypervisor's 8259 pair (used where the CPU backend has no in-kernel irqchip)."""

from __future__ import annotations

import pytest

from hvmport.hv.pic import Pic


def init(pic: Pic) -> None:
    """The ICW sequence a BIOS or Linux uses: vectors 0x20 and 0x28, cascade on IRQ 2."""
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                        (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01)):
        pic.port_write(port, value)


def test_edge_latched_irr_and_imr() -> None:
    pic = Pic()
    init(pic)
    pic.set_irq(1, 1)
    pic.set_irq(1, 0)
    pic.port_write(0x20, 0x0A)
    assert pic.port_read(0x20) & 0x02  # the edge stays latched after the line drops
    pic.port_write(0x21, 0xFF)
    assert pic.port_read(0x21) == 0xFF
    assert pic.pending() is None  # masked
    pic.port_write(0x21, 0x00)
    assert pic.pending() == 0x21


def test_level_triggered_follows_the_line() -> None:
    pic = Pic()
    init(pic)
    pic.port_write(0x4D1, 0x10)  # IRQ 12 level-triggered
    assert pic.port_read(0x4D1) == 0x10
    pic.set_irq(12, 1)
    pic.port_write(0xA0, 0x0A)
    assert pic.port_read(0xA0) == 0x10
    assert pic.pending() == 0x2C  # through the cascade
    pic.set_irq(12, 0)
    assert pic.port_read(0xA0) == 0
    assert pic.pending() is None


def test_priority_isr_and_eoi() -> None:
    pic = Pic()
    init(pic)
    pic.set_irq(4, 1)
    pic.set_irq(1, 1)
    assert pic.pending() == 0x21  # lower IRQ number first
    pic.master.isr |= 0x02
    pic.master.irr &= ~0x02
    assert pic.pending() is None  # IRQ 1 in service blocks IRQ 4
    pic.port_write(0x20, 0x0B)  # OCW3: read ISR
    assert pic.port_read(0x20) == 0x02
    pic.port_write(0x20, 0x20)  # non-specific EOI
    assert pic.port_read(0x20) == 0
    assert pic.pending() == 0x24


def test_hostile_writes_never_raise() -> None:
    pic = Pic()
    for port in (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1):
        for value in (0, 0x10, 0x1F, 0xFF, 0x60, 0x0B, 0x1234):
            pic.port_write(port, value)
            assert 0 <= pic.port_read(port) <= 0xFF
    with pytest.raises(ValueError):
        pic.set_irq(16, 1)
