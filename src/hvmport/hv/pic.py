"""The 8259A pair (master at 0x20, slave at 0xa0, ELCR at 0x4d0/0x4d1), in the hypervisor.

Xen emulates the PIC in the hypervisor, and on KVM the in-kernel irqchip does; on Unicorn
this model takes the interrupt lines that device models drive with ``set_isa_irq_level``.
It keeps what a guest can observe through the ports — IRR (edge- or level-triggered per
ELCR), IMR, ISR, the initialisation sequence, EOIs, OCW3 register selection — and
``pending()`` says which vector a CPU backend should deliver next (delivery itself comes
with the full Unicorn platform). A guest's writes are all accepted; nothing raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MASTER = 0x20
SLAVE = 0xA0
ELCR = 0x4D0
CASCADE_IRQ = 2
PORTS = (MASTER, MASTER + 1, SLAVE, SLAVE + 1, ELCR, ELCR + 1)


@dataclass
class _Chip:
    irr: int = 0
    imr: int = 0
    isr: int = 0
    elcr: int = 0
    lines: int = 0  # current input levels
    vector_base: int = 0
    init_step: int = 0  # 0: ready; 2, 3, 4: expecting ICW2..ICW4
    needs_icw4: bool = False
    single: bool = False
    auto_eoi: bool = False
    read_isr: bool = False

    def set_line(self, bit: int, level: bool) -> None:
        mask = 1 << bit
        if self.elcr & mask:
            self.irr = (self.irr | mask) if level else (self.irr & ~mask)
        elif level and not self.lines & mask:
            self.irr |= mask  # edge: latched on the rising edge
        self.lines = (self.lines | mask) if level else (self.lines & ~mask)

    def command(self, value: int) -> None:
        if value & 0x10:  # ICW1: start initialisation
            self.imr = self.isr = 0
            self.irr &= self.elcr & self.lines  # edges are forgotten, levels persist
            self.read_isr = False
            self.needs_icw4 = bool(value & 0x01)
            self.single = bool(value & 0x02)
            self.init_step = 2
        elif value & 0x08:  # OCW3
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
        else:  # OCW2
            kind = value & 0xE0
            if kind == 0x20 and self.isr:  # non-specific EOI: the highest priority
                self.isr &= self.isr - 1
            elif kind == 0x60:  # specific EOI
                self.isr &= ~(1 << (value & 7))

    def data(self, value: int) -> None:
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            if not self.single:
                self.init_step = 3  # ICW3 follows in cascade mode
            else:
                self.init_step = 4 if self.needs_icw4 else 0
        elif self.init_step == 3:  # ICW3: cascade wiring, fixed on a PC
            self.init_step = 4 if self.needs_icw4 else 0
        elif self.init_step == 4:
            self.auto_eoi = bool(value & 0x02)
            self.init_step = 0
        else:
            self.imr = value & 0xFF

    def requested(self) -> int:
        return self.irr & ~self.imr & 0xFF


@dataclass
class Pic:
    master: _Chip = field(default_factory=_Chip)
    slave: _Chip = field(default_factory=_Chip)

    def set_irq(self, irq: int, level: int) -> None:
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} out of range")
        chip = self.master if irq < 8 else self.slave
        chip.set_line(irq & 7, bool(level))
        self._cascade()

    def _cascade(self) -> None:
        # The slave's output is the master's IRQ 2 line.
        self.master.set_line(CASCADE_IRQ, bool(self.slave.requested()))

    def port_read(self, port: int) -> int:
        if port in (MASTER, SLAVE):
            chip = self.master if port == MASTER else self.slave
            return chip.isr if chip.read_isr else chip.irr
        if port in (MASTER + 1, SLAVE + 1):
            return (self.master if port == MASTER + 1 else self.slave).imr
        if port == ELCR:
            return self.master.elcr
        if port == ELCR + 1:
            return self.slave.elcr
        return 0xFF

    def port_write(self, port: int, value: int) -> None:
        value &= 0xFF
        if port in (MASTER, SLAVE):
            (self.master if port == MASTER else self.slave).command(value)
        elif port in (MASTER + 1, SLAVE + 1):
            (self.master if port == MASTER + 1 else self.slave).data(value)
        elif port == ELCR:
            self.master.elcr = value & 0xF8  # IRQ 0, 1, 2 are always edge-triggered
        elif port == ELCR + 1:
            self.slave.elcr = value & 0xDE  # as are IRQ 8 and 13
        self._cascade()

    def pending(self) -> int | None:
        """The vector to deliver next, or None: highest priority unmasked request not
        already in service (fully nested mode)."""
        req = self.master.requested() & ~self.master.isr
        for bit in range(8):
            if self.master.isr & (1 << bit):
                return None  # something of higher priority is in service
            if req & (1 << bit):
                if bit != CASCADE_IRQ:
                    return self.master.vector_base | bit
                sreq = self.slave.requested() & ~self.slave.isr
                for sbit in range(8):
                    if self.slave.isr & (1 << sbit):
                        return None
                    if sreq & (1 << sbit):
                        return self.slave.vector_base | sbit
        return None

    def acknowledge(self) -> int | None:
        """The CPU's interrupt acknowledge: the vector of :meth:`pending`, moved from IRR
        to ISR (edge requests are consumed; in auto-EOI mode ISR is left clear)."""
        vector = self.pending()
        if vector is None:
            return None
        master_bit = self._master_bit(vector)
        self._ack(self.master, master_bit)
        if master_bit == CASCADE_IRQ:
            self._ack(self.slave, vector - self.slave.vector_base)
            self._cascade()
        return vector

    def _master_bit(self, vector: int) -> int:
        base = self.master.vector_base
        if base <= vector < base + 8 and vector - base != CASCADE_IRQ:
            return vector - base
        return CASCADE_IRQ

    @staticmethod
    def _ack(chip: _Chip, bit: int) -> None:
        mask = 1 << bit
        if not chip.elcr & mask:
            chip.irr &= ~mask
        if not chip.auto_eoi:
            chip.isr |= mask
