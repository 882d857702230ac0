"""GuestRPC in the device model: command 30's message types, channels and cookies, the
high-bandwidth calls and the RPCI commands (guest-clients.md §5)."""

from __future__ import annotations

import itertools

from hvmport.dm.devices.guestrpc import (
    IDLE_S,
    MAX_CHANNELS,
    PROTO_RPCI,
    GuestRpc,
)
from hvmport.dm.devices.vmport import VmportRegs

MAGIC = 0x564D5868
COOKIE = 0x80000000


def call(rpc: GuestRpc, kind: int, ebx: int = 0, chan: int = 0,
         cookie: tuple[int, int] = (0, 0)) -> VmportRegs:
    regs = VmportRegs(MAGIC, ebx, (kind << 16) | 30, (chan << 16) | 0x5658, *cookie)
    rpc.message(regs)
    return regs


def status(regs: VmportRegs) -> int:
    return regs.ecx >> 16


def open_channel(rpc: GuestRpc) -> tuple[int, tuple[int, int]]:
    r = call(rpc, 0, PROTO_RPCI | COOKIE)
    assert status(r) & 1
    return r.edx >> 16, (r.esi, r.edi)


def send_lb(rpc: GuestRpc, chan: int, cookie: tuple[int, int], text: bytes) -> bytes:
    """The low-bandwidth exchange open-vm-tools does without the HB bit."""
    assert status(call(rpc, 1, len(text), chan, cookie)) & 1
    for i in range(0, len(text), 4):
        assert status(call(rpc, 2, int.from_bytes(text[i:i + 4].ljust(4, b"\0"), "little"),
                           chan, cookie)) == 1
    r = call(rpc, 3, 0, chan, cookie)
    assert status(r) & 3 == 3 and r.edx >> 16 == 1  # SUCCESS | DORECV, "SENDSIZE"
    size, out = r.ebx, b""
    while len(out) < size:
        p = call(rpc, 4, 1, chan, cookie)
        assert status(p) == 1 and p.edx >> 16 == 2
        out += p.ebx.to_bytes(4, "little")
    assert status(call(rpc, 5, 1, chan, cookie)) == 1
    return out[:size]


def test_info_get_and_set_over_low_bandwidth() -> None:
    store = {"x": "hello"}
    rpc = GuestRpc(store, high_bandwidth=False)
    chan, cookie = open_channel(rpc)
    assert send_lb(rpc, chan, cookie, b"info-get guestinfo.x") == b"1 hello"
    assert send_lb(rpc, chan, cookie, b"info-get guestinfo.y") == b"0 No value found"
    assert send_lb(rpc, chan, cookie, b"info-set guestinfo.y two words") == b"1 "
    assert store["y"] == "two words"  # the host sees what the guest set
    assert send_lb(rpc, chan, cookie, b"info-set other.k v").startswith(b"0 ")
    assert send_lb(rpc, chan, cookie, b"log hi").startswith(
        b"0 hvmport does not implement the RPCI command 'log'")
    assert status(call(rpc, 6, 0, chan, cookie)) == 1
    assert status(call(rpc, 3, 0, chan, cookie)) == 0  # closed


def test_sendsize_advertises_high_bandwidth_only_when_on() -> None:
    for hb, bit in ((True, 0x80), (False, 0)):
        rpc = GuestRpc({}, high_bandwidth=hb)
        chan, cookie = open_channel(rpc)
        assert status(call(rpc, 1, 4, chan, cookie)) == 1 | bit


def test_high_bandwidth_send_and_receive() -> None:
    rpc = GuestRpc({"k": "value"})
    chan, (high, low) = open_channel(rpc)
    msg = b"info-get guestinfo.k"
    call(rpc, 1, len(msg), chan, (high, low))
    out = bytearray(msg)
    regs = [1 << 16, len(msg), (chan << 16) | 0x5659, 0x1000, low, high]  # outsb: EDI, EBP
    rpc.high_bandwidth_call(regs, True, memoryview(out))
    assert regs[0] >> 16 == 1
    r = call(rpc, 3, 0, chan, (high, low))
    assert status(r) == 0x83 and r.ebx == 7
    buf = bytearray(7)
    regs = [1 << 16, 7, (chan << 16) | 0x5659, high, 0x2000, low]  # insb: ESI, EBP
    rpc.high_bandwidth_call(regs, False, memoryview(buf))
    assert regs[0] >> 16 == 1 and bytes(buf) == b"1 value"
    # A wrong cookie half (EBP) is refused and moves nothing.
    call(rpc, 1, 3, chan, (high, low))
    regs = [1 << 16, 3, (chan << 16) | 0x5659, 0, low, high ^ 1]
    rpc.high_bandwidth_call(regs, True, memoryview(bytearray(b"abc")))
    assert regs[0] >> 16 == 0


def test_channel_id_and_cookie_are_checked() -> None:
    rpc = GuestRpc({})
    chan, (high, low) = open_channel(rpc)
    assert status(call(rpc, 1, 4, chan, (high, low ^ 1))) == 0
    assert status(call(rpc, 1, 4, chan + 1, (high, low))) == 0
    assert status(call(rpc, 1, 4, 0xFFFF, (high, low))) == 0
    assert status(call(rpc, 1, 4, chan, (high, low))) & 1


def test_at_most_eight_channels_idle_ones_reclaimed() -> None:
    now = [0.0]
    counter = itertools.count(1)
    rpc = GuestRpc({}, clock=lambda: now[0], cookie_source=lambda: next(counter))
    opened = [open_channel(rpc) for _ in range(MAX_CHANNELS)]
    assert sorted(c for c, _ in opened) == list(range(MAX_CHANNELS))
    assert status(call(rpc, 0, PROTO_RPCI | COOKIE)) == 0  # full, none idle long enough
    now[0] = IDLE_S / 2
    chan3, cookie3 = opened[3]
    call(rpc, 1, 0, chan3, cookie3)  # channel 3 is used again
    now[0] = IDLE_S + 1
    chan, _ = open_channel(rpc)
    assert chan != chan3  # the one idle longest is taken over
    assert status(call(rpc, 3, 0, opened[chan][0], opened[chan][1])) == 0  # old cookie dead


def test_unknown_protocol_is_refused() -> None:
    rpc = GuestRpc({})
    assert status(call(rpc, 0, 0x12345678)) == 0
