"""Time, injected: the core never reads a clock itself."""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def wallclock_us(self) -> int:
        """Microseconds since the Unix epoch, UTC."""
        ...

    def monotonic_ns(self) -> int: ...


class FixedClock:
    """A clock that moves only when told to; for tests and for deterministic replays."""

    def __init__(self, wallclock_us: int = 1_700_000_000_000_000, monotonic_ns: int = 0) -> None:
        self.wall = wallclock_us
        self.mono = monotonic_ns

    def wallclock_us(self) -> int:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def advance_us(self, us: int) -> None:
        self.wall += us
        self.mono += us * 1000
