"""Inclusive integer range sets with a limit on disjoint ranges, as Xen's rangesets."""

from __future__ import annotations

import bisect
import errno


class RangeSet:
    """Disjoint, sorted, inclusive ranges; adjacent and overlapping inserts merge.

    ``add``/``remove`` return 0 or a negative errno and leave the set unchanged on error.
    ``special_only`` restricts the set to the single range [1, 1] (review point R16: the
    VMWARE_PORT and TIMEOFFSET sets hold that one "special" range and nothing else).
    """

    __slots__ = ("_ends", "_starts", "limit", "special_only")

    def __init__(self, limit: int, *, special_only: bool = False) -> None:
        self.limit = limit
        self.special_only = special_only
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def contains(self, start: int, end: int) -> bool:
        """True when [start, end] lies wholly inside one range."""
        if start > end:
            return False
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def contains_point(self, value: int) -> bool:
        return self.contains(value, value)

    def overlaps(self, start: int, end: int) -> bool:
        if start > end:
            return False
        i = bisect.bisect_right(self._starts, end) - 1
        return i >= 0 and self._ends[i] >= start

    def add(self, start: int, end: int) -> int:
        if start > end or start < 0:
            return -errno.EINVAL
        if self.special_only and (start, end) != (1, 1):
            return -errno.EINVAL
        # Merge with every range that overlaps or touches [start, end].
        lo = bisect.bisect_left(self._ends, start - 1)
        hi = bisect.bisect_right(self._starts, end + 1)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        elif len(self._starts) >= self.limit:
            return -errno.ENOSPC
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        return 0

    def remove(self, start: int, end: int) -> int:
        """Remove [start, end], which must lie wholly inside one range (else -ENOENT)."""
        if start > end:
            return -errno.EINVAL
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._ends[i] < end:
            return -errno.ENOENT
        s, e = self._starts[i], self._ends[i]
        pieces = [(a, b) for a, b in ((s, start - 1), (end + 1, e)) if a <= b]
        if len(self._starts) - 1 + len(pieces) > self.limit:
            return -errno.ENOSPC
        self._starts[i:i + 1] = [a for a, _ in pieces]
        self._ends[i:i + 1] = [b for _, b in pieces]
        return 0
