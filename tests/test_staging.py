"""The hypervisor's string-I/O staging windows: after guest RAM, one per vCPU."""

from __future__ import annotations

import pytest

from hvmport.hv.emulate import STAGING_BYTES, Staging
from hvmport.hv.memory import MIB, GuestMemory


def test_one_window_per_vcpu_after_ram() -> None:
    with GuestMemory(2, staging=2 * STAGING_BYTES) as mem:
        assert (mem.size, mem.mapped_size) == (2 * MIB, 2 * MIB + 2 * STAGING_BYTES)
        staging = Staging(mem)
        assert staging.gpa(0) == 2 * MIB
        assert staging.gpa(1) == 2 * MIB + STAGING_BYTES
        with pytest.raises(ValueError, match="no staging window for vCPU 2"):
            staging.gpa(2)
        mem.write(staging.gpa(1) + STAGING_BYTES - 4, b"abcd")  # the last bytes exist
        with pytest.raises(ValueError):
            mem.write(mem.mapped_size - 2, b"abcd")


def test_without_staging_memory_is_ram_only() -> None:
    with GuestMemory(2) as mem:
        assert mem.mapped_size == mem.size == 2 * MIB
        assert Staging(mem).windows == 0
