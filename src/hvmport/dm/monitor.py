"""The device model's QMP commands: queries and pointer input, as QEMU names them.

``input-send-event`` follows QEMU's input layer: a command's events update the pointer
state (absolute axes in 0..0x7FFF, buttons, relative motion, wheel) and end with one sync,
which becomes one vmmouse packet when the guest has enabled vmmouse (absolute positions are
doubled to 0..0xFFFE there), and PS/2 mouse motion otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

from hvmport import __version__
from hvmport.dm.devices.i8042 import I8042
from hvmport.dm.devices.pointer import ABS_MAX, BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.qmp import QEMU_VERSION, Handler, Json, QmpError, check_args

BUTTONS = {"left": BUTTON_LEFT, "right": BUTTON_RIGHT, "middle": BUTTON_MIDDLE}
WHEEL = {"wheel-up": -1, "wheel-down": 1}
MAX_EVENTS = 1024


class Machine(Protocol):
    """The domain as the device model may drive it (pause, power)."""

    def pause(self) -> None: ...

    def unpause(self) -> None: ...

    def power_off(self) -> None: ...


#: Sends a QMP event (name, data) to every negotiated client.
Emit = Callable[[str, "Json | None"], None]


class Monitor:
    def __init__(self, vmmouse: Vmmouse | None, i8042: I8042 | None,
                 machine: Machine | None = None, emit: Emit | None = None) -> None:
        self.vmmouse = vmmouse
        self.i8042 = i8042
        self.machine = machine
        self.emit: Emit = emit or (lambda name, data: None)
        self.x = 0
        self.y = 0
        self.buttons = 0
        self.running = True
        #: Set once the domain is shutting down (the device model leaves after replying).
        self.shutting_down = False
        self._deferred: list[Callable[[], None]] = []

    def commands(self) -> dict[str, Handler]:
        return {
            "query-version": self.query_version,
            "query-status": self.query_status,
            "query-mice": self.query_mice,
            "input-send-event": self.input_send_event,
            "stop": self.stop,
            "cont": self.cont,
            "system_powerdown": self.system_powerdown,
            "quit": self.quit,
        }

    def query_version(self, args: Json) -> Json:
        check_args(args, {})
        return {"qemu": dict(QEMU_VERSION), "package": f"hvmport {__version__}"}

    def query_status(self, args: Json) -> Json:
        check_args(args, {})
        status = ("shutdown" if self.shutting_down
                  else "running" if self.running else "paused")
        return {"status": status, "singlestep": False, "running": self.running}

    def _machine(self) -> Machine:
        if self.machine is None:
            raise QmpError("this device model cannot control the domain")
        if self.shutting_down:
            raise QmpError("the domain is shutting down")
        return self.machine

    def stop(self, args: Json) -> None:
        check_args(args, {})
        machine = self._machine()
        if self.running:
            machine.pause()
            self.running = False
            self.emit("STOP", None)

    def cont(self, args: Json) -> None:
        check_args(args, {})
        machine = self._machine()
        if not self.running:
            machine.unpause()
            self.running = True
            self.emit("RESUME", None)

    def system_powerdown(self, args: Json) -> None:
        """There is no ACPI here to tell the guest, so the domain powers off at once, as a
        guest that obeys the power button would."""
        check_args(args, {})
        machine = self._machine()
        self.emit("POWERDOWN", None)
        self._shutdown(machine, guest=True, reason="guest-shutdown")

    def quit(self, args: Json) -> None:
        check_args(args, {})
        self._shutdown(self._machine(), guest=False, reason="host-qmp-quit")

    def _shutdown(self, machine: Machine, *, guest: bool, reason: str) -> None:
        self.shutting_down = True
        self.emit("SHUTDOWN", {"guest": guest, "reason": reason})
        # After the reply: powering off ends this process, and the client deserves its
        # answer first.
        self._deferred.append(machine.power_off)

    def run_deferred(self) -> None:
        todo, self._deferred = self._deferred, []
        for action in todo:
            action()

    def domain_gone(self) -> None:
        """The hypervisor ended the domain (the guest powered off, or it crashed)."""
        if not self.shutting_down:
            self.shutting_down = True
            self.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})

    def query_mice(self, args: Json) -> list[Json]:
        check_args(args, {})
        mice: list[Json] = []
        if self.vmmouse is not None:
            mice.append({"name": "vmmouse", "index": 1, "current": self.vmmouse.enabled,
                         "absolute": self.vmmouse.absolute})
        if self.i8042 is not None:
            mice.append({"name": "QEMU PS/2 Mouse", "index": 0,
                         "current": not mice or not mice[0]["current"], "absolute": False})
        return mice

    def input_send_event(self, args: Json) -> None:
        check_args(args, {"device": str, "head": int, "events": list}, ("events",))
        events: list[Any] = args["events"]
        if not events or len(events) > MAX_EVENTS:
            raise QmpError(f"'events' must hold 1..{MAX_EVENTS} events")
        dx = dy = dz = 0
        keys = bytearray()
        for ev in events:
            if not isinstance(ev, dict) or set(ev) != {"type", "data"} \
                    or not isinstance(ev["data"], dict):
                raise QmpError("each event must be {'type': ..., 'data': {...}}")
            kind, data = ev["type"], ev["data"]
            if kind == "abs" or kind == "rel":
                check_args(data, {"axis": str, "value": int}, ("axis", "value"))
                if data["axis"] not in ("x", "y"):
                    raise QmpError(f"Invalid parameter 'axis': {data['axis']!r}")
                value = int(data["value"])
                if kind == "abs":
                    value = min(max(value, 0), ABS_MAX)
                    if data["axis"] == "x":
                        self.x = value
                    else:
                        self.y = value
                elif data["axis"] == "x":
                    dx += value
                else:
                    dy += value
            elif kind == "btn":
                check_args(data, {"button": str, "down": bool}, ("button", "down"))
                button = data["button"]
                if button in WHEEL:
                    if data["down"]:
                        dz += WHEEL[button]
                elif button in BUTTONS:
                    if data["down"]:
                        self.buttons |= BUTTONS[button]
                    else:
                        self.buttons &= ~BUTTONS[button]
                else:
                    raise QmpError(f"Invalid parameter 'button': {button!r}")
            elif kind == "key":
                keys += self._scancode(data)
            else:
                raise QmpError(f"Invalid parameter 'type': {kind!r}")
        self._sync(dx, dy, dz, bytes(keys))

    @staticmethod
    def _scancode(data: Json) -> bytes:
        check_args(data, {"key": dict, "down": bool}, ("key", "down"))
        key = data["key"]
        if key.get("type") != "number" or not isinstance(key.get("data"), int) \
                or isinstance(key.get("data"), bool) or not 0 < key["data"] < 0x100:
            raise QmpError("only {'type': 'number', 'data': SCANCODE} keys are supported")
        code = key["data"]
        return bytes([code if data["down"] else code | 0x80])

    def _sync(self, dx: int, dy: int, dz: int, keys: bytes) -> None:
        if keys and self.i8042 is not None:
            self.i8042.queue_key(keys)
        vm = self.vmmouse
        if vm is not None and vm.enabled:
            if vm.absolute:
                vm.queue_event(self.x, self.y, dz, self.buttons)
            else:
                vm.queue_event(dx, dy, dz, self.buttons)
        elif self.i8042 is not None:
            self.i8042.mouse_event(dx, dy, dz, self.buttons)


def guestinfo_commands(guestinfo: MutableMapping[str, str],
                       stats: Callable[[], Json] | None = None) -> dict[str, Handler]:
    """hvmport's GuestRPC commands: the guestinfo store the guest reaches with ``info-get``
    and ``info-set guestinfo.KEY``. Keys are given without the ``guestinfo.`` prefix."""

    def guestinfo_set(args: Json) -> None:
        check_args(args, {"key": str, "value": str}, ("key", "value"))
        key, value = args["key"], args["value"]
        if not key or key.startswith("guestinfo."):
            raise QmpError("'key' is the name after 'guestinfo.', and not empty")
        guestinfo[key] = value

    def guestinfo_get(args: Json) -> Json:
        check_args(args, {"key": str})
        if "key" in args:
            key = args["key"]
            if key not in guestinfo:
                raise QmpError(f"guestinfo.{key} is not set")
            return {"key": key, "value": guestinfo[key]}
        return {"values": dict(guestinfo)}

    def query_guestrpc(args: Json) -> Json:
        check_args(args, {})
        return stats() if stats is not None else {}

    return {"hvmport-guestinfo-set": guestinfo_set, "hvmport-guestinfo-get": guestinfo_get,
            "query-hvmport-guestrpc": query_guestrpc}
