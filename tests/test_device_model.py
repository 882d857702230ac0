"""The device-model process behind `hvmport run`, on KVM and Unicorn: answers compared with
QEMU's, pointer input over QMP, several vCPUs and servers, and faults contained."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hvmport.toolchain import assemble_flat
from tests import qemu_ref as qemu
from tests.conftest import Run, guest, hvmport_run
from tests.test_run import parse
from tests.xltools import Xl

MAGIC = "564d5868"

#: Where the hypervisor's Xen semantics differ from QEMU's in-process vmport (documented
#: in test_run.py): OUT never writes EAX, and a 2-byte IN replaces only AX.
DIFFERS_FROM_QEMU = {"GETRAMSIZE.out4", "GETRAMSIZE.in2", "STATUS.out4", "MESSAGE.in4"}

EXPECTED = {
    "GETRAMSIZE.in4": dict(eax="04000000", ebx="00001177"),  # 64 MiB, QEMU's 0x1177
    "GETBIOSUUID.in4": dict(eax="00000000", ebx="00000000", ecx="00000000", edx="00000000"),
    "GET_VCPU_INFO.in4": dict(eax="00000000"),  # no x2APIC, bit 31 clear
    "STEALCLOCK.in4": dict(eax="ffffffff"),  # no false "steal clock supported"
    "GETBUILDNUM.in4": dict(eax="ffffffff", ebx="11111111", esi="22222222"),
    "STATUS.disabled.in4": dict(eax="ffff0000"),
    "COMMAND.READ_ID.in4": dict(eax=MAGIC),
    "STATUS.after_read_id.in4": dict(eax="00000001"),
    "DATA.1.in4": dict(eax="3442554a"),
    "STATUS.empty.in4": dict(eax="00000000"),
    "STATUS.after_data0.in4": dict(eax="ffff0000"),  # DATA(0) disabled the mouse
    "STATUS.after_data7.in4": dict(eax="ffff0001"),
    "STATUS.queued_two.in4": dict(eax="00000002"),
    "DATA.2.in4": dict(eax="3442554a", ebx="3442554a"),
    "STATUS.hi16.in4": dict(eax="00000001", ecx="ffff0028"),
    "STATUS.after_disable.in4": dict(eax="ffff0001"),
}


@pytest.fixture(scope="module")
def vmmouse_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    from tests.conftest import kvm_unusable

    return {b: hvmport_run(tmp_path_factory.mktemp(b), "--backend", b, "--kernel",
                           guest("vmmouse"), "--memory", "64")
            for b in ("kvm", "unicorn") if not (b == "kvm" and kvm_unusable())}


def test_device_model_answers(vmmouse_runs: dict[str, Run], backend: str) -> None:
    run = vmmouse_runs[backend]
    assert run.status == 1, run.stderr
    res = parse(run.lines())
    for label, regs in EXPECTED.items():
        for reg, value in regs.items():
            assert res[("p32", label)][reg] == value, (label, reg, res[("p32", label)])


def test_device_model_matches_qemu(vmmouse_runs: dict[str, Run], backend: str) -> None:
    ref = qemu.run_multiboot(Path(guest("vmmouse")), memory_mib=64)
    assert ref.status == vmmouse_runs[backend].status == 1
    ours, theirs = parse(vmmouse_runs[backend].lines()), parse(ref.stable_lines)
    assert set(ours) == set(theirs)
    for key, regs in theirs.items():
        if key[1] not in DIFFERS_FROM_QEMU:
            assert ours[key] == regs, (key, ours[key], regs)
    # The two Xen semantics, checked rather than skipped.
    assert ours[("p32", "STATUS.out4")]["eax"] == MAGIC
    assert ours[("p32", "GETRAMSIZE.in2")]["eax"] == "564d0000"
    # hvmport's device model answers GuestRPC (QEMU has no command 30): OPEN of an RPCI
    # channel succeeds (SUCCESS in ECX's high half, channel 0 in EDX's) and EAX is left.
    assert ours[("p32", "MESSAGE.in4")]["ecx"] == "00010000"
    assert ours[("p32", "MESSAGE.in4")]["eax"] == MAGIC


def test_backends_agree(vmmouse_runs: dict[str, Run]) -> None:
    if len(vmmouse_runs) < 2:
        pytest.skip("needs both backends")
    assert vmmouse_runs["kvm"].lines() == vmmouse_runs["unicorn"].lines()


def test_battery_with_device_model_decodes_like_qemu(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("battery"))
    assert run.status == 1, run.stderr
    ours = parse(run.lines())
    ref = parse(qemu.run_multiboot(Path(guest("battery"))).stable_lines)
    # 0x010a is not a hypervisor command; the device model decodes 8 bits, as QEMU does.
    for mode in ("p32", "r16"):
        assert ours[(mode, "cmd_010a.in4")] == ref[(mode, "cmd_010a.in4")]
        assert ours[(mode, "cmd_ffff.in4")] == ref[(mode, "cmd_ffff.in4")]
    # ... and the registers go back into the 32-bit halves only (QEMU zeroes the rest).
    assert ours[("l64", "cmd_010a.in4")]["rbx"] == "b0b0b0b0564d5868"


def start_run(console: Path, *args: str) -> subprocess.Popen[str]:
    """`hvmport run` in the background, for tests that act while the guest runs."""
    return subprocess.Popen([sys.executable, "-m", "hvmport.cli", "run", "--debugcon",
                             str(console), "--timeout", "60", *args],
                            stderr=subprocess.PIPE, text=True)


def _inject(qmp_path: str, console: Path, moves: list[list[dict[str, object]]]) -> list[object]:
    from qemu.qmp import QMPClient

    async def go() -> list[object]:
        deadline = time.monotonic() + 30
        while "waiting for" not in (console.read_text() if console.exists() else ""):
            assert time.monotonic() < deadline, "guest never got ready"
            await asyncio.sleep(0.05)
        client = QMPClient("test")
        await client.connect(qmp_path)
        answers = [await client.execute("query-mice")]
        for events in moves:
            answers.append(await client.execute("input-send-event", {"events": events}))
        await client.disconnect()
        return answers

    return asyncio.run(go())


def abs_move(x: int, y: int) -> list[dict[str, object]]:
    return [{"type": "abs", "data": {"axis": "x", "value": x}},
            {"type": "abs", "data": {"axis": "y", "value": y}}]


def test_host_pointer_events_reach_the_guest(tmp_path: Path, backend: str) -> None:
    console, qmp_path = tmp_path / "con.txt", str(tmp_path / "qmp.sock")
    proc = start_run(console, "--backend", backend, "--kernel", guest("vmmouse"),
                     "--cmdline", "pointer=3", "--qmp", qmp_path)
    try:
        answers = _inject(qmp_path, console, [
            abs_move(0x4000, 0x1234),
            [{"type": "btn", "data": {"button": "left", "down": True}}, *abs_move(0x7FFF, 0)],
            [{"type": "btn", "data": {"button": "left", "down": False}}, *abs_move(0, 0x7FFF)],
        ])
        assert proc.wait(timeout=60) == 1, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    mice = answers[0]
    assert {"name": "vmmouse", "index": 1, "current": True, "absolute": True} in mice  # type: ignore[operator]
    packets = [ln for ln in console.read_text().splitlines() if ln.startswith("p32 packet")]
    # QEMU's input range 0..0x7fff, doubled to vmmouse's 0..0xfffe; left button = 0x20.
    assert packets == [
        "p32 packet buttons=00000000 x=00008000 y=00002468 z=00000000",
        "p32 packet buttons=00000020 x=0000fffe y=00000000 z=00000000",
        "p32 packet buttons=00000000 x=00000000 y=0000fffe z=00000000",
    ]


@pytest.mark.parametrize("vcpus", [2, 4])
def test_vcpus_get_their_own_registers_back_from_the_device_model(
        tmp_path: Path, backend: str, vcpus: int) -> None:
    from hvmport import guests

    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("smp", "flat32"),
                      "--mode", "32", "--load-addr", hex(guests.flat_address("flat32")),
                      "--vcpus", str(vcpus), "--smp-entry")
    assert run.status == 1, (run.console, run.stderr)
    assert f"smp done vcpus={vcpus} errors=0" in run.lines()


SECONDARY = """
    mov $0x510, %dx
    mov $0x42, %al
    out %al, %dx
    mov $0x513, %dx
    mov $0x99, %al
    out %al, %dx
    mov $0x510, %dx
    in %dx, %al
    out %al, $0xe9
    mov $0x513, %dx
    in %dx, %al
    out %al, $0xe9
    mov $0x514, %dx
    in %dx, %al
    out %al, $0xe9
    # A vmmouse STATUS through the primary device model still works beside it.
    mov $0x564d5868, %eax
    mov $40, %ecx
    mov $0x5658, %dx
    in %dx, %eax
    shr $16, %eax
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4
"""


def test_second_device_model_owns_its_ports(tmp_path: Path, backend: str) -> None:
    image = tmp_path / "secondary.bin"
    image.write_bytes(assemble_flat(SECONDARY, 32, 0x100000))
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", str(image), "--mode", "32",
                      "--secondary-dm", "0x510-0x513")
    assert run.status == 1, run.stderr
    # 0x510 and 0x513 read back from the secondary's scratch registers; 0x514 is nobody's;
    # STATUS's high half is 0xffff (disabled) from the primary.
    assert run.console.encode("latin-1") == bytes([0x42, 0x99, 0xFF, 0xFF])


HOSTILE_DM = textwrap.dedent("""
    import argparse, os, select, sys
    sys.path.insert(0, {src!r})
    from hvmport.abi import ioreq as abi
    from hvmport.dm.client import DeviceModel
    p = argparse.ArgumentParser()
    p.add_argument("--control"); p.add_argument("--domid", type=int)
    p.add_argument("--ready-fd", type=int); p.add_argument("--mode")
    a = p.parse_known_args()[0]
    c = DeviceModel(a.control); c.restrict(a.domid)
    sid = c.create_ioreq_server(a.domid, 2)
    page = c.map_resource(a.domid, sid, 1)[0]
    c.map_resource(a.domid, sid, 0x100)
    c.set_ioreq_server_state(a.domid, sid, True)
    port = int.from_bytes(page[24:28], "little")
    chan = c.bind_interdomain(a.domid, port)
    os.write(a.ready_fd, b"ready\\n")
    select.select([chan.fd], [], [])
    if a.mode == "garbage":
        page[0:32] = os.urandom(30) + bytes([0x07, 0x09])
    elif a.mode == "backwards":
        page[30] = (page[30] & 0xF0) | abi.STATE_IORESP_READY
        chan.notify()
        import time; time.sleep(0.05)
        page[30] = (page[30] & 0xF0) | abi.STATE_IOREQ_INPROCESS
    elif a.mode == "addr":
        page[0] ^= 1
        page[30] = (page[30] & 0xF0) | abi.STATE_IORESP_READY
    elif a.mode == "hang":
        page[30] = (page[30] & 0xF0) | abi.STATE_IOREQ_INPROCESS
    elif a.mode == "churn":
        import time
        end = time.monotonic() + 2
        while time.monotonic() < end:  # servers come and go under the guest's feet
            s2 = c.create_ioreq_server(a.domid, 2 | 4)
            c.map_io_range_to_ioreq_server(a.domid, s2, 0, 0x80, 0x80)
            c.set_ioreq_server_state(a.domid, s2, True)
            c.destroy_ioreq_server(a.domid, s2)
        sys.exit(0)
    chan.notify()
    select.select([c.fileno()], [], [])  # until the hypervisor goes away
