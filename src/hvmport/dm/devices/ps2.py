"""PS/2 keyboard and mouse as seen from the i8042: bytes in, a bounded byte queue out.

A device never touches the controller; :class:`~hvmport.dm.devices.i8042.I8042` moves bytes
from these queues into its output buffer. Both devices drop their pending output when
they receive a command (not an argument), as PS/2 devices do, so a guest's command always
finds room for its answer and is never answered behind stale stream data.
"""

from __future__ import annotations

from collections import deque

from hvmport.dm.devices.pointer import BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT, BUTTONS_ALL

ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA
ECHO = 0xEE


class _Ps2Queue:
    """Byte queue with all-or-nothing pushes, so a multi-byte answer is never cut."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._q: deque[int] = deque()
        self._last = ACK  # for the 0xFE resend command

    def push(self, *data: int) -> bool:
        if len(self._q) + len(data) > self.limit:
            return False
        self._q.extend(b & 0xFF for b in data)
        return True

    def room(self) -> int:
        return self.limit - len(self._q)

    def pending(self) -> bool:
        return bool(self._q)

    def pop(self) -> int:
        self._last = self._q.popleft()
        return self._last

    def resend(self) -> None:
        self.push(self._last)

    def clear(self) -> None:
        self._q.clear()

    def __len__(self) -> int:
        return len(self._q)


class Ps2Keyboard:
    """An MF2 keyboard. Host keys are queued verbatim (see :meth:`queue_key`)."""

    QUEUE_LIMIT = 64
    ID = 0xAB
    #: The second ID byte: 0x83 raw; 0x41 when the controller translates to set 1.
    ID2_RAW = 0x83
    ID2_TRANSLATED = 0x41

    def __init__(self) -> None:
        self.out = _Ps2Queue(self.QUEUE_LIMIT)
        #: Set by the controller from its CTR; only changes the ID answer.
        self.translate = False
        self.reset()

    def reset(self) -> None:
        self.out.clear()
        self.scanning = True
        self.scancode_set = 2
        self.leds = 0
        self.typematic = 0x2B
        self._expect: int | None = None

    def queue_key(self, data: bytes) -> bool:
        """Queue one key's bytes as they must appear at port 0x60 (the caller picks set 1
        or set 2 from the controller's ``translate``). All or nothing; False when
        scanning is off or the queue lacks room."""
        if not self.scanning or not data:
            return False
        return self.out.push(*data)

    def write(self, byte: int) -> None:
        byte &= 0xFF
        if self._expect is not None:
            self._argument(self._expect, byte)
            self._expect = None
            return
        self.out.clear()
        if byte in (0xED, 0xF0, 0xF3):
            self._expect = byte
            self.out.push(ACK)
        elif byte == 0xEE:
            self.out.push(ECHO)
        elif byte == 0xF2:
            self.out.push(ACK, self.ID, self.ID2_TRANSLATED if self.translate else self.ID2_RAW)
        elif byte == 0xF4:
            self.scanning = True
            self.out.push(ACK)
        elif byte == 0xF5:
            self._defaults()
            self.scanning = False
            self.out.push(ACK)
        elif byte == 0xF6:
            self._defaults()
            self.out.push(ACK)
        elif 0xF7 <= byte <= 0xFA:  # set-3 "all keys" modes: accepted, no effect
            self.out.push(ACK)
        elif byte == RESEND:
            self.out.resend()
        elif byte == 0xFF:
            self.reset()
            self.out.push(ACK, BAT_OK)
        else:
            self.out.push(RESEND)

    def _defaults(self) -> None:
        self.typematic = 0x2B
        self.scancode_set = 2

    def _argument(self, cmd: int, arg: int) -> None:
        if cmd == 0xED:
            self.leds = arg & 0x07
            self.out.push(ACK)
        elif cmd == 0xF3:
            self.typematic = arg & 0x7F
            self.out.push(ACK)
        elif arg == 0:  # 0xF0 0x00: report the current set
            self.out.push(ACK, self.scancode_set)
        elif arg in (1, 2, 3):
            self.scancode_set = arg
            self.out.push(ACK)
        else:
            self.out.push(RESEND)


# Mouse status byte (answer to 0xE9) and packet byte 0.
_ST_REMOTE = 0x40
_ST_ENABLED = 0x20
_ST_SCALE21 = 0x10
_PKT_ALWAYS = 0x08
_PKT_XSIGN = 0x10
_PKT_YSIGN = 0x20

TYPE_PS2 = 0x00
TYPE_IMPS2 = 0x03
TYPE_IMEX = 0x04
_KNOCK_IMPS2 = (200, 100, 80)
_KNOCK_IMEX = (200, 200, 80)


def _clamp(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


class Ps2Mouse:
    """A PS/2 mouse with the IntelliMouse (ID 3) and Explorer (ID 4) wheel extensions."""

    QUEUE_LIMIT = 256
    #: Motion not yet sent is clamped to this, so a stalled guest costs bounded work.
    ACCUM_LIMIT = 4096

    def __init__(self) -> None:
        self.out = _Ps2Queue(self.QUEUE_LIMIT)
        self.reset()

    def reset(self) -> None:
        self.out.clear()
        self.type = TYPE_PS2
        self.remote = False
        self.wrap = False
        self.buttons = 0
        self._rates: deque[int] = deque(maxlen=3)
        self._dx = self._dy = self._dz = 0
        self._buttons_dirty = False
        self._expect: int | None = None
        self._defaults()

    def _defaults(self) -> None:
        self.sample_rate = 100
        self.resolution = 2
        self.scaling21 = False
        self.enabled = False

    @property
    def streaming(self) -> bool:
        """Whether movement is reported unprompted (enabled, stream mode, not wrapping)."""
        return self.enabled and not self.remote and not self.wrap

    @property
    def packet_size(self) -> int:
        return 3 if self.type == TYPE_PS2 else 4

    # -- host side ----------------------------------------------------------------------

    def event(self, dx: int, dy: int, dz: int, buttons: int) -> None:
        """Host motion; ``dy`` grows downwards (screen), PS/2's grows upwards. Dropped,
        as on a real mouse, while reporting is disabled."""
        if not self.enabled:
            return
        lim = self.ACCUM_LIMIT
        self._dx = _clamp(self._dx + dx, -lim, lim)
        self._dy = _clamp(self._dy - dy, -lim, lim)
        if self.type != TYPE_PS2:  # a plain PS/2 mouse has no wheel to report
            self._dz = _clamp(self._dz + dz, -lim, lim)
        buttons &= BUTTONS_ALL
        if buttons != self.buttons:
            self.buttons = buttons
            self._buttons_dirty = True
        self._sync()

    def fake_movement(self) -> None:
        """vmmouse's nudge: one count to the right with the current buttons."""
        self.event(1, 0, 0, self.buttons)

    def _sync(self) -> None:
        if not self.streaming:
            return
        while (self._dx or self._dy or self._dz or self._buttons_dirty) \
                and self.out.room() >= self.packet_size:
            self._emit_packet()

    def _emit_packet(self) -> None:
        dx = _clamp(self._dx, -256, 255)
        dy = _clamp(self._dy, -256, 255)
        if self.type == TYPE_IMEX:
            dz = _clamp(self._dz, -8, 7)
        elif self.type == TYPE_IMPS2:
            dz = _clamp(self._dz, -127, 127)
        else:
            dz = 0
        self._dx -= dx
        self._dy -= dy
        self._dz -= dz
        self._buttons_dirty = False
        b0 = _PKT_ALWAYS | self.buttons  # pointer's L/R/M bits are PS/2's bits 0..2
        if dx < 0:
            b0 |= _PKT_XSIGN
        if dy < 0:
            b0 |= _PKT_YSIGN
        pkt = [b0, dx & 0xFF, dy & 0xFF]
        if self.type == TYPE_IMPS2:
            pkt.append(dz & 0xFF)
        elif self.type == TYPE_IMEX:
            pkt.append(dz & 0x0F)
        self.out.push(*pkt)

    # -- guest side ---------------------------------------------------------------------

    def write(self, byte: int) -> None:
        byte &= 0xFF
        if self.wrap and byte not in (0xEC, 0xFF):
            self.out.push(byte)
            return
        if self._expect is not None:
            self._argument(self._expect, byte)
            self._expect = None
            return
        self.out.clear()
        if byte in (0xE8, 0xF3):
            self._expect = byte
            self.out.push(ACK)
        elif byte in (0xE6, 0xE7):
            self.scaling21 = byte == 0xE7
            self.out.push(ACK)
        elif byte == 0xE9:
            self.out.push(ACK, self._status_byte(), self.resolution, self.sample_rate)
        elif byte in (0xEA, 0xF0):
            self.remote = byte == 0xF0
            self._dx = self._dy = self._dz = 0
            self.out.push(ACK)
        elif byte == 0xEB:
            self.out.push(ACK)
            self._buttons_dirty = True  # a read always answers one packet, even at rest
            self._emit_packet()
        elif byte in (0xEC, 0xEE):
            self.wrap = byte == 0xEE
            self.out.push(ACK)
        elif byte == 0xF2:
            self.out.push(ACK, self.type)
        elif byte == 0xF4:
            self.enabled = True
            self.out.push(ACK)
        elif byte == 0xF5:
            self.enabled = False
            self.out.push(ACK)
        elif byte == 0xF6:
            self._defaults()
            self.out.push(ACK)
        elif byte == RESEND:
            self.out.resend()
        elif byte == 0xFF:
            self.reset()
            self.out.push(ACK, BAT_OK, TYPE_PS2)
        else:
            self.out.push(RESEND)

    def _argument(self, cmd: int, arg: int) -> None:
        if cmd == 0xE8:
            self.resolution = arg & 0x03
        else:
            self.sample_rate = arg
            self._rates.append(arg)
            knock = tuple(self._rates)
            if knock == _KNOCK_IMPS2 and self.type == TYPE_PS2:
                self.type = TYPE_IMPS2
            elif knock == _KNOCK_IMEX and self.type == TYPE_IMPS2:
                self.type = TYPE_IMEX
        self.out.push(ACK)

    def _status_byte(self) -> int:
        st = 0
        if self.remote:
            st |= _ST_REMOTE
        if self.enabled:
            st |= _ST_ENABLED
        if self.scaling21:
            st |= _ST_SCALE21
        if self.buttons & BUTTON_LEFT:
            st |= 0x04
        if self.buttons & BUTTON_MIDDLE:
            st |= 0x02
        if self.buttons & BUTTON_RIGHT:
            st |= 0x01
        return st
