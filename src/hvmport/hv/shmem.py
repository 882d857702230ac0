"""Hypervisor-owned pages backed by memfds, so they can be handed to a device model.

This is the ``PageProvider`` the real hypervisor uses. Ioreq-server pages are resource
frames (``XENMEM_acquire_resource``): never in the guest physmap. The legacy gfn path of
the core is not offered here: KVM and Unicorn map guest RAM as large slots, and punching
single special pages out of them while a server is enabled is not worth its complexity when
every current device model maps resource frames; ``get_ioreq_server_info`` with gfns
therefore answers -ENOMEM, as Xen does when it has no gfn to give.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from hvmport.core.pages import PAGE_SIZE


class MemfdPages:
    def __init__(self) -> None:
        #: id(view) -> (view, mapping, memfd). The memfd is what device models receive.
        self._frames: dict[int, tuple[memoryview, mmap.mmap, int]] = {}

    def guest_frame(self, gfn: int) -> memoryview | None:
        return None

    def alloc_frame(self) -> memoryview:
        fd = os.memfd_create("hvmport-ioreq-page", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, PAGE_SIZE)
            mapping = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        view = memoryview(mapping)
        self._frames[id(view)] = (view, mapping, fd)
        return view

    def fd_of(self, frame: memoryview) -> int:
        return self._frames[id(frame)][2]

    def free_frame(self, frame: memoryview) -> None:
        entry = self._frames.pop(id(frame), None)
        if entry is not None:
            self._release(*entry)

    def physmap_remove(self, gfn: int) -> bool:
        return False

    def physmap_add(self, gfn: int) -> None:
        pass

    def close(self) -> None:
        for entry in self._frames.values():
            self._release(*entry)
        self._frames.clear()

    @staticmethod
    def _release(view: memoryview, mapping: mmap.mmap, fd: int) -> None:
        os.close(fd)
        view.release()
        # A slice of the view still alive elsewhere keeps the mapping exported; then the
        # mapping (and its descriptor) go when that slice does.
        with contextlib.suppress(BufferError):
            mapping.close()
