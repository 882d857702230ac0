"""The CMOS real-time clock (Motorola MC146818 as on a PC): index port 0x70, data 0x71.

Facts from the MC146818 data sheet and the PC's CMOS map. The time registers (0x00-0x09,
century at 0x32) show the host's wall clock plus whatever offset the guest set by writing
them, in BCD or binary and 12- or 24-hour form as register B says. Register A's
update-in-progress bit is set for the last 244 us of each second, as on the chip, so a
guest's "wait while UIP" loop works and never spins for long. Register D says the battery
is good. The other 114 bytes are plain CMOS memory. Periodic, alarm and update interrupts
(IRQ 8) are not generated: register C always reads 0 (Linux's boot never enables them;
an rtc_cmos user who does will see no interrupts).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

PORT_INDEX = 0x70
PORT_DATA = 0x71
PORTS = (PORT_INDEX, PORT_DATA)

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
WEEKDAY, DAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
ALARM_REGS = (0x01, 0x03, 0x05)
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32

A_UIP = 0x80
B_SET = 0x80
B_DM_BINARY = 0x04
B_24H = 0x02
D_VRT = 0x80
#: The UIP window before each update (data sheet: 244 us with a 32.768 kHz base).
UIP_NS = 244_000

_TIME_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


class Rtc:
    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.wall_ns = wall_ns
        self.index = 0
        self.cmos = bytearray(128)
        self.cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VRT
        #: Seconds the guest's clock is ahead of the host's (set by writing the time).
        self.offset_s = 0
        #: While register B's SET bit is on the clock stands still: the time registers as
        #: the guest last wrote them, applied together when SET is cleared (so the order
        #: in which a guest writes day and month never matters).
        self._held: dict[int, int] | None = None

    def _now_s(self) -> int:
        return self.wall_ns() // 1_000_000_000 + self.offset_s

    def port_read(self, port: int) -> int:
        if port == PORT_INDEX:
            return 0xFF  # write-only on a PC
        return self.read_register(self.index)

    def port_write(self, port: int, value: int) -> None:
        value &= 0xFF
        if port == PORT_INDEX:
            self.index = value & 0x7F  # bit 7 masks NMI, which nothing here raises
        else:
            self.write_register(self.index, value)

    def read_register(self, reg: int) -> int:
        if reg in _TIME_REGS:
            if self._held is not None:
                return self._held[reg]
            return self._time_fields(self._now_s())[reg]
        if reg == REG_A:
            in_update = self._held is None and \
                self.wall_ns() % 1_000_000_000 >= 1_000_000_000 - UIP_NS
            return (self.cmos[REG_A] & 0x7F) | (A_UIP if in_update else 0)
        if reg == REG_C:
            return 0
        return self.cmos[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg in _TIME_REGS:
            if self._held is not None:
                self._held[reg] = value
            else:
                fields = self._time_fields(self._now_s())
                fields[reg] = value
                self._set_time(fields)
        elif reg == REG_B:
            if value & B_SET and self._held is None:
                self._held = self._time_fields(self._now_s())
            self.cmos[REG_B] = value
            if not value & B_SET and self._held is not None:
                held, self._held = self._held, None
                self._set_time(held)
        elif reg in (REG_C, REG_D):
            pass  # read-only
        elif reg == REG_A:
            self.cmos[REG_A] = value & 0x7F  # UIP is read-only
        else:
            self.cmos[reg] = value

    # -- time encoding ------------------------------------------------------------------

    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_DM_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_DM_BINARY else _from_bcd(value)

    def _time_fields(self, seconds: int) -> dict[int, int]:
        t = time.gmtime(seconds)
        hour = t.tm_hour
        if self.cmos[REG_B] & B_24H:
            hours = self._encode(hour)
        else:
            pm = hour >= 12
            hours = self._encode(hour % 12 or 12) | (0x80 if pm else 0)
        return {
            SECONDS: self._encode(t.tm_sec), MINUTES: self._encode(t.tm_min), HOURS: hours,
            WEEKDAY: self._encode((t.tm_wday + 1) % 7 + 1),  # 1 = Sunday
            DAY: self._encode(t.tm_mday), MONTH: self._encode(t.tm_mon),
            YEAR: self._encode(t.tm_year % 100), CENTURY: self._encode(t.tm_year // 100),
        }

    def _set_time(self, fields: dict[int, int]) -> None:
        hours = fields[HOURS]
        if self.cmos[REG_B] & B_24H:
            hour = self._decode(hours)
        else:
            hour = self._decode(hours & 0x7F) % 12 + (12 if hours & 0x80 else 0)
        try:
            seconds = calendar.timegm((
                self._decode(fields[CENTURY]) * 100 + self._decode(fields[YEAR]),
                self._decode(fields[MONTH]), self._decode(fields[DAY]), hour,
                self._decode(fields[MINUTES]), self._decode(fields[SECONDS])))
        except (ValueError, OverflowError):
            return  # not a date: keep the time
        self.offset_s = seconds - self.wall_ns() // 1_000_000_000
