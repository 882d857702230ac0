"""The PC platform devices the hypervisor keeps for a backend without an in-kernel
irqchip (Unicorn): the 8259 pair, the 8254 PIT with port B (0x61), the CMOS RTC and the
reset control register at 0xcf9. Xen keeps the same devices in the hypervisor; on KVM the
kernel's irqchip and PIT provide them.

One lock covers all of them: the PIT raises IRQ 0 into the PIC while it holds it, and the
control socket's interrupt lines from device models take it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hvmport.abi import dm_op as dmop
from hvmport.hv import pic as pic_mod
from hvmport.hv import pit as pit_mod
from hvmport.hv import rtc as rtc_mod
from hvmport.hv.pic import Pic
from hvmport.hv.pit import Pit
from hvmport.hv.rtc import Rtc

RESET_CONTROL = 0xCF9
#: Reset control register bits: 1 system (hard) reset, 2 reset the CPU, 3 full reset.
RC_SYS_RST = 0x02
RC_RST_CPU = 0x04
RC_FULL_RST = 0x08

Shutdown = Callable[[int, str], None]


class Platform:
    def __init__(self, shutdown: Shutdown, *, now_ns: Callable[[], int] = time.monotonic_ns,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.lock = threading.Lock()
        self.pic = Pic()
        self.pit = Pit(now_ns, self.pic.set_irq)
        self.rtc = Rtc(wall_ns)
        self.shutdown = shutdown
        self.reset_control = 0
        self._listeners: list[Callable[[], None]] = []
        self.byte_ports = frozenset((*pic_mod.PORTS, *pit_mod.PORTS, *rtc_mod.PORTS,
                                     RESET_CONTROL))

    def claims(self, port: int, size: int) -> bool:
        """Byte-wide registers; 0xcf9 only as a byte (0xcf8 as a dword is PCI's)."""
        if port == RESET_CONTROL:
            return size == 1
        return port in self.byte_ports

    def read(self, port: int) -> int:
        with self.lock:
            if port in pic_mod.PORTS:
                return self.pic.port_read(port)
            if port in pit_mod.PORTS:
                return self.pit.port_read(port)
            if port in rtc_mod.PORTS:
                return self.rtc.port_read(port)
            if port == RESET_CONTROL:
                return self.reset_control
        return 0xFF

    def write(self, port: int, value: int) -> None:
        reset = False
        with self.lock:
            if port in pic_mod.PORTS:
                self.pic.port_write(port, value)
            elif port in pit_mod.PORTS:
                self.pit.port_write(port, value)
            elif port in rtc_mod.PORTS:
                self.rtc.port_write(port, value)
            elif port == RESET_CONTROL:
                self.reset_control = value & (RC_SYS_RST | RC_FULL_RST)
                reset = bool(value & RC_RST_CPU)
        if reset:
            self.shutdown(dmop.SHUTDOWN_reboot, "the guest (reset control register 0xcf9)")

    def set_irq(self, irq: int, level: int) -> None:
        with self.lock:
            self.pic.set_irq(irq, level)
        for wake in self._listeners:
            wake()

    def add_listener(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` after every change of an interrupt line (a halted CPU waits)."""
        self._listeners.append(wake)

    def poll(self) -> int | None:
        """Bring the timer up to date; the vector the PIC would deliver now, if any."""
        with self.lock:
            self.pit.poll()
            return self.pic.pending()

    def acknowledge(self) -> int | None:
        """Interrupt acknowledge: the vector to deliver, now in service."""
        with self.lock:
            self.pit.poll()
            return self.pic.acknowledge()

    def next_event_ns(self) -> int | None:
        with self.lock:
            return self.pit.next_event_ns()
