"""PortBus: claiming port ranges and routing PIO accesses to devices."""

from __future__ import annotations

import pytest

from hvmport.dm.devices.bus import PortBus, all_ones
from hvmport.dm.devices.i8042 import I8042
from hvmport.errors import ConfigError


class Recorder:
    """Answers each read with ``reply`` (possibly too wide) and records every access."""

    def __init__(self, reply: int = 0x1234_5678_9ABC) -> None:
        self.reply = reply
        self.log: list[tuple[str, int, int, int]] = []

    def port_read(self, port: int, size: int) -> int:
        self.log.append(("r", port, size, 0))
        return self.reply

    def port_write(self, port: int, size: int, value: int) -> None:
        self.log.append(("w", port, size, value))


@pytest.fixture
def bus() -> tuple[PortBus, Recorder, Recorder]:
    b = PortBus()
    a, c = Recorder(), Recorder()
    b.register(0x3F8, 0x3FF, a, "com1")
    b.register(0x400, 0x400, c, "one")
    return b, a, c


def test_dispatch_with_absolute_port_and_masking(bus: tuple[PortBus, Recorder, Recorder]) -> None:
    b, a, c = bus
    assert b.read(0x3FA, 1) == 0xBC
    assert b.read(0x3FC, 4) == 0x5678_9ABC
    b.write(0x3FE, 2, 0xDEAD_BEEF)
    b.write(0x400, 1, 0x1FF)
    assert a.log == [("r", 0x3FA, 1, 0), ("r", 0x3FC, 4, 0), ("w", 0x3FE, 2, 0xBEEF)]
    assert c.log == [("w", 0x400, 1, 0xFF)]


@pytest.mark.parametrize(("port", "size"), [
    (0x3FF, 2), (0x3FE, 4), (0x3F7, 2), (0x3F7, 4),  # straddles a range edge
    (0x3F0, 1), (0x401, 1), (0x0, 4),  # unclaimed
    (0xFFFF, 2), (0xFFFE, 4), (-1, 1), (0x10000, 1),  # off the end of port space
])
def test_unclaimed_or_overrun_reads_all_ones(bus: tuple[PortBus, Recorder, Recorder],
                                             port: int, size: int) -> None:
    b, a, c = bus
    assert b.read(port, size) == (1 << (8 * size)) - 1
    b.write(port, size, 0)
    assert a.log == c.log == []


@pytest.mark.parametrize("size", [0, 3, 5, 8, -4])
def test_bad_sizes(bus: tuple[PortBus, Recorder, Recorder], size: int) -> None:
    b, a, _ = bus
    assert b.read(0x3F8, size) == 0xFFFFFFFF
    b.write(0x3F8, size, 1)
    assert a.log == []


def test_adjacent_ranges_are_separate(bus: tuple[PortBus, Recorder, Recorder]) -> None:
    b, a, c = bus
    assert b.read(0x3FF, 1) == 0xBC
    assert b.read(0x3FF, 2) == 0xFFFF  # would span com1 and "one"
    assert b.read(0x400, 1) == 0xBC
    assert [e[1] for e in a.log] == [0x3FF]
    assert [e[1] for e in c.log] == [0x400]


@pytest.mark.parametrize(("first", "last"), [
    (0x3F8, 0x3F8), (0x3FF, 0x401), (0x3F0, 0x3F8), (0x3F0, 0x500), (0x3FA, 0x3FB),
    (0x400, 0x400),
])
def test_overlap_rejected(bus: tuple[PortBus, Recorder, Recorder], first: int,
                          last: int) -> None:
    b, _, _ = bus
    with pytest.raises(ConfigError, match=r"overlaps .* owned by (com1|one)"):
        b.register(first, last, Recorder(), "intruder")
    assert len(b.ranges()) == 2


@pytest.mark.parametrize(("first", "last", "msg"), [
    (0x10, 0x0F, "empty"), (-1, 3, "outside"), (0xFFFF, 0x10000, "outside"),
])
def test_bad_ranges_rejected(first: int, last: int, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        PortBus().register(first, last, Recorder())


def test_ranges_sorted_and_edges_of_port_space() -> None:
    b = PortBus()
    b.register(0xFFFF, 0xFFFF, Recorder(), "top")
    b.register(0x0, 0x0, Recorder(), "bottom")
    b.register(0x80, 0x8F, Recorder(), "mid")
    assert [r.name for r in b.ranges()] == ["bottom", "mid", "top"]
    assert b.read(0xFFFF, 1) == 0xBC
    assert b.read(0x0, 1) == 0xBC


def test_i8042_on_two_ranges() -> None:
    irqs: list[tuple[int, int]] = []
    kbc = I8042(lambda line, level: irqs.append((line, level)))
    b = PortBus()
    b.register(0x60, 0x60, kbc, "i8042 data")
    b.register(0x64, 0x64, kbc, "i8042 cmd")
    b.write(0x64, 1, 0xAA)
    assert b.read(0x64, 1) & 0x01
    assert b.read(0x60, 1) == 0x55
    assert b.read(0x61, 1) == 0xFF  # port B belongs to someone else
    assert b.read(0x60, 2) == 0xFFFF


def test_all_ones() -> None:
    assert [all_ones(s) for s in (1, 2, 4, 3, 0)] == [0xFF, 0xFFFF, 0xFFFFFFFF] + [
        0xFFFFFFFF] * 2
