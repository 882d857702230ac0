"""A running domain's life as other threads see it: pause, unpause, shut down, destroy.

The vCPU threads consult it between runs: a pause kicks every vCPU out of the backend and
parks it until unpause, at an instruction boundary the backend chose (a kick, or the next
exit). Shutdown and destroy end the run with a reason, from any thread: the toolstack
socket, the control socket (a device model's XEN_DMOP_remote_shutdown) or QMP via it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hvmport.abi import dm_op as dmop


class Ending(enum.Enum):
    """Why a run ended, as the toolstack acts on it (xl's on_poweroff/on_reboot/on_crash)."""

    POWEROFF = "poweroff"   # the guest halted, exited through isa-debug-exit, or was powered off
    REBOOT = "reboot"
    CRASH = "crash"         # a guest fault, a domain crash, a device model's crash request
    DESTROY = "destroy"     # the toolstack destroyed it
    TIMEOUT = "timeout"
    HOST_ERROR = "host-error"


#: XEN_DMOP_remote_shutdown reasons, as endings. Suspend has no image to save here, so it
#: ends the domain like a power-off; the watchdog is a crash, as its default action is.
SHUTDOWN_ENDINGS = {
    dmop.SHUTDOWN_poweroff: Ending.POWEROFF,
    dmop.SHUTDOWN_reboot: Ending.REBOOT,
    dmop.SHUTDOWN_suspend: Ending.POWEROFF,
    dmop.SHUTDOWN_crash: Ending.CRASH,
    dmop.SHUTDOWN_watchdog: Ending.CRASH,
}


@dataclass(frozen=True, slots=True)
class EndRequest:
    ending: Ending
    reason: str


class Lifecycle:
    """Thread-safe; ``attach`` connects it to a run, which may happen after requests."""

    def __init__(self, *, paused: bool = False) -> None:
        self._cond = threading.Condition()
        self._paused = paused
        self._ending = False
        self._kick_all: Callable[[], None] | None = None
        self._end: Callable[[EndRequest], None] | None = None
        self._pending_end: EndRequest | None = None
        #: Called with "paused" or "running" on every change, outside the lock.
        self.on_change: list[Callable[[str], None]] = []

    # -- requests, from any thread --------------------------------------------------------

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    def pause(self) -> None:
        with self._cond:
            if self._paused or self._ending:
                return
            self._paused = True
            kick = self._kick_all
        if kick is not None:
            kick()
        self._changed("paused")

    def unpause(self) -> None:
        with self._cond:
            if not self._paused:
                return
            self._paused = False
            self._cond.notify_all()
        self._changed("running")

    def shutdown(self, reason: int, who: str) -> None:
        ending = SHUTDOWN_ENDINGS.get(reason, Ending.CRASH)
        self.end(EndRequest(ending, f"{ending.value} requested by {who}"))

    def destroy(self, who: str = "the toolstack") -> None:
        self.end(EndRequest(Ending.DESTROY, f"destroyed by {who}"))

    def end(self, request: EndRequest) -> None:
        """End the run; between runs (a restart), end the next one as soon as it starts."""
        with self._cond:
            end = self._end
            if end is None:
                self._pending_end = self._pending_end or request
                return
        end(request)

    # -- the run's side -------------------------------------------------------------------

    def attach(self, kick_all: Callable[[], None], end: Callable[[EndRequest], None]) -> None:
        with self._cond:
            self._kick_all = kick_all
            self._end = end
            self._ending = False
            pending, self._pending_end = self._pending_end, None
        if pending is not None:
            end(pending)

    def finishing(self) -> None:
        """The run is ending: park no vCPU any more (and release the parked ones)."""
        with self._cond:
            self._ending = True
            self._cond.notify_all()

    def detach(self) -> None:
        """The run is over; requests from now on are for the next one."""
        with self._cond:
            self._ending = True
            self._kick_all = None
            self._end = None
            self._cond.notify_all()

    def wait_while_paused(self) -> bool:
        """Park the calling vCPU while paused; False once the run is ending."""
        with self._cond:
            while self._paused and not self._ending:
                self._cond.wait()
            return not self._ending

    def _changed(self, state: str) -> None:
        for listener in list(self.on_change):
            listener(state)
