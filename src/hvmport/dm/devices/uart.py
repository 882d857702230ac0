"""A 16550A UART (registers at base+0..7), as Linux's 8250 driver probes and uses it.

Transmission is instantaneous: a byte written to THR goes straight to ``output`` (or, in
loopback, to the receiver), so LSR always shows THRE and TEMT and the THRE interrupt
becomes pending again right after each write.

Receive buffering. ``feed()`` appends host bytes to a host-side backlog (bounded,
``rx_backlog`` bytes, default 4096; beyond it bytes are refused and counted). The backlog
drains into the guest-visible receiver, 16 bytes deep with the FIFO enabled and 1 byte
without, whenever it has room. That acts like a flow-controlled line: a paste into the
console is not lost just because the guest reads in 16-byte bursts, and the backlog stays
bounded. So host input never overruns the receiver. OE is set only by loopback
transmission into a full receiver, where the byte is lost as on real hardware.

Without a clock there is no four-character receive timeout. Data below the trigger level
is reported at once with the timeout code (IIR 0x0C), as if the timeout had already run
out. Data at or above the trigger level is reported as "data available" (0x04). Linux
treats both the same way.

``set_irq(level)`` is called when the interrupt output changes. It is high while IIR
reports a pending interrupt. Unlike a PC board, MCR.OUT2 does not gate it. Linux always
sets OUT2 anyway, and simpler guests then still get their interrupts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hvmport.dm.devices.bus import all_ones

COM1_BASE = 0x3F8
REG_COUNT = 8
#: The 1.8432 MHz crystal over 16: baud = BAUD_BASE / divisor.
BAUD_BASE = 115200
FIFO_DEPTH = 16
RX_BACKLOG_DEFAULT = 4096

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
#: Outside loopback the host end looks like a connected terminal: CTS, DSR and DCD on.
MSR_HOST_LINES = MSR_CTS | MSR_DSR | MSR_DCD


class Uart16550:
    def __init__(
        self, output: Callable[[bytes], None], set_irq: Callable[[int], None],
        base: int = COM1_BASE, rx_backlog: int = RX_BACKLOG_DEFAULT,
    ) -> None:
        self.base = base
        self._output = output
        self._set_irq = set_irq
        self._backlog_limit = max(0, rx_backlog)
        self._backlog: deque[int] = deque()
        #: Host bytes refused because the backlog was full; diagnostics only.
        self.rx_dropped = 0
        self._irq = 0
        self.reset()

    def reset(self) -> None:
        self._rx: deque[int] = deque()
        self._backlog.clear()
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._scr = 0
        self._dll = 0x0C  # 9600 baud, the usual firmware default
        self._dlm = 0
        self._fifo = False
        self._trigger = 1
        self._thre_pending = False
        self._update()

    # -- host side ----------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Host bytes for the guest; returns how many were accepted (the rest are lost)."""
        room = self._backlog_limit - len(self._backlog)
        take = min(room, len(data))
        self._backlog.extend(data[:take])
        self.rx_dropped += len(data) - take
        self._update()
        return take

    @property
    def rx_pending(self) -> int:
        """Bytes not yet read by the guest (receiver plus backlog)."""
        return len(self._rx) + len(self._backlog)

    @property
    def divisor(self) -> int:
        return (self._dlm << 8) | self._dll

    @property
    def baud(self) -> int | None:
        d = self.divisor
        return BAUD_BASE // d if d else None

    @property
    def irq_level(self) -> int:
        return self._irq

    # -- guest ports --------------------------------------------------------------------

    def port_read(self, port: int, size: int) -> int:
        off = port - self.base
        if size != 1 or not 0 <= off < REG_COUNT:
            return all_ones(size)
        value = self._read(off)
        self._update()
        return value

    def port_write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        if size != 1 or not 0 <= off < REG_COUNT:
            return
        self._write(off, value & 0xFF)
        self._update()

    def _read(self, off: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                return self._dll
            return self._rx.popleft() if self._rx else 0
        if off == IER_DLM:
            return self._dlm if dlab else self._ier
        if off == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thre_pending = False  # reading IIR acknowledges THRE
            return iir
        if off == LCR:
            return self._lcr
        if off == MCR:
            return self._mcr
        if off == LSR:
            lsr = self._lsr()
            self._lsr_errors = 0
            return lsr
        if off == MSR:
            msr = self._msr_lines() | self._msr_deltas
            self._msr_deltas = 0
            return msr
        return self._scr

    def _write(self, off: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif off == IER_DLM:
            if dlab:
                self._dlm = value
            else:
                old, self._ier = self._ier, value & IER_MASK
                # A 16550 raises THRE when the interrupt is enabled while the holding
                # register is empty; Linux's startup test depends on it.
                if self._ier & IER_THRI and not old & IER_THRI:
                    self._thre_pending = True
                elif not self._ier & IER_THRI:
                    self._thre_pending = False
        elif off == IIR_FCR:
            self._write_fcr(value)
        elif off == LCR:
            self._lcr = value
        elif off == MCR:
            self._write_mcr(value & MCR_MASK)
        elif off == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes fall through harmlessly.

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self._fifo:
            self._rx.clear()  # switching FIFO mode resets both FIFOs
        self._fifo = enable
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        # FCR_CLEAR_TX: nothing is ever waiting to be sent.
        self._trigger = _TRIGGER_LEVELS[value >> 6]

    def _write_mcr(self, value: int) -> None:
        before = self._msr_lines()
        self._mcr = value
        after = self._msr_lines()
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            self._msr_deltas |= MSR_TERI  # trailing edge only

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOP:
            if len(self._rx) < self._rx_capacity():
                self._rx.append(byte)
            else:
                self._lsr_errors |= LSR_OE
        else:
            self._output(bytes((byte,)))
        if self._ier & IER_THRI:
            self._thre_pending = True

    # -- derived registers --------------------------------------------------------------

    def _rx_capacity(self) -> int:
        return FIFO_DEPTH if self._fifo else 1

    def _lsr(self) -> int:
        lsr = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            lsr |= LSR_DR
        return lsr

    def _msr_lines(self) -> int:
        if not self._mcr & MCR_LOOP:
            return MSR_HOST_LINES
        m = self._mcr
        lines = 0
        if m & MCR_RTS:
            lines |= MSR_CTS
        if m & MCR_DTR:
            lines |= MSR_DSR
        if m & MCR_OUT1:
            lines |= MSR_RI
        if m & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self._fifo else 0
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return fifo | IIR_RLSI
        if ier & IER_RDI and self._rx:
            level = self._trigger if self._fifo else 1
            return fifo | (IIR_RDI if len(self._rx) >= level else IIR_TIMEOUT)
        if ier & IER_THRI and self._thre_pending:
            return fifo | IIR_THRI
        if ier & IER_MSI and self._msr_deltas:
            return fifo | IIR_MSI
        return fifo | IIR_NO_INT

    def _update(self) -> None:
        # In loopback the receiver hears only the transmitter, so the host backlog waits.
        if not self._mcr & MCR_LOOP:
            cap = self._rx_capacity()
            while self._backlog and len(self._rx) < cap:
                self._rx.append(self._backlog.popleft())
        level = 0 if self._iir() & IIR_NO_INT else 1
        if level != self._irq:
            self._irq = level
            self._set_irq(level)