""")

STATUS_LOOP = """
    mov $0x564d5868, %eax
    mov $40, %ecx
    mov $0x5658, %dx
    in %dx, %eax
    mov $0x72, %al          # 'r' on the debug console: the device model has answered
    out %al, $0xe9
1:  mov $0x564d5868, %eax
    mov $40, %ecx
    mov $0x5658, %dx
    in %dx, %eax
    jmp 1b
"""


@pytest.mark.parametrize(("mode", "reason"), [
    ("garbage", "unknown ioreq state"),
    ("addr", "changed ioreq addr"),
    ("hang", "did not answer"),
    ("churn", "domain crashed"),  # contained, whichever rule fires first; never a host error
])
def test_misbehaving_device_model_crashes_only_its_domain(
        tmp_path: Path, backend: str, mode: str, reason: str) -> None:
    script = tmp_path / "hostile_dm.py"
    script.write_text(HOSTILE_DM.format(src=str(Path(__file__).parents[1] / "src")))
    image = tmp_path / "loop.bin"
    image.write_bytes(assemble_flat(STATUS_LOOP, 32, 0x100000))
    started = time.monotonic()
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", str(image), "--mode", "32",
                      "--dm-program", f"{sys.executable} {script} --mode {mode}",
                      "--dm-timeout", "2")
    assert run.status == 6, run.stderr
    assert "domain crashed" in run.stderr and reason in run.stderr, run.stderr
    assert time.monotonic() - started < 30
    assert not _stray(str(script))  # this test's own script: other runs may be going on


def _stray(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if "pgrep" not in ln]


def test_device_model_killed_mid_request(tmp_path: Path, backend: str) -> None:
    image = tmp_path / "loop.bin"
    image.write_bytes(assemble_flat(STATUS_LOOP, 32, 0x100000))
    proc = start_run(tmp_path / "c.txt", "--backend", backend, "--kernel", str(image),
                     "--mode", "32")
    try:
        dm_pid = _wait_for_child(proc.pid, "hvmport.dm")
        console = tmp_path / "c.txt"
        deadline = time.monotonic() + 30
        while not (console.exists() and console.read_bytes()):
            assert time.monotonic() < deadline, "the device model never answered"
            time.sleep(0.05)
        time.sleep(0.1)  # the guest is hammering the device model by now
        os.kill(dm_pid, signal.SIGKILL)
        status = proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    assert status == 6, err
    assert f"pid {dm_pid}" in err and "SIGKILL" in err, err


def test_device_model_leaves_with_its_hypervisor(tmp_path: Path, backend: str) -> None:
    image = tmp_path / "loop.bin"
    image.write_bytes(assemble_flat(STATUS_LOOP, 32, 0x100000))
    proc = start_run(tmp_path / "c.txt", "--backend", backend, "--kernel", str(image),
                     "--mode", "32")
    dm_pid = _wait_for_child(proc.pid, "hvmport.dm")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(dm_pid):
        assert time.monotonic() < deadline, "device model outlived its hypervisor"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_for_child(parent: int, needle: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = (task / "children").read_text().split()
            for child in children:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                if needle.encode() in cmdline:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no {needle} child of {parent}")


def test_run_leaves_no_descriptors_or_mappings(backend: str) -> None:
    """In-process: a whole run with a device model gives back every fd and mapping."""
    from hvmport.hv.run import Image, RunConfig, run

    def counts() -> tuple[int, int]:
        fds = len(os.listdir("/proc/self/fd"))
        maps = sum("memfd:" in ln for ln in Path("/proc/self/maps").read_text().splitlines())
        return fds, maps

    kernel = Path(guest("vmmouse"))
    config = RunConfig(Image(kernel), backend=backend, console=None)
    assert run(config).status == 1  # warm-up: caches, lazily loaded libraries
    before = counts()
    for _ in range(3):
        assert run(RunConfig(Image(kernel), backend=backend, console=None)).status == 1
    assert counts() == before


IRQ_LINE = """
    # IRR of the master PIC before, after the i8042 raises IRQ 1, and after it lowers it.
    mov $0x0a, %al          # OCW3: read IRR
    out %al, $0x20
    in $0x20, %al
    out %al, $0xe9
    mov $0x60, %al          # i8042: write the command byte...
    out %al, $0x64
    mov $0x01, %al          # ... keyboard interrupt on
    out %al, $0x60
    mov $0xaa, %al          # controller self test: 0x55 lands in the output buffer
    out %al, $0x64
    in $0x20, %al
    out %al, $0xe9
    in $0x60, %al           # read 0x55: the line drops
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4
"""


def test_device_model_interrupt_lines_reach_the_pic(tmp_path: Path, backend: str) -> None:
    """set_isa_irq_level ends in KVM_IRQ_LINE (in-kernel PIC) or in our PIC (Unicorn)."""
    image = tmp_path / "irq.bin"
    image.write_bytes(assemble_flat(IRQ_LINE, 32, 0x100000))
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", str(image), "--mode", "32")
    assert run.status == 1, run.stderr
    before, after, data = run.console.encode("latin-1")
    assert before & 0x02 == 0
    assert after & 0x02 == 0x02
    assert data == 0x55


MMIO = """
    # Scratch MMIO registers of the device model at 0xfe000000: write, read back, read a
    # byte of it, then read an address nobody claims.
    mov $0xfe000000, %ebx
    movl $0x11223344, (%ebx)
    movl (%ebx), %eax
    call put4
    movb 3(%ebx), %al
    out %al, $0xe9
    mov $0xfd000000, %ebx
    movl (%ebx), %eax
    call put4
    # REP MOVSB from guest memory into the device (a data_is_ptr request, or single ones).
    mov $0x200000, %esi
    movl $0x44434241, (%esi)
    mov $0xfe000010, %edi
    mov $4, %ecx
    cld
    rep movsb
    mov $0xfe000010, %ebx
    movl (%ebx), %eax
    call put4
    mov $0, %al
    out %al, $0xf4
