"""hv/pit.py: the 8254 on a controlled clock, programmed the way Linux programs it."""

from __future__ import annotations

import pytest

from hvmport.hv.pit import NS, PIT_HZ, Pit, ns_for_ticks


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000

    def __call__(self) -> int:
        return self.ns

    def ticks(self, n: int) -> None:
        self.ns += ns_for_ticks(n)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock) -> tuple[Pit, list[tuple[int, int]]]:
    edges: list[tuple[int, int]] = []
    return Pit(clock, lambda irq, level: edges.append((irq, level))), edges


def load(pit: Pit, channel: int, mode: int, count: int) -> None:
    pit.port_write(0x43, channel << 6 | 3 << 4 | mode << 1)  # lobyte/hibyte
    pit.port_write(0x40 + channel, count & 0xFF)
    pit.port_write(0x40 + channel, count >> 8)


def latched(pit: Pit, channel: int) -> int:
    pit.port_write(0x43, channel << 6)  # counter latch
    return pit.port_read(0x40 + channel) | pit.port_read(0x40 + channel) << 8


def test_periodic_tick_raises_irq0_once_per_period(clock: Clock) -> None:
    pit, edges = make(clock)
    load(pit, 0, 2, 4773)  # HZ=250, as Linux sets it up
    assert not pit.poll()
    clock.ticks(4772)
    assert not pit.poll()
    clock.ticks(1)
    assert pit.poll()
    assert edges == [(0, 1), (0, 0)]
    assert not pit.poll()  # one edge per period
    clock.ticks(4773)
    assert pit.poll()
    # A CPU that was busy for many periods gets one interrupt, not a burst.
    clock.ticks(4773 * 10)
    assert pit.poll()
    assert not pit.poll()


def test_next_event_is_the_next_period(clock: Clock) -> None:
    pit, _ = make(clock)
    start = clock.ns
    load(pit, 0, 2, 1000)
    assert pit.next_event_ns() == start + ns_for_ticks(1000)
    clock.ticks(1500)
    assert pit.next_event_ns() == start + ns_for_ticks(2000)


def test_oneshot_mode0_fires_once(clock: Clock) -> None:
    pit, edges = make(clock)
    load(pit, 0, 0, 500)
    clock.ticks(499)
    assert not pit.poll()
    clock.ticks(1)
    assert pit.poll()
    clock.ticks(100000)
    assert not pit.poll()
    assert pit.next_event_ns() is None
    load(pit, 0, 0, 100)  # re-armed by a new count
    clock.ticks(100)
    assert pit.poll()
    assert len(edges) == 4


def test_counter_latch_reads_the_running_count(clock: Clock) -> None:
    pit, _ = make(clock)
    load(pit, 0, 2, 0)  # 0 means 65536
    clock.ticks(1000)
    assert latched(pit, 0) == 65536 - 1000
    # The latch holds while time moves on, until both bytes are read.
    pit.port_write(0x43, 0x00)
    clock.ticks(50)
    assert pit.port_read(0x40) | pit.port_read(0x40) << 8 == 65536 - 1000
    assert latched(pit, 0) == 65536 - 1050


def test_unlatched_reads_alternate_low_and_high(clock: Clock) -> None:
    pit, _ = make(clock)
    load(pit, 0, 0, 0x1234)
    assert pit.port_read(0x40) == 0x34
    assert pit.port_read(0x40) == 0x12


def test_lobyte_only_and_hibyte_only_access(clock: Clock) -> None:
    pit, _ = make(clock)
    pit.port_write(0x43, 0 << 6 | 1 << 4 | 2 << 1)  # lobyte only, mode 2
    pit.port_write(0x40, 100)
    clock.ticks(10)
    assert pit.port_read(0x40) == 90
    pit.port_write(0x43, 0 << 6 | 2 << 4 | 0 << 1)  # hibyte only, mode 0
    pit.port_write(0x40, 0x02)
    assert pit.port_read(0x40) == 0x02


