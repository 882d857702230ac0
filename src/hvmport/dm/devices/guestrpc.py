"""GuestRPC: backdoor command 30 (MESSAGE) and the high-bandwidth port 0x5659.

Conventions from guest-clients.md §5 (what open-vm-tools' lib/message sends and checks):
the message type is in ECX's high half, the channel id in EDX's high half, the cookie in
ESI (high part) and EDI (low part); the host's status comes back in ECX's high half.

* OPEN (EBX = protocol | 0x80000000 for cookies): at most ``MAX_CHANNELS`` channels; when
  all are taken, the one idle longest is reclaimed if it has been idle ``IDLE_S`` seconds.
* SENDSIZE / SENDPAYLOAD (4 bytes in EBX) or, when the host advertises it (status bit HB),
  one ``rep outsb`` on 0x5659 carry a message; RECVSIZE / RECVPAYLOAD or ``rep insb``
  fetch the reply; RECVSTATUS acknowledges it; CLOSE frees the channel.
* Only the RPCI protocol ("guest asks, host answers") is served: ``info-get
  guestinfo.KEY`` and ``info-set guestinfo.KEY VALUE`` on the guestinfo store the host
  shares (``--guestinfo``, QMP); any other command gets a "0 " reply saying it is not
  implemented. TCLO channels open but never carry a host command.

The high-bandwidth transfers arrive as string I/O, i.e. ``data_is_ptr`` requests on guest
memory, with the registers of the call in the server's vmport registers page (EBP, which
carries half of the cookie, in hvmport's extension word after the slots): EBX = command
(0 MESSAGE) with the status returned in its high half, ECX = byte count, EDX's high half =
channel; OUTSB: EDI = cookie low, EBP = cookie high; INSB: ESI = cookie high, EBP = cookie
low.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from hvmport.abi import vmware as vm
from hvmport.dm.devices.vmport import VmportRegs

MASK32 = 0xFFFFFFFF

FLAG_COOKIE = 0x80000000
PROTO_RPCI = 0x49435052
PROTO_TCLO = 0x4F4C4354

MAX_CHANNELS = 8
IDLE_S = 80.0
#: GUESTMSG_MAX_IN_SIZE: the longest message either way.
MAX_MESSAGE = 64 * 1024
GUESTINFO = "guestinfo."
#: At most this many guestinfo keys, each value at most MAX_MESSAGE bytes: the guest
#: cannot grow the device model without bound.
MAX_KEYS = 1024


@dataclass(slots=True)
class Channel:
    proto: int
    cookie: tuple[int, int] | None
    last_used: float
    #: The message being sent: its announced size and the bytes so far.
    send_size: int | None = None
    send: bytearray = field(default_factory=bytearray)
    #: The reply waiting to be fetched, and how much of it was fetched.
    reply: bytes | None = None
    reply_pos: int = 0


@dataclass(slots=True)
class Stats:
    """What reached the device model, for tests and QMP."""

    calls: dict[int, int] = field(default_factory=dict)
    hb_out: int = 0
    hb_in: int = 0
    rejected: int = 0
    rpcs: int = 0


class GuestRpc:
    def __init__(self, guestinfo: MutableMapping[str, str] | None = None, *,
                 high_bandwidth: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 cookie_source: Callable[[], int] | None = None) -> None:
        #: Keys without the "guestinfo." prefix, as the host names them.
        self.guestinfo: MutableMapping[str, str] = guestinfo if guestinfo is not None else {}
        self.high_bandwidth = high_bandwidth
        self.clock = clock
        self._cookie = cookie_source or (lambda: int.from_bytes(os.urandom(4), "little"))
        self.channels: list[Channel | None] = [None] * MAX_CHANNELS
        self.stats = Stats()

    # ------------------------------------------------------------------ command 30

    def message(self, regs: VmportRegs) -> int:
        """The vmport handler of command 30; returns EAX (left as the guest's)."""
        kind = regs.ecx >> 16
        self.stats.calls[kind] = self.stats.calls.get(kind, 0) + 1
        status = self._message(kind, regs)
        if not status & vm.MESSAGE_STATUS_SUCCESS:
            self.stats.rejected += 1
        regs.ecx = (status << 16) & MASK32
        return regs.eax

    def _message(self, kind: int, regs: VmportRegs) -> int:
        if kind == vm.MESSAGE_TYPE_OPEN:
            return self._open(regs)
        cid = regs.edx >> 16
        chan = self._channel(cid, (regs.esi, regs.edi))
        if chan is None:
            return 0
        hb = vm.MESSAGE_STATUS_HB if self.high_bandwidth else 0
        if kind == vm.MESSAGE_TYPE_SENDSIZE:
            if regs.ebx > MAX_MESSAGE:
                return 0
            chan.send_size, chan.send = regs.ebx, bytearray()
            chan.reply, chan.reply_pos = None, 0
            if regs.ebx == 0:
                self._complete(chan)
            return vm.MESSAGE_STATUS_SUCCESS | hb
        if kind == vm.MESSAGE_TYPE_SENDPAYLOAD:
            if chan.send_size is None:
                return 0
            self._append(chan, regs.ebx.to_bytes(4, "little"))
            return vm.MESSAGE_STATUS_SUCCESS
        if kind == vm.MESSAGE_TYPE_RECVSIZE:
            if chan.reply is None:
                regs.ebx = 0
                return vm.MESSAGE_STATUS_SUCCESS
            regs.ebx = len(chan.reply)
            regs.edx = (vm.MESSAGE_TYPE_SENDSIZE << 16) | (regs.edx & 0xFFFF)
            return vm.MESSAGE_STATUS_SUCCESS | vm.MESSAGE_STATUS_DORECV | hb
        if kind == vm.MESSAGE_TYPE_RECVPAYLOAD:
            if chan.reply is None:
                return 0
            chunk = chan.reply[chan.reply_pos:chan.reply_pos + 4]
            chan.reply_pos += len(chunk)
            regs.ebx = int.from_bytes(chunk.ljust(4, b"\0"), "little")
            regs.edx = (vm.MESSAGE_TYPE_SENDPAYLOAD << 16) | (regs.edx & 0xFFFF)
            return vm.MESSAGE_STATUS_SUCCESS
        if kind == vm.MESSAGE_TYPE_RECVSTATUS:
            if chan.reply is None:
                return 0
            chan.reply, chan.reply_pos = None, 0
            return vm.MESSAGE_STATUS_SUCCESS
        if kind == vm.MESSAGE_TYPE_CLOSE:
            self.channels[cid] = None
            return vm.MESSAGE_STATUS_SUCCESS
        return 0

    def _open(self, regs: VmportRegs) -> int:
        proto = regs.ebx & ~FLAG_COOKIE & MASK32
        if proto not in (PROTO_RPCI, PROTO_TCLO):
            return 0
        now = self.clock()
        cid = next((i for i, c in enumerate(self.channels) if c is None), None)
        if cid is None:
            idle = min(range(MAX_CHANNELS), key=lambda i: self._last_used(i))
            if now - self._last_used(idle) < IDLE_S:
                return 0
            cid = idle
        cookie = None
        if regs.ebx & FLAG_COOKIE:
            cookie = (self._cookie() & MASK32, self._cookie() & MASK32)
            regs.esi, regs.edi = cookie
        self.channels[cid] = Channel(proto, cookie, now)
        regs.edx = (cid << 16) | (regs.edx & 0xFFFF)
        return vm.MESSAGE_STATUS_SUCCESS

    def _last_used(self, cid: int) -> float:
        chan = self.channels[cid]
        return chan.last_used if chan is not None else 0.0

    def _channel(self, cid: int, cookie: tuple[int, int]) -> Channel | None:
        """The open channel ``cid`` if the cookie (high, low) matches; marks it used."""
        if not 0 <= cid < MAX_CHANNELS:
            return None
        chan = self.channels[cid]
        if chan is None or (chan.cookie is not None and chan.cookie != cookie):
            return None
        chan.last_used = self.clock()
        return chan

    def _append(self, chan: Channel, data: bytes) -> None:
        assert chan.send_size is not None
        chan.send += data[:chan.send_size - len(chan.send)]
        if len(chan.send) >= chan.send_size:
            self._complete(chan)

    def _complete(self, chan: Channel) -> None:
        message = bytes(chan.send)
        chan.send_size, chan.send = None, bytearray()
        chan.reply = self.rpci(message) if chan.proto == PROTO_RPCI else None
        chan.reply_pos = 0

    # ------------------------------------------------------------------ port 0x5659

    def high_bandwidth_call(self, regs: list[int], guest_to_host: bool,
                            buffer: memoryview) -> None:
        """One ``rep outsb`` (guest to host) or ``rep insb`` on 0x5659.

        ``regs`` = [EBX, ECX, EDX, ESI, EDI, EBP], updated in place (the status goes to
        EBX's high half); ``buffer`` is the guest memory the string instruction moves.
        """
        ebx, _ecx, edx, esi, edi, ebp = regs
        status = 0
        if guest_to_host:
            self.stats.hb_out += 1
            cookie = (ebp, edi)
        else:
            self.stats.hb_in += 1
            cookie = (esi, ebp)
        chan = self._channel(edx >> 16, cookie) if self.high_bandwidth else None
        if chan is not None and ebx & 0xFFFF == vm.BDOORHB_CMD_MESSAGE:
            if guest_to_host and chan.send_size is not None \
                    and len(chan.send) + len(buffer) <= chan.send_size:
                self._append(chan, bytes(buffer))
                status = vm.MESSAGE_STATUS_SUCCESS
            elif not guest_to_host and chan.reply is not None \
                    and chan.reply_pos + len(buffer) <= len(chan.reply):
                end = chan.reply_pos + len(buffer)
                buffer[:] = chan.reply[chan.reply_pos:end]
                chan.reply_pos = end
                status = vm.MESSAGE_STATUS_SUCCESS
        if not status:
            self.stats.rejected += 1
        regs[0] = ((status << 16) | (ebx & 0xFFFF)) & MASK32

    # ------------------------------------------------------------------ RPCI

    def rpci(self, message: bytes) -> bytes:
        """The reply to one RPCI message: "1 " and a result, or "0 " and an error."""
        self.stats.rpcs += 1
        text = message.rstrip(b"\0").decode("utf-8", errors="replace")
        command, _, rest = text.partition(" ")
        if command == "info-get":
            key = rest.strip()
            if key.startswith(GUESTINFO):
                value = self.guestinfo.get(key[len(GUESTINFO):])
                if value is not None:
                    return b"1 " + value.encode()
            return b"0 No value found"
        if command == "info-set":
            key, _, value = rest.lstrip().partition(" ")
            if not key.startswith(GUESTINFO) or len(key) == len(GUESTINFO):
                return b"0 Only guestinfo.KEY can be set"
            if not value:
                return b"0 info-set needs a key and a value"
            name = key[len(GUESTINFO):]
            if name not in self.guestinfo and len(self.guestinfo) >= MAX_KEYS:
                return b"0 Too many guestinfo keys"
            self.guestinfo[name] = value
            return b"1 "
        return f"0 hvmport does not implement the RPCI command {command!r}".encode()
