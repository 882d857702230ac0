"""Domain memory: one memfd, mapped shared, so a device model can map the same pages later."""

from __future__ import annotations

import ctypes
import mmap
import os

from hvmport.errors import ConfigError, HostError

MIB = 1 << 20
PAGE = 4096
#: Guest RAM lives below the 32-bit PCI/MMIO hole, which starts at 3 GiB on a PC.
MAX_MEMORY_MIB = 3072
#: Enough for the real-mode area, page tables and a small kernel.
MIN_MEMORY_MIB = 2


def check_memory_mib(mib: int) -> None:
    """Refuse sizes no backend here can provide, before anything is allocated."""
    if not isinstance(mib, int) or isinstance(mib, bool):
        raise ConfigError(f"memory must be a whole number of MiB, not {mib!r}")
    if mib < MIN_MEMORY_MIB:
        raise ConfigError(f"memory={mib} MiB is too small: at least {MIN_MEMORY_MIB} MiB")
    if mib > MAX_MEMORY_MIB:
        raise ConfigError(
            f"memory={mib} MiB is too large: guest RAM must fit below the 3 GiB MMIO hole "
            f"(at most {MAX_MEMORY_MIB} MiB)"
        )


class GuestMemory:
    """Guest-physical RAM from address 0, backed by a memfd."""

    def __init__(self, size_mib: int, name: str = "hvmport-guest", *,
                 staging: int = 0) -> None:
        check_memory_mib(size_mib)
        self.size = size_mib * MIB
        #: Bytes after RAM in the same memfd, outside every backend's view of the guest:
        #: where the hypervisor stages string I/O for ``data_is_ptr`` requests, at
        #: guest-physical ``self.size`` for a device model that maps ``mapped_size``.
        self.staging = staging
        self.mapped_size = self.size + staging
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as e:  # pragma: no cover - memfd exists on every supported kernel
            raise HostError(f"memfd_create failed: {e.strerror}") from e
        try:
            os.ftruncate(self.fd, self.mapped_size)
            self.map = mmap.mmap(self.fd, self.mapped_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise HostError(f"cannot provide {size_mib} MiB of guest memory: {e.strerror}") from e
        self._anchor = ctypes.c_char.from_buffer(self.map)
        #: Host virtual address of guest-physical 0, for KVM_SET_USER_MEMORY_REGION and
        #: Unicorn's mem_map_ptr.
        self.host_address: int = ctypes.addressof(self._anchor)

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.mapped_size:
            raise ValueError(f"guest range {gpa:#x}+{length:#x} outside {self.size:#x} bytes")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return self.map[gpa:gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.map[gpa:gpa + len(data)] = data

    def close(self) -> None:
        if self.fd < 0:
            return
        del self._anchor
        self.map.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
