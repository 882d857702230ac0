"""hv/rtc.py: the CMOS clock on a controlled wall clock, read and set the way Linux does."""

from __future__ import annotations

import calendar

from hvmport.hv.rtc import Rtc

# 2026-12-07 16:45:31 UTC, a Monday.
T0 = calendar.timegm((2026, 12, 7, 16, 45, 31)) * 1_000_000_000


class Wall:
    def __init__(self) -> None:
        self.ns = T0 + 100_000_000

    def __call__(self) -> int:
        return self.ns


def reg(rtc: Rtc, index: int) -> int:
    rtc.port_write(0x70, index)
    return rtc.port_read(0x71)


def put(rtc: Rtc, index: int, value: int) -> None:
    rtc.port_write(0x70, index)
    rtc.port_write(0x71, value)


def test_reads_the_host_time_in_bcd_24h() -> None:
    rtc = Rtc(Wall())
    assert [reg(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x31, 0x45, 0x16, 0x02, 0x07, 0x12, 0x26, 0x20]
    assert reg(rtc, 0x0B) & 0x06 == 0x02  # BCD, 24-hour
    assert reg(rtc, 0x0D) == 0x80  # battery good


def test_binary_and_12_hour_modes() -> None:
    rtc = Rtc(Wall())
    put(rtc, 0x0B, 0x04)  # binary, 12-hour
    assert reg(rtc, 0) == 31
    assert reg(rtc, 4) == 0x80 | 4  # 4 PM
    assert reg(rtc, 9) == 26


def test_update_in_progress_window() -> None:
    wall = Wall()
    rtc = Rtc(wall)
    assert not reg(rtc, 0x0A) & 0x80
    wall.ns = T0 + 999_900_000
    assert reg(rtc, 0x0A) & 0x80
    assert reg(rtc, 0x0A) & 0x7F == 0x26


def test_setting_the_time_with_set_held_in_any_field_order() -> None:
    wall = Wall()
    rtc = Rtc(wall)
    put(rtc, 0x0B, 0x82)  # SET: the clock stands still
    wall.ns += 5_000_000_000
    assert reg(rtc, 0) == 0x31
    # 2025-02-15 08:00:00, writing the day before the month (Dec 15 -> Feb 15).
    for index, value in ((0, 0x00), (2, 0x00), (4, 0x08), (7, 0x15), (8, 0x02), (9, 0x25)):
        put(rtc, index, value)
    put(rtc, 0x0B, 0x02)
    assert [reg(rtc, r) for r in (0, 2, 4, 7, 8, 9)] == [0x00, 0x00, 0x08, 0x15, 0x02, 0x25]
    wall.ns += 61_000_000_000
    assert [reg(rtc, r) for r in (0, 2)] == [0x01, 0x01]  # and it runs on from there


def test_a_single_field_write_moves_the_clock() -> None:
    rtc = Rtc(Wall())
    put(rtc, 2, 0x50)
    assert reg(rtc, 2) == 0x50
    assert reg(rtc, 4) == 0x16


def test_cmos_memory_and_read_only_registers() -> None:
    rtc = Rtc(Wall())
    put(rtc, 0x40, 0xAB)
    assert reg(rtc, 0x40) == 0xAB
    put(rtc, 0x0C, 0xFF)
    put(rtc, 0x0D, 0x00)
    assert reg(rtc, 0x0C) == 0
    assert reg(rtc, 0x0D) == 0x80
    rtc.port_write(0x70, 0x80 | 0x40)  # bit 7 (NMI mask) is not part of the index
    assert rtc.port_read(0x71) == 0xAB
    assert rtc.port_read(0x70) == 0xFF
