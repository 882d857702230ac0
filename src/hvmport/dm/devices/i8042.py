"""The 8042 keyboard controller: ports 0x60 (data) and 0x64 (status / command).

Model. The controller has one output-buffer byte (OBF) tagged keyboard or aux. Behind it
wait three bounded queues: the controller's own answers (CTR reads, self tests, the
0xD2/0xD3 loopbacks), the keyboard's and the mouse's. When the buffer is empty it is
refilled from the controller queue first, then from the devices, alternating between them
so that neither starves the other; a device whose interface is disabled in the CTR
(0xAD / 0xA7) keeps its bytes until it is enabled again. Commands complete at once, so IBF
always reads 0.

Interrupts. ``set_irq(line, level)`` is called with line 1 or 12 only when a level
changes. A line is high exactly while the output buffer holds a byte from its side (IRQ 1:
keyboard bytes and controller answers; IRQ 12: mouse bytes and 0xD3's loopback) and its
interrupt bit is set in the CTR. That is level semantics, right for an IOAPIC pin
programmed level-triggered. Every read of port 0x60 first drops the line of the byte it
takes, then refills the buffer and raises the line again if the next byte qualifies. So
each byte of a burst gets its own rising edge, which an edge-triggered 8259 input (what
ISA IRQs 1 and 12 normally are) needs, because Linux's handler reads one byte per
interrupt. A level-triggered input sees the same line as high for as long as data is
waiting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hvmport.dm.devices.bus import all_ones
from hvmport.dm.devices.ps2 import Ps2Keyboard, Ps2Mouse

DATA_PORT = 0x60
COMMAND_PORT = 0x64
IRQ_KBD = 1
IRQ_AUX = 12

# Status register.
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMD = 0x08
STR_UNLOCKED = 0x10
STR_AUXDATA = 0x20

# Controller configuration byte (CTR, internal RAM byte 0).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
#: What a PC BIOS typically hands over: both interrupts, POST passed, translation on.
CTR_POWER_ON = CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE

# Output port (0xD0 / 0xD1): bit 0 low holds the CPU in reset, bit 1 gates A20.
OUTPORT_RESET_N = 0x01
OUTPORT_A20 = 0x02
OUTPORT_OBF_KBD = 0x10
OUTPORT_OBF_AUX = 0x20
OUTPORT_POWER_ON = OUTPORT_RESET_N | OUTPORT_A20
#: Input port (0xC0): bit 7 high means the keyboard is not inhibited by the keylock.
INPORT_VALUE = 0x80

SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00
RAM_SIZE = 32
CTL_QUEUE_LIMIT = 16

# Commands that take a data byte written next to port 0x60.
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4

SetIrq = Callable[[int, int], None]


class I8042:
    def __init__(
        self, set_irq: SetIrq, request_reset: Callable[[], None] | None = None,
    ) -> None:
        """``set_irq(line, level)`` drives ISA IRQ 1 and 12; ``request_reset`` (optional)
        is called when the guest pulses the CPU reset line (0xFE, or 0xD1 with bit 0
        clear): how Linux's ``reboot=k`` resets the machine."""
        self._set_irq = set_irq
        self._request_reset = request_reset
        self.kbd = Ps2Keyboard()
        self.mouse = Ps2Mouse()
        self._levels = {IRQ_KBD: 0, IRQ_AUX: 0}
        self.reset()

    def reset(self) -> None:
        self.kbd.reset()
        self.mouse.reset()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = CTR_POWER_ON
        self.kbd.translate = bool(CTR_POWER_ON & CTR_XLATE)
        self._outport = OUTPORT_POWER_ON
        self._ctl: deque[tuple[int, bool]] = deque()
        self._obuf: tuple[int, bool] | None = None  # (byte, from aux)
        self._last_read = 0
        self._last_was_cmd = False
        self._expect: int | None = None
        self._prefer_aux = False
        self._update()

    # -- state the DM may want ----------------------------------------------------------

    @property
    def ctr(self) -> int:
        return self._ram[0]

    @property
    def translate(self) -> bool:
        """Whether the guest wants set-1 codes (the controller translates): tells the
        host which scancode set to hand :meth:`queue_key`."""
        return bool(self._ram[0] & CTR_XLATE)

    @property
    def a20(self) -> bool:
        return bool(self._outport & OUTPORT_A20)

    def irq_level(self, line: int) -> int:
        return self._levels.get(line, 0)

    # -- host input ---------------------------------------------------------------------

    def queue_key(self, data: bytes) -> bool:
        """Queue one key's scancode bytes (verbatim, all or nothing); IRQ 1 if enabled."""
        ok = self.kbd.queue_key(data)
        self._update()
        return ok

    def mouse_event(self, dx: int, dy: int, dz: int, buttons: int) -> None:
        """Relative host motion for the PS/2 mouse (``dy`` grows downwards)."""
        self.mouse.event(dx, dy, dz, buttons)
        self._update()

    def fake_aux_movement(self) -> None:
        """vmmouse's "come and look" nudge: a packet with dx = 1 (byte 0 bit 3 set, as in
        every packet) and IRQ 12, only if the guest enabled streaming on the mouse."""
        self.mouse.fake_movement()
        self._update()

    # -- guest ports --------------------------------------------------------------------

    def port_read(self, port: int, size: int) -> int:
        if size != 1:
            return all_ones(size)
        if port == COMMAND_PORT:
            return self._status()
        if port != DATA_PORT:
            return 0xFF
        if self._obuf is None:
            return self._last_read  # an 8042 re-reads its stale buffer
        self._last_read = self._obuf[0]
        self._obuf = None
        self._update_irqs()  # the falling half of the per-byte pulse
        self._update()
        return self._last_read

    def port_write(self, port: int, size: int, value: int) -> None:
        if size != 1 or port not in (DATA_PORT, COMMAND_PORT):
            return
        value &= 0xFF
        if port == COMMAND_PORT:
            self._last_was_cmd = True
            self._command(value)
        else:
            self._last_was_cmd = False
            self._data(value)
        self._update()

    def _status(self) -> int:
        st = STR_UNLOCKED
        if self._obuf is not None:
            st |= STR_OBF
            if self._obuf[1]:
                st |= STR_AUXDATA
        if self._ram[0] & CTR_SYS:
            st |= STR_SYS
        if self._last_was_cmd:
            st |= STR_CMD
        return st

    def _answer(self, byte: int, aux: bool = False) -> None:
        if len(self._ctl) < CTL_QUEUE_LIMIT:
            self._ctl.append((byte & 0xFF, aux))

    def _command(self, cmd: int) -> None:
        self._expect = None  # a new command abandons one still waiting for its byte
        ctr = self._ram[0]
        if 0x20 <= cmd <= 0x3F:
            self._answer(self._ram[cmd & 0x1F])
        elif 0x60 <= cmd <= 0x7F or CMD_WRITE_OUTPORT <= cmd <= CMD_WRITE_AUX:
            self._expect = cmd
        elif cmd == 0xA7:
            self._set_ctr(ctr | CTR_AUXDIS)
        elif cmd == 0xA8:
            self._set_ctr(ctr & ~CTR_AUXDIS)
        elif cmd in (0xA9, 0xAB):
            self._answer(PORT_TEST_OK)
        elif cmd == 0xAA:
            self._set_ctr(ctr | CTR_SYS)
            self._answer(SELF_TEST_OK)
        elif cmd == 0xAD:
            self._set_ctr(ctr | CTR_KBDDIS)
        elif cmd == 0xAE:
            self._set_ctr(ctr & ~CTR_KBDDIS)
        elif cmd == 0xC0:
            self._answer(INPORT_VALUE)
        elif cmd == 0xD0:
            out = self._outport
            if self._obuf is not None:
                out |= OUTPORT_OBF_AUX if self._obuf[1] else OUTPORT_OBF_KBD
            self._answer(out)
        elif cmd == 0xE0:
            self._answer(0x00)
        elif cmd >= 0xF0 and not cmd & 0x01:
            self._reset_cpu()  # pulse output-port bit 0 low

    def _data(self, value: int) -> None:
        cmd, self._expect = self._expect, None
        if cmd is None:
            self.kbd.write(value)
        elif cmd < 0x80:
            if cmd & 0x1F == 0:
                self._set_ctr(value)
            else:
                self._ram[cmd & 0x1F] = value
        elif cmd == CMD_WRITE_OUTPORT:
            self._outport = value
            if not value & OUTPORT_RESET_N:
                self._outport |= OUTPORT_RESET_N  # the line is a pulse, not a latch
                self._reset_cpu()
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._answer(value, aux=False)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._answer(value, aux=True)
        else:
            self.mouse.write(value)

    def _set_ctr(self, value: int) -> None:
        self._ram[0] = value & 0xFF
        self.kbd.translate = bool(value & CTR_XLATE)

    def _reset_cpu(self) -> None:
        if self._request_reset is not None:
            self._request_reset()

    # -- buffer and lines ---------------------------------------------------------------

    def _refill(self) -> None:
        if self._obuf is not None:
            return
        if self._ctl:
            self._obuf = self._ctl.popleft()
            return
        ctr = self._ram[0]
        kbd_ready = self.kbd.out.pending() and not ctr & CTR_KBDDIS
        aux_ready = self.mouse.out.pending() and not ctr & CTR_AUXDIS
        if aux_ready and (self._prefer_aux or not kbd_ready):
            self._obuf = (self.mouse.out.pop(), True)
            self._prefer_aux = False
        elif kbd_ready:
            self._obuf = (self.kbd.out.pop(), False)
            self._prefer_aux = True

    def _update(self) -> None:
        self._refill()
        self._update_irqs()

    def _update_irqs(self) -> None:
        ctr = self._ram[0]
        kbd = aux = 0
        if self._obuf is not None:
            if self._obuf[1]:
                aux = int(bool(ctr & CTR_AUXINT))
            else:
                kbd = int(bool(ctr & CTR_KBDINT))
        for line, level in ((IRQ_KBD, kbd), (IRQ_AUX, aux)):
            if self._levels[line] != level:
                self._levels[line] = level
                self._set_irq(line, level)
