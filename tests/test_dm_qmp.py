"""QMP: the sans-io session, the device model's commands, and the real qemu.qmp client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvmport.abi import vmware as vm
from hvmport.dm.devices.i8042 import I8042
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.devices.vmport import Vmport, VmportRegs
from hvmport.dm.monitor import Monitor
from hvmport.dm.qmp import MAX_PENDING, QmpError, QmpSession, check_args, event
from hvmport.dm.qmp_server import QmpServer


def replies(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.decode().split("\r\n") if line]


def session() -> QmpSession:
    return QmpSession({"echo": lambda a: a, "fail": _fail})


def _fail(args: dict[str, object]) -> None:
    raise QmpError("it failed")


def test_greeting_and_negotiation() -> None:
    s = session()
    greeting = json.loads(s.greeting())
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert "qemu" in greeting["QMP"]["version"]
    out = replies(s.receive(b'{"execute": "echo", "id": 1}'))
    assert out == [{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities "
                              "negotiation with 'qmp_capabilities'"}, "id": 1}]
    assert replies(s.receive(b'{"execute": "qmp_capabilities"}')) == [{"return": {}}]
    again = replies(s.receive(b'{"execute": "qmp_capabilities"}'))
    assert again[0]["error"]["class"] == "CommandNotFound"  # type: ignore[index]


def test_commands_ids_errors() -> None:
    s = session()
    s.receive(b'{"execute": "qmp_capabilities"}')
    out = replies(s.receive(b'{"execute": "echo", "arguments": {"a": 1}, "id": "x"}'
                            b'{"execute": "fail"}{"execute": "nope", "id": 2}'))
    assert out[0] == {"return": {"a": 1}, "id": "x"}
    assert out[1] == {"error": {"class": "GenericError", "desc": "it failed"}}
    assert out[2]["error"]["class"] == "CommandNotFound" and out[2]["id"] == 2  # type: ignore[index]


def test_split_input_and_bad_json_resync() -> None:
    s = session()
    assert s.receive(b'{"execute": "qmp_cap') == b""
    assert replies(s.receive(b'abilities", "id": "{\\"}"}')) == [{"return": {}, "id": '{"}'}]
    out = replies(s.receive(b'{"execute": oops}\n{"execute": "echo"}\n'))
    assert out[0]["error"]["class"] == "GenericError"  # type: ignore[index]
    assert out[1] == {"return": {}}
    out = replies(s.receive(b'\xff junk junk\n{"execute": "echo"}'))
    assert out == [{"return": {}}]
    assert replies(s.receive(b"42\n"))[0]["error"]["class"] == "GenericError"  # type: ignore[index]


def test_unknown_members_and_oversized_input() -> None:
    s = session()
    out = replies(s.receive(b'{"execute": "qmp_capabilities", "extra": 1}'))
    assert "unexpected" in out[0]["error"]["desc"]  # type: ignore[index]
    out = replies(s.receive(b'{"execute": "echo", "arguments": "' + b"a" * (MAX_PENDING + 10)))
    assert out and out[0]["error"]["desc"] == "input too long"  # type: ignore[index]


def test_check_args() -> None:
    check_args({"a": 1}, {"a": int})
    for bad in ({"b": 1}, {"a": "x"}, {"a": True}):
        with pytest.raises(QmpError):
            check_args(bad, {"a": int})
    with pytest.raises(QmpError):
        check_args({}, {"a": int}, ("a",))


def test_event_shape() -> None:
    msg = json.loads(event("STOP", now=12.5))
    assert msg == {"event": "STOP", "timestamp": {"seconds": 12, "microseconds": 500000}}


def _backdoor(port: Vmport, cmd: int, ebx: int = 0) -> VmportRegs:
    regs = VmportRegs(vm.BDOOR_MAGIC, ebx, cmd, vm.BDOOR_PORT, 0, 0)
    regs.eax = port.handle(regs, False, 4)
    return regs


@pytest.fixture
def devices() -> tuple[Vmport, Vmmouse, I8042, Monitor]:
    i8042 = I8042(lambda line, level: None)
    port = Vmport()
    mouse = Vmmouse(port, i8042.fake_aux_movement)
    return port, mouse, i8042, Monitor(mouse, i8042)


def test_query_mice_follows_the_guest(devices: tuple[Vmport, Vmmouse, I8042, Monitor]) -> None:
    port, _, _, mon = devices
    assert mon.query_mice({})[0] == {"name": "vmmouse", "index": 1, "current": False,
                                     "absolute": False}
    _backdoor(port, vm.BDOOR_CMD_ABSPOINTER_COMMAND, vm.VMMOUSE_READ_ID)
    _backdoor(port, vm.BDOOR_CMD_ABSPOINTER_COMMAND, vm.VMMOUSE_REQUEST_ABSOLUTE)
    assert mon.query_mice({})[0]["absolute"] is True


def test_input_send_event_builds_vmmouse_packets(
        devices: tuple[Vmport, Vmmouse, I8042, Monitor]) -> None:
    port, mouse, _, mon = devices
    _backdoor(port, vm.BDOOR_CMD_ABSPOINTER_COMMAND, vm.VMMOUSE_READ_ID)
    _backdoor(port, vm.BDOOR_CMD_ABSPOINTER_DATA, 1)
    _backdoor(port, vm.BDOOR_CMD_ABSPOINTER_COMMAND, vm.VMMOUSE_REQUEST_ABSOLUTE)
    mon.input_send_event({"events": [
        {"type": "abs", "data": {"axis": "x", "value": 0x4000}},
        {"type": "abs", "data": {"axis": "y", "value": 0x99999}},  # clamped to 0x7fff
        {"type": "btn", "data": {"button": "right", "down": True}},
        {"type": "btn", "data": {"button": "wheel-down", "down": True}},
    ]})
    assert mouse.queued == 4
    r = _backdoor(port, vm.BDOOR_CMD_ABSPOINTER_DATA, 4)
    assert (r.eax, r.ebx, r.ecx, r.edx) == (vm.VMMOUSE_RIGHT_BUTTON, 0x8000, 0xFFFE, 1)


@pytest.mark.parametrize("args", [
    {}, {"events": []}, {"events": [{"type": "abs"}]},
    {"events": [{"type": "abs", "data": {"axis": "z", "value": 1}}]},
    {"events": [{"type": "btn", "data": {"button": "thumb", "down": True}}]},
    {"events": [{"type": "tilt", "data": {}}]}, {"events": "abs"},
    {"events": [{"type": "key", "data": {"key": {"type": "qcode", "data": "a"},
                                         "down": True}}]},
])
def test_input_send_event_validation(devices: tuple[Vmport, Vmmouse, I8042, Monitor],
                                     args: dict[str, object]) -> None:
    with pytest.raises(QmpError):
        devices[3].input_send_event(args)


@pytest.fixture
def served(tmp_path: Path, devices: tuple[Vmport, Vmmouse, I8042, Monitor]
           ) -> Iterator[tuple[str, QmpServer]]:
    """A QmpServer polled from a thread, standing in for the device model's loop."""
    import select

    path = str(tmp_path / "qmp.sock")
    server = QmpServer(path, devices[3].commands(), max_clients=4)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            watch = server.watch()
            ready, _, _ = select.select(list(watch), [], [], 0.05)
            for fd in ready:
                watch[fd]()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield path, server
    stop.set()
    thread.join()
    server.close()


