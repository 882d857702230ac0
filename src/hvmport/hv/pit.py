"""The 8254 programmable interval timer (ports 0x40-0x43) and its gate/output bits at 0x61.

Facts from Intel's 82C54 data sheet. The counters run at 1.193182 MHz on the time source
given (nanoseconds), computed from it when read rather than ticked, so the model costs
nothing while nobody looks. What Linux uses is modelled exactly: channel 0 in mode 2
(periodic tick) or mode 0 (one-shot clockevent), the counter-latch command and
lobyte/hibyte reads (the "pit" clocksource), and channel 2 with its gate and output in
system control port B (0x61) for TSC calibration. Modes 1 and 5 (hardware-triggered) start
counting on a rising gate; mode 3 is a square wave whose counter this model reports
decrementing by one per input tick (Linux never reads a mode-3 counter). BCD counting is
accepted and counted in binary. The read-back command (0xc0..) latches counts and status.

Channel 0's output drives ISA IRQ 0: :meth:`Pit.poll` raises an edge for every output
rising edge that has happened since the last poll (ticks missed while the CPU was busy
coalesce into one, as Linux expects of a late timer), and :meth:`Pit.next_event_ns` says
when the next one is due, so a halted vCPU can sleep until then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PIT_HZ = 1_193_182
NS = 1_000_000_000
PORT_BASE = 0x40
PORT_COMMAND = 0x43
PORT_B = 0x61
PORTS = (0x40, 0x41, 0x42, 0x43, PORT_B)

#: Port B bits: 0 gate of channel 2 (rw), 1 speaker data (rw), 4 refresh toggle (ro),
#: 5 output of channel 2 (ro).
B_GATE2 = 0x01
B_SPEAKER = 0x02
B_REFRESH = 0x10
B_OUT2 = 0x20

ACCESS_LATCH, ACCESS_LO, ACCESS_HI, ACCESS_LOHI = 0, 1, 2, 3


def ticks_between(start_ns: int, now_ns: int) -> int:
    return max(0, now_ns - start_ns) * PIT_HZ // NS


def ns_for_ticks(ticks: int) -> int:
    return -(-ticks * NS // PIT_HZ)


@dataclass
class Channel:
    mode: int = 0
    access: int = ACCESS_LOHI
    bcd: bool = False
    #: The count loaded (1..0x10000: a written 0 means 0x10000).
    reload: int = 0x10000
    #: When the current count started (None: no count loaded, or waiting for a gate edge).
    start_ns: int | None = None
    gate: bool = True
    #: The count frozen while the gate is low (modes 0, 2, 3, 4).
    frozen: int | None = None
    write_low: int | None = None  # the low byte of a LOHI write, waiting for the high
    read_high_next: bool = False
    latch: list[int] | None = None  # latched bytes still to be read
    status_latch: int | None = None
    null_count: bool = True
    #: Output rising edges already reported (channel 0 -> IRQ 0).
    edges_seen: int = 0

    # -- counting -------------------------------------------------------------------------

    def elapsed(self, now: int) -> int | None:
        if self.start_ns is None:
            return None
        return ticks_between(self.start_ns, now)

    def count(self, now: int) -> int:
        if self.frozen is not None:
            return self.frozen
        ticks = self.elapsed(now)
        if ticks is None:
            return self.reload & 0xFFFF
        if self.mode in (2, 3):
            return self.reload - ticks % self.reload
        return (self.reload - ticks) & 0xFFFF

    def output(self, now: int) -> bool:
        ticks = self.elapsed(now)
        if ticks is None:
            # Before a count is loaded: mode 0 holds OUT low, the others high.
            return self.mode != 0
        if self.mode in (0, 1):
            return ticks >= self.reload
        if self.mode == 2:
            return ticks % self.reload != self.reload - 1
        if self.mode == 3:
            return ticks % self.reload < (self.reload + 1) // 2
        return ticks != self.reload  # modes 4, 5: low for one tick at terminal count

    def rising_edges(self, now: int) -> int:
        """Output rising edges since the count started (the IRQ 0 source)."""
        ticks = self.elapsed(now)
        if ticks is None or self.frozen is not None:
            return self.edges_seen
        if self.mode in (0, 1):
            return 1 if ticks >= self.reload else 0
        if self.mode in (2, 3):
            # Mode 2 rises after its low tick (count 1 -> reload); mode 3 at each period.
            return ticks // self.reload
        return 1 if ticks > self.reload else 0

    def next_edge_ns(self, now: int) -> int | None:
        if self.start_ns is None or self.frozen is not None:
            return None
        ticks = self.elapsed(now) or 0
        if self.mode in (2, 3):
            nxt = (ticks // self.reload + 1) * self.reload
        elif self.mode in (0, 1):
            if ticks >= self.reload:
                return None
            nxt = self.reload
        else:
            if ticks > self.reload:
                return None
            nxt = self.reload + 1
        return self.start_ns + ns_for_ticks(nxt)

    # -- programming ----------------------------------------------------------------------

    def set_mode(self, control: int) -> None:
        self.access = (control >> 4) & 3
        mode = (control >> 1) & 7
        self.mode = mode & 3 if mode > 5 else mode  # 6 and 7 are aliases of 2 and 3
        self.bcd = bool(control & 1)
        self.start_ns = None
        self.frozen = None
        self.write_low = None
        self.read_high_next = False
        self.null_count = True
        self.edges_seen = 0

    def load(self, value: int, now: int) -> None:
        self.reload = value or 0x10000
        self.null_count = False
        self.frozen = None
        self.edges_seen = 0
        # Modes 1 and 5 wait for a rising gate; the others start at once if gated on.
        if self.mode in (1, 5):
            self.start_ns = None
        elif self.gate:
            self.start_ns = now
        else:
            self.start_ns = None
            self.frozen = self.reload & 0xFFFF

    def set_gate(self, level: bool, now: int) -> None:
        if level == self.gate:
            return
        self.gate = level
        if self.null_count:
            return
        if level:
            if self.mode in (1, 2, 3, 5):
                self.start_ns = now  # a rising gate (re)starts these modes
                self.edges_seen = 0
            elif self.frozen is not None:
                # Modes 0 and 4 resume where they stopped.
                done = (self.reload - self.frozen) & 0xFFFF
                self.start_ns = now - ns_for_ticks(done)
            self.frozen = None
        elif self.mode in (0, 2, 3, 4):
            self.frozen = self.count(now)

    def write(self, value: int, now: int) -> None:
        if self.access == ACCESS_LO:
            self.load(value, now)
        elif self.access == ACCESS_HI:
            self.load(value << 8, now)
        elif self.write_low is None:
            self.write_low = value
            if self.mode == 0:
                # Writing the first byte stops a mode-0 count (data sheet: "OUT goes low").
                self.start_ns = None
        else:
            low, self.write_low = self.write_low, None
            self.load(low | value << 8, now)

    def latch_count(self, now: int) -> None:
        if self.latch is None:  # a second latch before reading is ignored
            count = self.count(now)
            if self.access == ACCESS_LO:
                self.latch = [count & 0xFF]
            elif self.access == ACCESS_HI:
                self.latch = [count >> 8]
            else:
                self.latch = [count & 0xFF, count >> 8]

    def latch_status(self, now: int) -> None:
        if self.status_latch is None:
            self.status_latch = (int(self.output(now)) << 7 | int(self.null_count) << 6
                                 | self.access << 4 | self.mode << 1 | int(self.bcd))

    def read(self, now: int) -> int:
        if self.status_latch is not None:
            value, self.status_latch = self.status_latch, None
            return value
        if self.latch is not None:
            value = self.latch.pop(0)
            if not self.latch:
                self.latch = None
            return value
        count = self.count(now)
        if self.access == ACCESS_LO:
            return count & 0xFF
        if self.access == ACCESS_HI:
            return count >> 8
        high, self.read_high_next = self.read_high_next, not self.read_high_next
        return count >> 8 if high else count & 0xFF


class Pit:
    """The three channels, the command port and port B; ``irq(0, level)`` is IRQ 0."""

    def __init__(self, now_ns: Callable[[], int], irq: Callable[[int, int], None]) -> None:
        self.now_ns = now_ns
        self.irq = irq
        self.channels = [Channel(), Channel(), Channel()]
        self.port_b = 0
        # On a PC, channel 2's gate is port B bit 0, which powers up low.
        self.channels[2].gate = False

    def port_read(self, port: int) -> int:
        now = self.now_ns()
        if port == PORT_B:
            # The refresh bit toggles every ~15 us on real hardware; some code waits on it.
            refresh = B_REFRESH if (now // 15_000) & 1 else 0
            out2 = B_OUT2 if self.channels[2].output(now) else 0
            return (self.port_b & (B_GATE2 | B_SPEAKER)) | refresh | out2
        if PORT_BASE <= port < PORT_COMMAND:
            return self.channels[port - PORT_BASE].read(now)
        return 0xFF  # the command port is write-only

    def port_write(self, port: int, value: int) -> None:
        now = self.now_ns()
        value &= 0xFF
        if port == PORT_B:
            self.port_b = value & (B_GATE2 | B_SPEAKER)
            self.channels[2].set_gate(bool(value & B_GATE2), now)
        elif PORT_BASE <= port < PORT_COMMAND:
            self.channels[port - PORT_BASE].write(value, now)
        elif port == PORT_COMMAND:
            self._command(value, now)
        self.poll()

    def _command(self, value: int, now: int) -> None:
        select = value >> 6
        if select == 3:  # read-back: bit 5 low latches counts, bit 4 low latches status
            for i in range(3):
                if value & (2 << i):
                    if not value & 0x20:
                        self.channels[i].latch_count(now)
                    if not value & 0x10:
                        self.channels[i].latch_status(now)
            return
        channel = self.channels[select]
        if (value >> 4) & 3 == ACCESS_LATCH:
            channel.latch_count(now)
        else:
            channel.set_mode(value)

    def poll(self) -> bool:
        """Raise IRQ 0 if channel 0's output has risen since the last poll; True if so."""
        ch = self.channels[0]
        edges = ch.rising_edges(self.now_ns())
        if edges > ch.edges_seen:
            ch.edges_seen = edges
            self.irq(0, 1)
            self.irq(0, 0)
            return True
        return False

    def next_event_ns(self) -> int | None:
        """When channel 0's output next rises (monotonic ns), or None."""
        return self.channels[0].next_edge_ns(self.now_ns())
