"""The one exception hierarchy of hvmport.

Every error says whose fault it is, because the answer decides what happens next:

* ``GuestFault`` — the guest did something a real machine would not survive (triple fault,
  an instruction the CPU backend cannot run). Only that domain ends.
* ``DeviceModelFault`` — a device model broke the ioreq protocol (state moved backwards,
  fields rewritten, ring pointers corrupted, died or hung). Only that domain ends.
* ``ConfigError`` — the user's configuration or command line is invalid. Nothing starts.
* ``HostError`` — this machine cannot do what was asked (no usable ``/dev/kvm``, a missing
  tool, memory the backend cannot provide). Nothing starts, or the run stops cleanly.
* ``DmOpError`` — a ``dm_op`` was refused, with Xen's errno; raised on the device-model side
  by the client library, never inside the hypervisor.
"""

from __future__ import annotations

import errno as _errno


class HvmportError(Exception):
    """Base of every error hvmport raises on purpose."""

    #: Who is to blame, in one word; printed by the CLI.
    party = "hvmport"


class GuestFault(HvmportError):
    party = "guest"


class DeviceModelFault(HvmportError):
    party = "device model"


class ConfigError(HvmportError):
    """Invalid configuration; carries the location when it came from a file."""

    party = "configuration"

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        where = ""
        if path is not None:
            where = path
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(where + message)


class HostError(HvmportError):
    party = "host"


class DmOpError(HvmportError):
    """A dm_op refused by the hypervisor, with the (positive) errno Xen would give."""

    party = "device model"

    def __init__(self, op: str, err: int) -> None:
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{op}: -{name}")