def test_real_qemu_qmp_client(served: tuple[str, QmpServer]) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    path, _ = served

    async def go() -> None:
        clients = [QMPClient(f"c{i}") for i in range(3)]
        for c in clients:
            await c.connect(path)
        version = await clients[0].execute("query-version")
        assert version["qemu"]["major"] == 7  # type: ignore[index]
        status = await clients[1].execute("query-status")
        assert status == {"status": "running", "singlestep": False, "running": True}
        with pytest.raises(ExecuteError):
            await clients[2].execute("no-such-command")
        with pytest.raises(ExecuteError):
            await clients[2].execute("input-send-event", {"events": []})
        for c in clients:
            await c.disconnect()

    asyncio.run(go())


def test_client_limit_and_server_survives(served: tuple[str, QmpServer]) -> None:
    import socket

    path, _ = served
    socks = []
    for _ in range(6):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.settimeout(2)
        socks.append(s)
    greeted = 0
    for s in socks:
        with contextlib.suppress(TimeoutError, ConnectionError):
            greeted += b"QMP" in s.recv(4096)
    assert greeted == 4
    for s in socks:
        s.close()
    from qemu.qmp.legacy import QEMUMonitorProtocol

    # The server notices the closed clients on its own thread: until it has, a newcomer
    # may still be over the limit and is turned away, which is what the limit is for.
    deadline = time.monotonic() + 10
    while True:
        qmp = QEMUMonitorProtocol(path)
        try:
            qmp.connect()
            break
        except Exception:
            qmp.close()
            assert time.monotonic() < deadline, "the server never took a client again"
            time.sleep(0.05)
    reply = qmp.cmd("query-status")
    assert reply["running"] is True, reply  # type: ignore[index]
    qmp.close()


class RecordingMachine:
    """The domain as the monitor drives it; records what it was asked, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def unpause(self) -> None:
        self.calls.append("unpause")

    def power_off(self) -> None:
        self.calls.append("power_off")


def test_stop_cont_quit_drive_the_domain_and_emit_events_in_order() -> None:
    machine = RecordingMachine()
    events: list[tuple[str, object]] = []
    mon = Monitor(None, None, machine=machine, emit=lambda n, d: events.append((n, d)))
    s = QmpSession(mon.commands())
    s.receive(b'{"execute": "qmp_capabilities"}')

    def run(cmd: str) -> dict[str, object]:
        (reply,) = replies(s.receive(json.dumps({"execute": cmd}).encode()))
        return reply

    assert run("stop") == {"return": {}}
    assert run("stop") == {"return": {}}  # already stopped: no second pause, no event
    assert run("query-status")["return"] == {"status": "paused", "singlestep": False,
                                             "running": False}
    assert run("cont") == {"return": {}}
    assert run("quit") == {"return": {}}
    # The power-off waits until the reply is on its way: it ends the device model.
    assert machine.calls == ["pause", "unpause"]
    mon.run_deferred()
    assert machine.calls == ["pause", "unpause", "power_off"]
    assert [e[0] for e in events] == ["STOP", "RESUME", "SHUTDOWN"]
    assert events[-1][1] == {"guest": False, "reason": "host-qmp-quit"}
    assert run("query-status")["return"]["status"] == "shutdown"  # type: ignore[index]
    assert run("cont")["error"]["class"] == "GenericError"  # type: ignore[index]


def test_without_a_machine_stop_is_a_clear_error() -> None:
    s = QmpSession(Monitor(None, None).commands())
    s.receive(b'{"execute": "qmp_capabilities"}')
    (reply,) = replies(s.receive(b'{"execute": "stop"}'))
    assert reply["error"] == {"class": "GenericError",
                              "desc": "this device model cannot control the domain"}
