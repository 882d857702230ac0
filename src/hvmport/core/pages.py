"""Where ioreq-server pages come from, injected into the core.

In Xen the legacy path maps special guest frames (removed from the guest physmap while the
server is enabled) and the resource path allocates Xen-owned frames that the guest never
sees. The core only decides; a ``PageProvider`` supplies the memory and changes the
guest's view. ``MemoryPages`` is the pure in-memory provider used by tests and by anything
that needs no sharing across processes.
"""

from __future__ import annotations

from typing import Protocol

PAGE_SIZE = 4096


class PageProvider(Protocol):
    def guest_frame(self, gfn: int) -> memoryview | None:
        """The page of guest-physical memory at ``gfn``, or None if nothing backs it."""
        ...

    def alloc_frame(self) -> memoryview:
        """A zeroed page owned by the hypervisor, never in the guest physmap."""
        ...

    def free_frame(self, frame: memoryview) -> None: ...

    def physmap_remove(self, gfn: int) -> bool:
        """Hide ``gfn`` from the guest; False if that is impossible."""
        ...

    def physmap_add(self, gfn: int) -> None: ...


class MemoryPages:
    """Guest frames and hypervisor frames as bytearrays, with a visible-physmap model."""

    def __init__(self, populated: set[int] | None = None) -> None:
        #: gfns that have backing memory (RAM and special pages).
        self.populated: set[int] = set(populated or ())
        self.frames: dict[int, bytearray] = {}
        self.hidden: set[int] = set()
        self.owned: list[memoryview] = []

    def guest_frame(self, gfn: int) -> memoryview | None:
        if gfn not in self.populated:
            return None
        return memoryview(self.frames.setdefault(gfn, bytearray(PAGE_SIZE)))

    def guest_visible(self, gfn: int) -> bool:
        """What a guest scanning its physical memory can see."""
        return gfn in self.populated and gfn not in self.hidden

    def alloc_frame(self) -> memoryview:
        view = memoryview(bytearray(PAGE_SIZE))
        self.owned.append(view)
        return view

    def free_frame(self, frame: memoryview) -> None:
        self.owned = [f for f in self.owned if f is not frame]

    def physmap_remove(self, gfn: int) -> bool:
        if gfn not in self.populated or gfn in self.hidden:
            return False
        self.hidden.add(gfn)
        return True

    def physmap_add(self, gfn: int) -> None:
        self.hidden.discard(gfn)
