"""The buffered ioreq ring (``buffered_iopage``): 511 slots of fire-and-forget writes.

The hypervisor produces and owns ``write_pointer``; the device model consumes and owns
``read_pointer``. The hypervisor keeps its own copy of the write pointer, so a device model
that scribbles on either pointer is caught and crashes its domain.

With BUFIOREQ_ATOMIC the hypervisor canonicalises both pointers after each post with a
64-bit compare-and-swap (the device model may be advancing ``read_pointer`` at that very
moment); the CAS is injected, so the adapter can provide a real atomic one over shared
memory while tests use the plain one.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from hvmport.abi.dm_op import HVM_IOREQSRV_BUFIOREQ_ATOMIC
from hvmport.abi.ioreq import (
    BUF_IOREQ_SIZE,
    BUF_SIZE_CODES,
    BUF_SIZE_FROM_CODE,
    IOREQ_BUFFER_SLOT_NUM,
    IOREQ_READ,
    BufIoReq,
)
from hvmport.core.slots import Page

SLOTS = IOREQ_BUFFER_SLOT_NUM
# The pointers are shared with another process while it runs, so every access must be one
# load or one store of the aligned word. CPython's struct unpacks explicit-endian formats
# ("<I") byte by byte, and struct.pack_into zero-fills the field before writing the value
# (the other side saw a write_pointer of 0 for an instant); so loads use native formats
# (one copy of the word; the ABI is x86-64, little-endian) and the one store the
# producer makes goes through a memoryview cast, which writes the word once.
_PTRS = struct.Struct("II")
_U64 = struct.Struct("Q")
_U32 = struct.Struct("I")


def store32(page: Page, offset: int, value: int) -> None:
    """Store a u32 with a single write (no zero-fill first, unlike struct.pack_into)."""
    memoryview(page).cast("B")[offset:offset + 4].cast("I")[0] = value & 0xFFFFFFFF
SLOT_BASE = 8
MAX_BUFFERED_ADDR = 0xFFFFF

#: cas64(page, offset, expected, new) -> True if the 8 bytes at offset were expected and
#: are now new.
Cas64 = Callable[[Page, int, int, int], bool]


def plain_cas64(page: Page, offset: int, expected: int, new: int) -> bool:
    """Compare-and-swap for a page no other party writes concurrently."""
    if _U64.unpack_from(page, offset)[0] != expected:
        return False
    _U64.pack_into(page, offset, new)
    return True


class Send(enum.Enum):
    QUEUED = "queued"
    FULL = "full"  # use the synchronous path
    UNBUFFERABLE = "unbufferable"  # use the synchronous path
    CORRUPT = "corrupt"  # the device model broke the pointers: crash the domain


@dataclass(slots=True)
class SendResult:
    status: Send
    reason: str = ""


def bufferable(addr: int, size: int, is_write: bool, count: int = 1,
               data_is_ptr: bool = False) -> bool:
    """Only single writes of 1/2/4/8 bytes at 20-bit addresses fit a buf_ioreq."""
    return (is_write and not data_is_ptr and count == 1 and size in BUF_SIZE_CODES
            and 0 <= addr <= MAX_BUFFERED_ADDR)


class Producer:
    """The hypervisor's end of one server's ring."""

    __slots__ = ("cas", "mode", "page", "wp")

    def __init__(self, page: Page, mode: int, cas: Cas64 = plain_cas64) -> None:
        self.page = page
        self.mode = mode
        self.cas = cas
        self.wp = _PTRS.unpack_from(page, 0)[1]

    def send(self, ioreq_type: int, addr: int, size: int, data: int,
             is_write: bool = True, count: int = 1, data_is_ptr: bool = False) -> SendResult:
        if not bufferable(addr, size, is_write, count, data_is_ptr):
            return SendResult(Send.UNBUFFERABLE)
        rp, wp = _PTRS.unpack_from(self.page, 0)
        if wp != self.wp:
            return SendResult(Send.CORRUPT, f"device model changed the buffered write_pointer "
                                            f"({self.wp} -> {wp})")
        used = (wp - rp) & 0xFFFFFFFF
        if used > SLOTS:
            return SendResult(Send.CORRUPT, f"device model moved the buffered read_pointer "
                                            f"out of range (read {rp}, write {wp})")
        qw = 1 if size == 8 else 0
        if used >= SLOTS - qw:
            return SendResult(Send.FULL)
        code = BUF_SIZE_CODES[size]
        first = BufIoReq(ioreq_type, 0, code, addr, data & 0xFFFFFFFF)
        self._put(wp, first)
        if qw:
            self._put(wp + 1, BufIoReq(ioreq_type, 0, code, addr, (data >> 32) & 0xFFFFFFFF))
        # Slots are written before the pointer that publishes them.
        self.wp = (wp + 1 + qw) & 0xFFFFFFFF
        store32(self.page, 4, self.wp)
        if self.mode == HVM_IOREQSRV_BUFIOREQ_ATOMIC:
            self._canonicalise()
        return SendResult(Send.QUEUED)

    def _put(self, pointer: int, slot: BufIoReq) -> None:
        off = SLOT_BASE + (pointer % SLOTS) * BUF_IOREQ_SIZE
        self.page[off:off + BUF_IOREQ_SIZE] = slot.pack()

    def _canonicalise(self) -> None:
        # Keep both pointers small so the 32-bit counters never wrap (511 does not divide
        # 2**32). Retry while the device model moves read_pointer under us.
        while True:
            raw = _U64.unpack_from(self.page, 0)[0]
            rp, wp = raw & 0xFFFFFFFF, raw >> 32
            if rp < SLOTS or wp < rp:
                return
            n = (rp // SLOTS) * SLOTS
            new = (rp - n) | ((wp - n) << 32)
            if self.cas(self.page, 0, raw, new):
                self.wp = wp - n
                return


@dataclass(slots=True, frozen=True)
class BufferedWrite:
    type: int
    addr: int
    size: int
    data: int


#: add32(page, offset, delta): atomically add delta to the u32 at offset.
Add32 = Callable[[Page, int, int], None]


def plain_add32(page: Page, offset: int, delta: int) -> None:
    _U32.pack_into(page, offset, (_U32.unpack_from(page, offset)[0] + delta) & 0xFFFFFFFF)


class Consumer:
    """The device model's end: drains whatever the hypervisor published."""

    __slots__ = ("add32", "page")

    def __init__(self, page: Page, add32: Add32 = plain_add32) -> None:
        self.page = page
        self.add32 = add32

    def drain(self) -> list[BufferedWrite]:
        """Handle every published slot and advance read_pointer.

        Raises ValueError if the pointers make no sense (a broken hypervisor from the
        device model's point of view); the caller logs and stops serving the ring.
        """
        out: list[BufferedWrite] = []
        # read_pointer moves once per drain, by everything consumed: one atomic add instead
        # of one per slot (the costly part on the device model's side). Until then the
        # hypervisor sees the ring fuller than it is, which only makes it more careful.
        taken = 0
        try:
            while True:
                # One 64-bit load sees both pointers as the hypervisor left them: it may
                # canonicalise the pair (subtract 511s from both) at any moment, which moves
                # neither our position modulo 511 nor the distance to write_pointer.
                pair = _U64.unpack_from(self.page, 0)[0]
                rp, wp = ((pair & 0xFFFFFFFF) + taken) & 0xFFFFFFFF, pair >> 32
                if rp == wp:
                    return out
                if ((wp - rp) & 0xFFFFFFFF) > SLOTS:
                    raise ValueError(f"buffered ring pointers out of range "
                                     f"(read {rp}, write {wp})")
                slot = BufIoReq.unpack(self.page, SLOT_BASE + (rp % SLOTS) * BUF_IOREQ_SIZE)
                size = BUF_SIZE_FROM_CODE[slot.size_code]
                data = slot.data
                step = 1
                if size == 8:
                    if ((wp - rp) & 0xFFFFFFFF) < 2:
                        raise ValueError("8-byte buffered write published with only one slot")
                    hi = BufIoReq.unpack(self.page,
                                         SLOT_BASE + ((rp + 1) % SLOTS) * BUF_IOREQ_SIZE)
                    data |= hi.data << 32
                    step = 2
                if slot.dir == IOREQ_READ:
                    raise ValueError("a buffered request claims to be a read")
                out.append(BufferedWrite(slot.type, slot.addr, size, data))
                taken += step
        finally:
            if taken:
                # An atomic add composes with the hypervisor's compare-and-swap that
                # subtracts whole multiples of SLOTS (a plain store could undo it).
                self.add32(self.page, 0, taken)
