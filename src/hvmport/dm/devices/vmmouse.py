"""QEMU's ``vmmouse``: the absolute pointer behind backdoor commands 39, 40 and 41.

Semantics follow qemu-vmport-vmmouse.md §3. In QEMU the device receives host pointer
events only while its input handler is installed; that is exactly while ``status`` is 0
(READ_ID installs it, DISABLE, a bad DATA request and reset remove it), so here
``enabled`` is simply ``status == 0`` and :meth:`Vmmouse.queue_event` drops events
otherwise. After each queued packet the injected ``notify_aux`` callback runs; wire it to
:meth:`I8042.fake_aux_movement` so the guest gets an IRQ 12 and comes to drain the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hvmport.abi import vmware as vm
from hvmport.dm.devices.pointer import ABS_MAX, BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT
from hvmport.dm.devices.vmport import Vmport, VmportRegs

MASK32 = 0xFFFFFFFF
STATUS_ENABLED = 0x0000
STATUS_DISABLED = 0xFFFF
PACKET_DWORDS = 4
#: DATA may move at most this many dwords: one per register.
MAX_DATA_DWORDS = 6

_BUTTON_MAP = (
    (BUTTON_LEFT, vm.VMMOUSE_LEFT_BUTTON),
    (BUTTON_RIGHT, vm.VMMOUSE_RIGHT_BUTTON),
    (BUTTON_MIDDLE, vm.VMMOUSE_MIDDLE_BUTTON),
)


class Vmmouse:
    def __init__(self, vmport: Vmport, notify_aux: Callable[[], None]) -> None:
        """Register commands 39..41 on ``vmport``. ``notify_aux`` is QEMU's i8042 link:
        QEMU refuses to realize vmmouse without it, so it is mandatory here too."""
        self._notify_aux = notify_aux
        self._queue: deque[int] = deque()
        self._status = STATUS_DISABLED
        self._absolute = False
        #: Host events dropped because the queue was (nearly) full; diagnostics only.
        self.dropped = 0
        for cmd in (vm.BDOOR_CMD_ABSPOINTER_DATA, vm.BDOOR_CMD_ABSPOINTER_STATUS,
                    vm.BDOOR_CMD_ABSPOINTER_COMMAND):
            vmport.register(cmd, self._backdoor)

    # -- host side ----------------------------------------------------------------------

    @property
    def absolute(self) -> bool:
        """The mode the guest asked for (what ``query-mice`` reports)."""
        return self._absolute

    @property
    def enabled(self) -> bool:
        """Whether host events are accepted (QEMU: the input handler is installed)."""
        return self._status == STATUS_ENABLED

    @property
    def status(self) -> int:
        return self._status

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        """Machine reset: empty queue, disabled until the guest's next READ_ID. The mode
        is kept, as QEMU keeps it."""
        self._queue.clear()
        self._status = STATUS_DISABLED

    def queue_event(self, x: int, y: int, dz: int, buttons: int) -> bool:
        """Queue one host pointer event; returns whether it was queued.

        In absolute mode x and y are positions in 0..0x7FFF (clamped) and are doubled to
        the guest's 0..0xFFFE; in relative mode they are signed deltas stored as 32-bit
        two's complement, unscaled. ``buttons`` uses :mod:`pointer`'s bits.
        """
        if not self.enabled:
            return False
        if len(self._queue) > vm.VMMOUSE_QUEUE_SIZE - PACKET_DWORDS:
            self.dropped += 1
            return False
        word0 = 0
        for host_bit, guest_bit in _BUTTON_MAP:
            if buttons & host_bit:
                word0 |= guest_bit
        if self._absolute:
            x = min(max(x, 0), ABS_MAX) << 1
            y = min(max(y, 0), ABS_MAX) << 1
        else:
            word0 |= vm.VMMOUSE_RELATIVE_PACKET
        self._queue.extend((word0, x & MASK32, y & MASK32, dz & MASK32))
        self._notify_aux()
        return True

    # -- guest side ---------------------------------------------------------------------

    def _backdoor(self, regs: VmportRegs) -> int:
        # vmport dispatched on ECX's low byte; vmmouse looks at 16 bits, so e.g. 0x0128
        # reaches this handler but is not STATUS.
        cmd = regs.ecx & 0xFFFF
        if cmd == vm.BDOOR_CMD_ABSPOINTER_STATUS:
            regs.eax = (self._status << 16) | len(self._queue)
        elif cmd == vm.BDOOR_CMD_ABSPOINTER_COMMAND:
            self._command(regs.ebx)
        elif cmd == vm.BDOOR_CMD_ABSPOINTER_DATA:
            self._data(regs, regs.ebx)
        return regs.eax

    def _command(self, sub: int) -> None:
        if sub == vm.VMMOUSE_READ_ID:
            if len(self._queue) < vm.VMMOUSE_QUEUE_SIZE:
                self._queue.append(vm.VMMOUSE_VERSION)
                self._status = STATUS_ENABLED
        elif sub == vm.VMMOUSE_REQUEST_ABSOLUTE:
            self._request_mode(True)
        elif sub == vm.VMMOUSE_REQUEST_RELATIVE:
            self._request_mode(False)
        elif sub == vm.VMMOUSE_DISABLE:
            # The queue is deliberately kept: QEMU does not flush it either.
            self._status = STATUS_DISABLED

    def _request_mode(self, absolute: bool) -> None:
        # QEMU changes modes only while its handler is installed.
        if self._status == STATUS_ENABLED:
            self._absolute = absolute

    def _data(self, regs: VmportRegs, n: int) -> None:
        if n == 0 or n > MAX_DATA_DWORDS or n > len(self._queue):
            # A driver out of step with the queue: disable until it starts over.
            self._status = STATUS_DISABLED
            return
        words = [self._queue.popleft() for _ in range(n)]
        names = ("eax", "ebx", "ecx", "edx", "esi", "edi")
        for name, word in zip(names, words, strict=False):
            setattr(regs, name, word)