put4:
    mov $4, %ecx
1:  out %al, $0xe9
    shr $8, %eax
    dec %ecx
    jnz 1b
    ret
"""


@pytest.mark.parametrize("bits", [32, 64])
def test_mmio_reaches_the_device_model(tmp_path: Path, backend: str, bits: int) -> None:
    image = tmp_path / "mmio.bin"
    image.write_bytes(assemble_flat(MMIO, bits, 0x100000))
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", str(image), "--mode",
                      str(bits), "--dm-arg=--mmio=0xfe000000-0xfe000fff")
    assert run.status == 1, run.stderr
    out = run.console.encode("latin-1")
    assert out[0:4] == bytes.fromhex("44332211")
    assert out[4] == 0x11
    assert out[5:9] == b"\xff" * 4  # nobody claims 0xfd000000: all ones
    assert out[9:13] == b"ABCD"


KBC_RESET = """
    mov $0xfe, %al          # pulse the CPU reset line through the keyboard controller
    out %al, $0x64
1:  jmp 1b                  # without a reset this spins until the run's timeout
"""


def test_keyboard_controller_reset_reboots_the_domain(tmp_path: Path, backend: str) -> None:
    image = tmp_path / "reset.bin"
    image.write_bytes(assemble_flat(KBC_RESET, 32, 0x100000))
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", str(image), "--mode", "32",
                      "--timeout", "20")
    # A reboot ends `hvmport run` like a power-off (status 0); a spin would be 124.
    assert run.status == 0, run.stderr


#: A Multiboot header with the a.out kludge: the flat image loads at 1 MiB, entry after it.
MULTIBOOT_FLAT = """
    .long 0x1badb002, 0x00010000, -(0x1badb002 + 0x00010000)
    .long 0x100000, 0x100000, 0, 0, 0x100020
"""


def test_keyboard_controller_reset_restarts_an_xl_domain(xl: Xl) -> None:
    """on_reboot decides; with "preserve" the domain stays, saying who asked."""
    image = xl.tmp / "reset.mb"
    image.write_bytes(assemble_flat(MULTIBOOT_FLAT + KBC_RESET, 32, 0x100000))
    xl.create(xl.cfg("kbc", str(image), 'on_reboot = "preserve"'))
    deadline = time.monotonic() + 30
    while (info := xl.domain("kbc"))["state"] != "shutdown":
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert info["reason"].startswith("reboot requested by device model"), info
    assert xl("destroy", "kbc").returncode == 0
