"""The xl-shaped verbs end to end: real monitor and device-model processes, real sockets,
the real qemu.qmp client, a console driven through a pseudo-terminal as a person would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.xltools import Console, Xl, abs_move, alive, qmp


def test_create_list_console_pointer_destroy(xl: Xl, backend: str) -> None:
    """The issue's done-when: a vmware_port domain, its console, its absolute pointer."""
    cfg = xl.cfg("mouse", guest("vmmouse"), "vmware_hwver = 7", "vmware_port = 1",
                 'cmdline = "pointer=2"', f'cpu_backend = "{backend}"',
                 'on_poweroff = "preserve"')
    trace = xl.tmp / "mouse.trace"
    xl.create(cfg, "--trace", str(trace))
    table = xl("list").stdout.splitlines()
    assert table[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    row = table[1].split()
    assert row[0] == "mouse" and row[2:4] == ["64", "1"] and row[4] == "r-----"
    info = xl.domain("mouse")
    assert info["backend"] == backend
    assert info["config"]["vmware_port"] is True
    # libxl's vmport=on reached the device model's machine arguments.
    dm_cmdline = Path(f"/proc/{info['dm_pids'][0]}/cmdline").read_bytes().split(b"\0")
    assert b"xenfv,vmport=on" in dm_cmdline

    console = Console(xl, "mouse")
    console.read_until(b"waiting for 2 pointer packets")
    answers, _ = qmp(info["qmp"], ("query-mice", None), abs_move(0x4000, 0x1234),
                     abs_move(0x7FFF, 0))
    assert {"name": "vmmouse", "index": 1, "current": True, "absolute": True} in answers[0]
    out = console.read_until(b"vmmouse done")
    assert b"p32 packet buttons=00000000 x=00008000 y=00002468 z=00000000" in out
    assert b"p32 packet buttons=00000000 x=0000fffe y=00000000 z=00000000" in out

    # The guest powered off; on_poweroff="preserve" keeps it listed as shut down.
    deadline = time.monotonic() + 30
    while xl.domain("mouse")["state"] != "shutdown":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert xl("list", "mouse").stdout.splitlines()[1].split()[4] == "---s--"

    # The run's trace, from both processes: GETVERSION answered by the hypervisor, the
    # vmmouse commands by the device model.
    summary = xl("trace", "summary", str(trace), "--json")
    assert summary.returncode == 0, summary.stderr
    doc = json.loads(summary.stdout)
    rows = {(c["name"], c["route"]): c["count"] for c in doc["commands"]}
    status_lines = out.count(b"p32 STATUS.")
    assert rows[("GETVERSION", "hypervisor")] == 1
    assert rows[("ABSPOINTER_STATUS", "round trip")] >= status_lines + 2
    assert (rows[("ABSPOINTER_STATUS", "device model")]
            == rows[("ABSPOINTER_STATUS", "round trip")])
    assert {p["role"] for p in doc["processes"]} == {"hypervisor", "device-model"}
    chrome = xl.tmp / "mouse.json"
    assert xl("trace", "export", str(trace), "--chrome", str(chrome)).returncode == 0
    events = json.loads(chrome.read_text())["traceEvents"]
    assert {e["name"] for e in events if e["ph"] == "X"} >= {
        "handled GETVERSION (10)", "dm ABSPOINTER_STATUS (40)"}
    assert xl("destroy", "mouse").returncode == 0
    assert console.close() == 0  # the console ends with its domain
    assert xl.domains() == []
    assert xl.leftovers() == []
    assert not alive(info["pid"]) and not any(alive(p) for p in info["dm_pids"])


def test_console_input_pause_unpause_and_qmp_stop_cont(xl: Xl, backend: str) -> None:
    xl.create(xl.cfg("echo", guest("echo"), f'cpu_backend = "{backend}"'))
    console = Console(xl, "echo")
    console.read_until(b"echo: ready")
    console.type(b"ab")
    console.read_until(b"<a><b>")

    assert xl("pause", "echo").returncode == 0
    assert xl.domain("echo")["state"] == "paused"
    assert xl("list").stdout.splitlines()[1].split()[4] == "--p---"
    console.type(b"c")
    time.sleep(1.0)
    assert b"<c>" not in console.out  # a paused guest does not run
    assert xl("unpause", "echo").returncode == 0
    console.read_until(b"<c>")

    path = xl.domain("echo")["qmp"]
    answers, _ = qmp(path, ("stop", None), ("query-status", None))
    assert answers[1]["status"] == "paused" and answers[1]["running"] is False
    assert xl.domain("echo")["state"] == "paused"
    answers, _ = qmp(path, ("cont", None), ("query-status", None))
    assert answers[1]["status"] == "running"
    assert xl.domain("echo")["state"] == "running"

    console.type(b"q")
    console.read_until(b"echo: bye")
    assert console.close() == 0
    xl.wait_gone("echo")  # on_poweroff = destroy, the default
    assert xl.leftovers() == []


def test_qmp_events_reach_every_client_and_powerdown_ends_the_domain(xl: Xl) -> None:
    xl.create(xl.cfg("ev", guest("echo")))
    path = xl.domain("ev")["qmp"]
    # A second client hears what the first one causes.
    listener = subprocess.Popen(
        [sys.executable, "-c", _LISTENER, path], stdout=subprocess.PIPE, text=True,
        env=xl.env)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        qmp(path, ("stop", None), ("cont", None), ("system_powerdown", None))
        seen = listener.communicate(timeout=30)[0].split()
    finally:
        listener.kill()
    assert seen == ["STOP", "RESUME", "POWERDOWN", "SHUTDOWN"]
    xl.wait_gone("ev")


_LISTENER = """
import asyncio, contextlib, sys
from qemu.qmp import QMPClient
async def go():
    c = QMPClient("listener")
    await c.connect(sys.argv[1])
    print("listening", flush=True)
    async for ev in c.events:
        print(ev["event"], flush=True)
        if ev["event"] == "SHUTDOWN":
            break
    with contextlib.suppress(EOFError):
        await c.disconnect()
asyncio.run(go())
"""


def test_create_paused_runs_nothing_until_unpaused(xl: Xl) -> None:
    xl.create(xl.cfg("held", guest("echo")), "-p")
    assert xl.domain("held")["state"] == "paused"
    console = Console(xl, "held")
    time.sleep(1.0)
    with pytest.raises(AssertionError):
        console.read_until(b"echo begin", timeout=0.5)
    assert xl("unpause", "held").returncode == 0
    console.read_until(b"echo: ready")
    assert xl("destroy", "held").returncode == 0
    console.close()
    assert xl.leftovers() == []


def test_foreground_create_returns_the_guests_status(xl: Xl, backend: str) -> None:
    cfg = xl.cfg("fg", guest("vmmouse"), "vmware_hwver = 7", 'serial = "stdio"',
                 f'cpu_backend = "{backend}"', 'debugcon = "file:fg.debug"')
    res = xl("create", "-F", str(cfg))
    assert res.returncode == 1, res.stderr  # isa-debug-exit 0 -> (0 << 1) | 1
    assert "p32 vmmouse end" in (xl.tmp / "fg.debug").read_text()
    assert xl.leftovers() == []


def test_a_killed_monitor_leaves_a_stale_entry_that_is_cleaned(xl: Xl) -> None:
    xl.create(xl.cfg("victim", guest("echo")))
    info = xl.domain("victim")
    os.kill(info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(info["pid"]) or any(alive(p) for p in info["dm_pids"]):
        assert time.monotonic() < deadline, "monitor or device model survived"
        time.sleep(0.05)
    assert xl.domains() == []  # the stale entry is recognised and removed
    assert xl.leftovers() == []
    xl.create(xl.cfg("victim", guest("echo")))  # and its name is free again
    assert xl("destroy", "victim").returncode == 0


def test_domains_are_addressed_by_name_or_id_and_names_are_unique(xl: Xl) -> None:
    cfg = xl.cfg("one", guest("echo"))
    xl.create(cfg)
    again = xl("create", str(cfg))
    assert again.returncode == 2
    assert "domain 'one' already exists" in again.stderr
    domid = str(xl.domain("one")["domid"])
    assert xl("pause", domid).returncode == 0
    assert xl.domain("one")["state"] == "paused"
    assert xl("destroy", domid).returncode == 0
    missing = xl("destroy", "one")
    assert missing.returncode == 2 and "no domain 'one'" in missing.stderr


def test_config_errors_stop_create_with_the_position(xl: Xl) -> None:
    cfg = xl.cfg("bad", guest("echo"), "memory = 0x")
    res = xl("create", str(cfg))
    assert res.returncode == 2
    assert f"{cfg}:4:" in res.stderr
    res = xl("create", str(xl.cfg("bad2", guest("echo"))), "vcpus=none")
    assert res.returncode == 2 and "<command line>:1:7: vcpus: expected a number" in res.stderr
    assert xl.leftovers() == []


def test_a_kernel_the_loader_refuses_fails_create_cleanly(xl: Xl, tmp_path: Path) -> None:
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"not a kernel at all" * 100)
    res = xl("create", str(xl.cfg("junk", str(junk))))
    assert res.returncode == 2
    assert "did not start" in res.stderr and "Multiboot" in res.stderr
    assert xl.domains() == [] and xl.leftovers() == []


def test_restart_runs_the_domain_again_with_the_same_console_and_id(xl: Xl) -> None:
    xl.create(xl.cfg("again", guest("echo"), 'on_poweroff = "restart"'))
    domid = xl.domain("again")["domid"]
    console = Console(xl, "again")
    console.read_until(b"echo: ready")
    console.type(b"q")
    # The same console carries the second boot.
    console.read_until(b"echo: bye\r\np32 echo begin\necho: ready")
    info = xl.domain("again")
    assert info["domid"] == domid and info["state"] == "running"
    console.type(b"x")
    console.read_until(b"<x>")
    assert xl("destroy", "again").returncode == 0
    console.close()


def test_a_domain_restarting_in_a_loop_is_left_crashed(xl: Xl) -> None:
    # vmmouse ends at once: with on_poweroff="restart" it would boot forever.
    xl.create(xl.cfg("loop", guest("vmmouse"), "vmware_hwver = 7",
                     'on_poweroff = "restart"'))
    deadline = time.monotonic() + 60
    while xl.domain("loop")["state"] != "crashed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert xl("list", "loop").stdout.splitlines()[1].split()[4] == "----c-"
    log = (xl.run_dir / "logs" / "loop.log").read_text()
    assert log.count("poweroff: isa-debug-exit") == 5
    assert "restarting too fast" in log
    assert xl("destroy", "loop").returncode == 0
    assert xl.leftovers() == []


def test_guestinfo_from_the_config_reaches_the_guest(xl: Xl, backend: str) -> None:
    cfg = xl.cfg("rpc", guest("guestrpc"), "vmware_hwver = 7", f'cpu_backend = "{backend}"',
                 'guestinfo = ["x=from the config"]', 'debugcon = "file:rpc.debug"')
    assert xl("create", "-F", str(cfg)).returncode == 1
    lines = (xl.tmp / "rpc.debug").read_text().splitlines()
    assert any(ln.endswith("rpc hb 1 from the config") for ln in lines), lines
