from __future__ import annotations

import errno

from hvmport.core.rangeset import RangeSet


def test_adjacent_and_overlapping_ranges_merge() -> None:
    rs = RangeSet(256)
    assert rs.add(10, 19) == 0
    assert rs.add(20, 29) == 0  # adjacent
    assert rs.add(5, 12) == 0  # overlapping
    assert rs.ranges() == [(5, 29)]
    assert rs.add(40, 50) == 0
    assert rs.add(30, 39) == 0  # bridges the gap
    assert rs.ranges() == [(5, 50)]


def test_contains_means_wholly_inside_one_range() -> None:
    rs = RangeSet(256)
    rs.add(0x60, 0x60)
    rs.add(0x64, 0x64)
    assert rs.contains(0x60, 0x60)
    assert not rs.contains(0x60, 0x61)
    assert not rs.contains(0x60, 0x64)  # spans a gap
    assert rs.overlaps(0x5F, 0x60)
    assert not rs.overlaps(0x61, 0x63)
    assert not rs.contains(5, 4)


def test_limit_counts_disjoint_ranges() -> None:
    rs = RangeSet(256)
    for i in range(256):
        assert rs.add(i * 4, i * 4) == 0
    assert rs.add(2000, 2000) == -errno.ENOSPC
    assert len(rs) == 256
    # Growing an existing range is still fine at the limit.
    assert rs.add(1, 1) == 0
    assert len(rs) == 256


def test_remove_must_be_contained_and_splits() -> None:
    rs = RangeSet(256)
    rs.add(0, 100)
    assert rs.remove(50, 150) == -errno.ENOENT
    assert rs.remove(40, 60) == 0
    assert rs.ranges() == [(0, 39), (61, 100)]
    assert rs.remove(0, 39) == 0
    assert rs.ranges() == [(61, 100)]
    assert rs.remove(7, 7) == -errno.ENOENT


def test_remove_that_would_exceed_the_limit_is_refused() -> None:
    rs = RangeSet(2)
    rs.add(0, 10)
    rs.add(20, 30)
    assert rs.remove(5, 5) == -errno.ENOSPC
    assert rs.ranges() == [(0, 10), (20, 30)]


def test_special_set_holds_only_one_one() -> None:
    # Review point R16: the VMWARE_PORT/TIMEOFFSET sets hold [1,1] and nothing more.
    rs = RangeSet(1, special_only=True)
    assert rs.add(0, 1) == -errno.EINVAL
    assert rs.add(2, 2) == -errno.EINVAL
    assert rs.add(1, 1) == 0
    assert rs.contains_point(1)
    assert rs.remove(1, 1) == 0
    assert not rs.contains_point(1)
