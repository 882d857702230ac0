"""The per-vCPU ioreq slot protocol, both sides, over a shared page held as a buffer.

Every step reads the state byte once, and a slot is copied once before it is looked at
(no double fetch: XSA-166/197/262). The state only moves forward:
NONE -> READY (hypervisor) -> INPROCESS (device model) -> IORESP_READY (device model) ->
NONE (hypervisor).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from hvmport.abi.ioreq import (
    IOREQ_SIZE,
    IOREQ_STATE_BYTE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    IoReq,
)

Page = memoryview | bytearray


def slot_offset(vcpu: int) -> int:
    return vcpu * IOREQ_SIZE


def read_state(page: Page, vcpu: int) -> int:
    return page[vcpu * IOREQ_SIZE + IOREQ_STATE_BYTE] & 0xF


def _write_state(page: Page, vcpu: int, state: int) -> None:
    off = vcpu * IOREQ_SIZE + IOREQ_STATE_BYTE
    page[off] = (page[off] & 0xF0) | state


def size_mask(size: int) -> int:
    return (1 << (8 * size)) - 1 if 0 < size < 8 else 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- hypervisor side


def post(page: Page, vcpu: int, req: IoReq, vp_eport: int) -> str | None:
    """Write ``req`` into the vCPU's slot and mark it READY.

    Returns None, or the reason the domain must crash (the device model left the slot busy
    or rewrote ``vp_eport``), as Xen's ``hvm_send_ioreq`` refuses such a slot.
    """
    off = vcpu * IOREQ_SIZE
    # One copy of what the device model could have touched: vp_eport .. the state byte.
    head = bytes(page[off + 24:off + 31])
    state = head[6] & 0xF
    if state != STATE_IOREQ_NONE:
        return f"device model set bad IO state {state} in vCPU {vcpu}'s slot"
    current_port = int.from_bytes(head[:4], "little")
    if current_port != vp_eport:
        return (f"device model changed vp_eport of vCPU {vcpu}'s slot "
                f"({current_port} != {vp_eport})")
    req.state = STATE_IOREQ_NONE
    req.vp_eport = vp_eport
    page[off:off + IOREQ_SIZE] = req.pack()
    # The request is complete in the page before the state says READY.
    _write_state(page, vcpu, STATE_IOREQ_READY)
    return None


class Poll(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    DIED = "died"  # the emulator went back to NONE: Xen reads all ones
    CRASH = "crash"


@dataclass(slots=True)
class PollResult:
    status: Poll
    data: int = 0
    reason: str = ""
    #: The private copy of the answered slot (ioreq-union answers only), whose addr,
    #: count and size carry registers back.
    raw: bytes = b""


#: Fields a device model must hand back unchanged.
FROZEN: tuple[str, ...] = ("addr", "size", "count", "type", "vp_eport", "dir", "df", "data_is_ptr")
#: An ioreq-union request carries registers in addr/data/count/size both ways; the rest,
#: including the port and access size in ``_pad0``, must come back unchanged.
FROZEN_UNION: tuple[str, ...] = ("type", "vp_eport", "dir", "df", "data_is_ptr", "pad0")


#: Where each field of ``ioreq_t`` lives, as a mask over the slot read as one integer.
_FIELD_MASKS = {
    "addr": (1 << 64) - 1,
    "data": ((1 << 64) - 1) << 64,
    "count": 0xFFFFFFFF << 128,
    "size": 0xFFFFFFFF << 160,
    "vp_eport": 0xFFFFFFFF << 192,
    "pad0": 0xFFFF << 224,
    "data_is_ptr": 0x10 << 240,
    "dir": 0x20 << 240,
    "df": 0x40 << 240,
    "type": 0xFF << 248,
}


def _frozen_mask(frozen: tuple[str, ...]) -> int:
    mask = 0
    for name in frozen:
        mask |= _FIELD_MASKS[name]
    return mask


_MASKS: dict[tuple[str, ...], int] = {}


class Waiter:
    """The hypervisor's wait for one request: remembers the last state seen.

    The answered slot is copied once and its frozen fields compared with what was sent as
    one masked integer comparison (the per-field walk only runs to name a difference).
    """

    __slots__ = ("frozen", "mask", "prev_state", "sent", "vcpu", "want")

    def __init__(self, vcpu: int, sent: IoReq, frozen: tuple[str, ...] = FROZEN) -> None:
        self.vcpu = vcpu
        self.sent = sent
        self.frozen = frozen
        self.prev_state = STATE_IOREQ_READY
        mask = _MASKS.get(frozen)
        if mask is None:
            mask = _MASKS[frozen] = _frozen_mask(frozen)
        self.mask = mask
        self.want = int.from_bytes(sent.pack(), "little") & mask

    def poll(self, page: Page) -> PollResult:
        state = read_state(page, self.vcpu)
        if state == STATE_IOREQ_NONE:
            return PollResult(Poll.DIED, size_mask(self.sent.size),
                              "device model returned the slot to NONE mid-request")
        if state > STATE_IORESP_READY:
            return PollResult(Poll.CRASH, reason=f"device model wrote unknown ioreq state {state}")
        if state < self.prev_state:
            return PollResult(Poll.CRASH, reason=(
                f"device model moved ioreq state backwards ({self.prev_state} -> {state})"))
        if state != STATE_IORESP_READY:
            self.prev_state = state
            return PollResult(Poll.PENDING)
        off = self.vcpu * IOREQ_SIZE
        raw = bytes(page[off:off + IOREQ_SIZE])
        if int.from_bytes(raw, "little") & self.mask != self.want:
            got = IoReq.unpack(raw)
            for name in self.frozen:
                if getattr(got, name) != getattr(self.sent, name):
                    return PollResult(Poll.CRASH, reason=(
                        f"device model changed ioreq {name} "
                        f"({getattr(self.sent, name)!r} -> {getattr(got, name)!r})"))
        _write_state(page, self.vcpu, STATE_IOREQ_NONE)
        data = int.from_bytes(raw[8:16], "little")
        if "size" in self.frozen:
            return PollResult(Poll.DONE, data & size_mask(self.sent.size))
        # An ioreq-union answer: size is EDI, and the caller wants the other fields too.
        return PollResult(Poll.DONE, data, raw=raw)


# ---------------------------------------------------------------- device-model side


def take(page: Page, vcpu: int) -> IoReq | None:
    """If the slot is READY: copy it once, mark it INPROCESS and return the copy."""
    if read_state(page, vcpu) != STATE_IOREQ_READY:
        return None
    off = vcpu * IOREQ_SIZE
    req = IoReq.unpack(bytes(page[off:off + IOREQ_SIZE]))
    if req.state != STATE_IOREQ_READY:
        return None
    _write_state(page, vcpu, STATE_IOREQ_INPROCESS)
    return req


def respond(page: Page, vcpu: int, data: int | None) -> None:
    """Write the result (only ``data``, nothing else) and mark the slot IORESP_READY."""
    off = vcpu * IOREQ_SIZE
    if data is not None:
        page[off + 8:off + 16] = (data & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    _write_state(page, vcpu, STATE_IORESP_READY)


_FIELDS = struct.Struct("<QQII")


def respond_fields(page: Page, vcpu: int, addr: int, data: int, count: int, size: int) -> None:
    """An ioreq-union answer: addr, data, count and size carry registers back."""
    off = vcpu * IOREQ_SIZE
    page[off:off + _FIELDS.size] = _FIELDS.pack(addr & 0xFFFFFFFFFFFFFFFF,
                                                data & 0xFFFFFFFFFFFFFFFF,
                                                count & 0xFFFFFFFF, size & 0xFFFFFFFF)
    _write_state(page, vcpu, STATE_IORESP_READY)
