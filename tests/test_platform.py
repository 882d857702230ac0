"""hv/platform.py: the hypervisor's PC devices together, and through the Emulator's ports."""

from __future__ import annotations

import io
from pathlib import Path

from hvmport import toolchain
from hvmport.abi import dm_op as dmop
from hvmport.cpu.base import Mode
from hvmport.hv.lifecycle import Ending
from hvmport.hv.pic import Pic
from hvmport.hv.pit import ns_for_ticks
from hvmport.hv.platform import Platform
from hvmport.hv.run import Image, RunConfig, run


class Clock:
    ns = 0

    def __call__(self) -> int:
        return self.ns


def init_pics(p: Platform) -> None:
    # Linux's init_8259A: ICW1..ICW4 on both chips, vectors 0x30 and 0x38.
    for port, base, icw3 in ((0x20, 0x30, 0x04), (0xA0, 0x38, 0x02)):
        p.write(port, 0x11)
        p.write(port + 1, base)
        p.write(port + 1, icw3)
        p.write(port + 1, 0x01)
    p.write(0x21, 0xFA)  # unmask IRQ 0 and the cascade
    p.write(0xA1, 0xFF)


def test_timer_interrupt_reaches_the_cpu_and_needs_eoi() -> None:
    clock = Clock()
    p = Platform(lambda r, w: None, now_ns=clock)
    init_pics(p)
    p.write(0x43, 0x34)  # channel 0, lobyte/hibyte, mode 2
    p.write(0x40, 1000 & 0xFF)
    p.write(0x40, 1000 >> 8)
    assert p.poll() is None
    assert p.next_event_ns() == ns_for_ticks(1000)
    clock.ns = ns_for_ticks(1000)
    assert p.poll() == 0x30
    assert p.acknowledge() == 0x30
    assert p.poll() is None  # in service
    clock.ns = ns_for_ticks(2000)
    assert p.poll() is None  # requested, but IRQ 0 is still in service
    p.write(0x20, 0x20)  # EOI
    assert p.acknowledge() == 0x30


def test_slave_interrupt_through_the_cascade() -> None:
    p = Platform(lambda r, w: None, now_ns=Clock())
    init_pics(p)
    p.write(0xA1, 0xEF)  # unmask IRQ 12
    p.set_irq(12, 1)
    p.set_irq(12, 0)
    assert p.acknowledge() == 0x3C
    assert p.pic.master.isr == 0x04 and p.pic.slave.isr == 0x10
    p.write(0xA0, 0x20)
    p.write(0x20, 0x20)
    assert p.pic.master.isr == 0 and p.pic.slave.isr == 0


def test_reset_control_register() -> None:
    calls: list[tuple[int, str]] = []
    p = Platform(lambda r, w: calls.append((r, w)), now_ns=Clock())
    p.write(0xCF9, 0x02)  # select a hard reset: no reset yet
    assert calls == []
    assert p.read(0xCF9) == 0x02
    p.write(0xCF9, 0x06)
    assert calls == [(dmop.SHUTDOWN_reboot, "the guest (reset control register 0xcf9)")]
    assert p.claims(0xCF9, 1) and not p.claims(0xCF9, 4) and not p.claims(0xCF8, 4)


def test_rtc_and_pit_ports_are_claimed() -> None:
    p = Platform(lambda r, w: None, now_ns=Clock(), wall_ns=lambda: 0)
    for port in (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x40, 0x41, 0x42, 0x43, 0x61,
                 0x70, 0x71):
        assert p.claims(port, 1)
    assert not p.claims(0x60, 1) and not p.claims(0x3F8, 1)
    p.write(0x70, 0x09)
    assert p.read(0x71) == 0x70  # 1970, BCD


def test_auto_eoi_leaves_nothing_in_service() -> None:
    pic = Pic()
    pic.port_write(0x20, 0x11)
    pic.port_write(0x21, 0x20)
    pic.port_write(0x21, 0x04)
    pic.port_write(0x21, 0x03)  # ICW4: 8086 mode, auto-EOI
    pic.port_write(0x21, 0xFE)
    pic.set_irq(0, 1)
    assert pic.acknowledge() == 0x20
    assert pic.master.isr == 0 and pic.master.irr == 0
    assert pic.acknowledge() is None


# --- end to end on Unicorn (KVM brings these devices in its kernel) --------------------------

RESET_GUEST = r"""
    movb $0x09, %al          /* RTC year register */
    outb %al, $0x70
    inb $0x71, %al
    outb %al, $0xe9          /* the year, in BCD, on the debug console */
    movb $0x34, %al          /* PIT channel 0, mode 2 */
    outb %al, $0x43
    movb $0x10, %al
    outb %al, $0x40
    outb %al, $0x40
    movb $0x06, %al          /* reset through the reset control register */
    movw $0xcf9, %dx
    outb %al, %dx
1:  jmp 1b
"""


def test_guest_resets_through_0xcf9_on_unicorn(tmp_path: Path) -> None:
    kernel = tmp_path / "reset.bin"
    kernel.write_bytes(toolchain.assemble_flat(RESET_GUEST, 64, 0x100000))
    console = io.BytesIO()
    result = run(RunConfig(Image(kernel, Mode.LONG64, 0x100000), backend="unicorn",
                           console=console, device_model=False, timeout=30))
    assert result.ending is Ending.REBOOT, result.reason
    assert "0xcf9" in result.reason
    assert len(console.getvalue()) == 1 and console.getvalue() != b"\xff"