def test_channel2_gate_and_output_in_port_b(clock: Clock) -> None:
    """Linux's PIT calibration: gate on, mode 0 on channel 2, poll OUT2 in port 0x61."""
    pit, edges = make(clock)
    assert pit.port_read(0x61) & 0x01 == 0
    pit.port_write(0x61, (pit.port_read(0x61) & ~0x02) | 0x01)
    pit.port_write(0x43, 0xB0)  # channel 2, lobyte/hibyte, mode 0
    latch = PIT_HZ // 20  # 50 ms
    pit.port_write(0x42, latch & 0xFF)
    pit.port_write(0x42, latch >> 8)
    assert pit.port_read(0x61) & 0x20 == 0
    clock.ticks(latch - 1)
    assert pit.port_read(0x61) & 0x20 == 0
    clock.ticks(1)
    assert pit.port_read(0x61) & 0x21 == 0x21
    assert edges == []  # channel 2 is not wired to an interrupt


def test_gate_low_freezes_and_rising_gate_restarts(clock: Clock) -> None:
    pit, _ = make(clock)
    pit.port_write(0x61, 0x01)
    load(pit, 2, 0, 1000)
    clock.ticks(300)
    pit.port_write(0x61, 0x00)
    clock.ticks(5000)
    assert latched(pit, 2) == 700  # mode 0 holds its count while gated off
    pit.port_write(0x61, 0x01)
    clock.ticks(100)
    assert latched(pit, 2) == 600  # and resumes
    load(pit, 2, 2, 1000)
    clock.ticks(400)
    pit.port_write(0x61, 0x00)
    pit.port_write(0x61, 0x01)  # mode 2 restarts from the full count on a rising gate
    clock.ticks(1)
    assert latched(pit, 2) == 999


def test_mode1_waits_for_the_gate(clock: Clock) -> None:
    pit, _ = make(clock)
    load(pit, 2, 1, 100)
    clock.ticks(500)
    assert pit.port_read(0x61) & 0x20 == 0x20  # not triggered: OUT stays high
    pit.port_write(0x61, 0x01)  # rising gate triggers
    assert pit.port_read(0x61) & 0x20 == 0
    clock.ticks(100)
    assert pit.port_read(0x61) & 0x20 == 0x20


def test_read_back_status_and_count(clock: Clock) -> None:
    pit, _ = make(clock)
    load(pit, 0, 2, 3000)
    clock.ticks(1000)
    pit.port_write(0x43, 0xC0 | 0x02)  # read-back: count and status of channel 0
    status = pit.port_read(0x40)
    assert status & 0x3F == 3 << 4 | 2 << 1
    assert not status & 0x40  # count loaded
    assert pit.port_read(0x40) | pit.port_read(0x40) << 8 == 2000


def test_square_wave_output(clock: Clock) -> None:
    pit, edges = make(clock)
    load(pit, 0, 3, 100)
    clock.ticks(10)
    assert pit.channels[0].output(clock.ns)
    clock.ticks(50)
    assert not pit.channels[0].output(clock.ns)
    clock.ticks(40)
    assert pit.poll()
    assert edges == [(0, 1), (0, 0)]


def test_port_b_keeps_its_writable_bits_and_toggles_refresh(clock: Clock) -> None:
    pit, _ = make(clock)
    pit.port_write(0x61, 0xFF)
    assert pit.port_read(0x61) & 0x0F == 0x03
    first = pit.port_read(0x61) & 0x10
    clock.ns += 15_000
    assert pit.port_read(0x61) & 0x10 != first
    assert pit.port_read(0x43) == 0xFF


def test_one_second_of_ticks_at_hz_100(clock: Clock) -> None:
    pit, edges = make(clock)
    load(pit, 0, 2, PIT_HZ // 100)
    end = clock.ns + NS
    while clock.ns < end:
        nxt = pit.next_event_ns()
        assert nxt is not None
        clock.ns = nxt
        assert pit.poll()
    assert 99 <= len(edges) // 2 <= 101
