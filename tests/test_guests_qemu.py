"""Our Multiboot guests under QEMU (TCG, vmport=on): they run, exit as they should, and QEMU
answers as qemu-vmport-vmmouse.md section 2 says it does.

QEMU is the reference the hvmport backends are later compared with line by line, so these
tests also pin down the QEMU behaviour that differs from Xen's (and that a comparison has
to expect): which commands QEMU answers, 8-bit command decoding, OUT running the command,
64-bit registers written in full, ports 0x5659..0x565b, and #GP for ring-3 I/O under TCG.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvmport import guests
from tests.qemu_ref import QemuRun, QemuTimeout, require_qemu, run_multiboot

MAGIC = 0x564D5868
NOT_MAGIC = 0xA9B2A797
ALL_ONES = 0xFFFFFFFF
MODES = ("p32", "r16", "l64")
REGS32 = ("eax", "ebx", "ecx", "edx", "esi", "edi")
REGS64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")
#: The upper halves every l64 call starts with (battery.S).
UPPER = dict(zip(REGS32, (0xA0A0A0A0, 0xB0B0B0B0, 0xC0C0C0C0, 0xD0D0D0D0, 0x5E5E5E5E,
                          0xD1D1D1D1), strict=True))
RESULT = re.compile(
    r"^(?P<mode>r16|p32|l64) (?P<label>\S+) (?P<regs>(?:[er](?:ax|bx|cx|dx|si|di)=\S+ ?){6})$")


def result_lines(run: QemuRun) -> dict[tuple[str, str], dict[str, str]]:
    """(mode, label) -> register name (eax..edi, also in l64) -> hex text (may hold '*')."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for line in run.stable_lines:
        m = RESULT.match(line)
        if not m:
            continue
        regs = dict(item.split("=") for item in m["regs"].split())
        key = (m["mode"], m["label"])
        assert key not in found, f"duplicate result line {key}"
        found[key] = {"e" + name[1:]: value for name, value in regs.items()}
    return found


def low(value: str) -> int:
    return int(value[-8:], 16)


def full(value: str) -> int:
    return int(value, 16)


def inputs(label: str) -> dict[str, int]:
    """The registers a battery line starts with (battery.S), low 32 bits."""
    cmds = {"GETMHZ": 1, "GETVERSION": 10, "GETHWVERSION": 17, "GETTIME": 23, "GETHZ": 45,
            "GETTIMEFULL": 46}
    name = label.split(".")[0]
    regs = {"eax": MAGIC, "ebx": 0, "ecx": cmds.get(name, 0), "edx": 0x5658, "esi": 0, "edi": 0}
    if name == "GETVERSION" or label.startswith("magic."):
        regs["ebx"] = NOT_MAGIC
        regs["ecx"] = 10
    if label.startswith("magic."):
        regs["eax"] = MAGIC + 1
    if "@" in label:
        regs["edx"] = int(label.split("@")[1], 16)
    if label == "cmd_010a.in4":
        regs.update(ebx=NOT_MAGIC, ecx=0x010A)
    elif label.startswith("cmd_"):
        regs.update(ebx=0x11111111, ecx=int(label[4:8], 16), esi=0x22222222, edi=0x33333333)
    if label == "GETVERSION.ecx_ffff000a.in4":
        regs["ecx"] = 0xFFFF000A
    if label == "GETVERSION.esi.edi.in4":
        regs.update(esi=0x12345678, edi=0x9ABCDEF0, edx=0x43215658)
    return regs


@pytest.fixture(scope="module")
def battery() -> QemuRun:
    return run_multiboot(guests.guest_path("battery", "multiboot"))


@pytest.fixture(scope="module")
def results(battery: QemuRun) -> dict[tuple[str, str], dict[str, str]]:
    return result_lines(battery)


def per_mode(results: dict[tuple[str, str], dict[str, str]],
             label: str) -> Iterator[tuple[str, dict[str, str]]]:
    for mode in MODES:
        yield mode, results[(mode, label)]


# --- the battery's shape ---------------------------------------------------------------------


def test_battery_exits_zero_after_all_three_modes(battery: QemuRun) -> None:
    assert battery.status == 1, battery.text  # (0 << 1) | 1
    markers = [line for line in battery.stable_lines if not RESULT.match(line)]
    assert markers == [f"{mode} battery {what}" for mode in MODES
                       for what in ("begin", "end", "done")]


def test_battery_line_format(battery: QemuRun,
                             results: dict[tuple[str, str], dict[str, str]]) -> None:
    labels = {label for _, label in results}
    assert len(labels) == 44
    for mode in MODES:
        assert {label for m, label in results if m == mode} == labels
    for line in battery.stable_lines:
        m = RESULT.match(line)
        if not m:
            continue
        names = [item.split("=")[0] for item in m["regs"].split()]
        assert names == list(REGS64 if m["mode"] == "l64" else REGS32)
        width = 16 if m["mode"] == "l64" else 8
        assert all(len(item.split("=")[1]) == width for item in m["regs"].split())
    # Every line with a masked value is followed by its raw "~ " twin.
    lines = battery.lines
    for i, line in enumerate(lines):
        if "*" in line:
            raw = lines[i + 1]
            assert raw.startswith("~ " + line.split(" eax=")[0].split(" rax=")[0])
            assert "*" not in raw


def test_battery_stable_lines_repeat_exactly(battery: QemuRun) -> None:
    again = run_multiboot(guests.guest_path("battery", "multiboot"))
    assert again.status == battery.status
    assert again.stable_lines == battery.stable_lines


def test_battery_same_answers_in_every_mode(
        results: dict[tuple[str, str], dict[str, str]]) -> None:
    for (mode, label), regs in results.items():
        if mode == "p32":
            for other in ("r16", "l64"):
                theirs = results[(other, label)]
                assert {r: v[-8:] for r, v in theirs.items()} == regs, (other, label)


# --- what QEMU answers (qemu-vmport-vmmouse.md 2.2-2.5) -----------------------------------


@pytest.mark.parametrize("label", ["GETVERSION.in4", "GETVERSION.out4",
                                   "GETVERSION.esi.edi.in4"])
def test_getversion(results: dict[tuple[str, str], dict[str, str]], label: str) -> None:
    """EAX = vmware-vmx-version 6, EBX = magic, ECX = vmx type 2 (x-report-vmx-type); the
    other registers are not touched. OUT runs the command too (2.3)."""
    for _mode, regs in per_mode(results, label):
        expect = inputs(label) | {"eax": 6, "ebx": MAGIC, "ecx": 2}
        assert {r: low(v) for r, v in regs.items()} == expect


@pytest.mark.parametrize("label", [
    "GETMHZ.in4", "GETHWVERSION.in4", "GETTIME.in4", "GETTIMEFULL.in4",
    "GETMHZ.out4", "GETHWVERSION.out4", "GETTIME.out4", "GETTIMEFULL.out4",
    "cmd_ffff.in4", "cmd_0064.in4", "magic.GETVERSION.in4", "magic.GETVERSION.out4",
])
def test_not_answered(results: dict[tuple[str, str], dict[str, str]], label: str) -> None:
    """Unknown commands (QEMU implements no GETMHZ, GETHWVERSION, GETTIME, GETTIMEFULL) and a
    bad magic: EAX = 0xffffffff (x-signal-unsupported-cmd), everything else as it was."""
    for _mode, regs in per_mode(results, label):
        assert {r: low(v) for r, v in regs.items()} == inputs(label) | {"eax": ALL_ONES}


def test_command_is_only_the_low_8_bits_of_ecx(
        results: dict[tuple[str, str], dict[str, str]]) -> None:
    """QEMU keeps the command in an unsigned char: 0x010a is GETVERSION (Xen, using 16
    bits, would see the unknown 0x010a), and so is 0xffff000a (vmware-checkvm's input)."""
    for label in ("cmd_010a.in4", "GETVERSION.ecx_ffff000a.in4"):
        for _mode, regs in per_mode(results, label):
            assert {r: low(v) for r, v in regs.items()} == inputs(label) | {
                "eax": 6, "ebx": MAGIC, "ecx": 2}


@pytest.mark.parametrize("label", ["GETHZ.in4", "GETHZ.out4"])
def test_gethz_unsupported_under_tcg(results: dict[tuple[str, str], dict[str, str]],
                                     label: str) -> None:
    """GETHZ needs the vCPU's TSC and APIC bus frequencies; under TCG QEMU knows neither, so
    it answers "unsupported": EBX = 0xffffffff, EAX unchanged (the magic), ECX untouched."""
    for _mode, regs in per_mode(results, label):
        assert {r: low(v) for r, v in regs.items()} == inputs(label) | {"ebx": ALL_ONES}


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("op", ["in", "out"])
def test_every_size_at_5658_is_a_full_call(results: dict[tuple[str, str], dict[str, str]],
                                           op: str, size: int) -> None:
    """The one-port region has a 4-byte implementation: QEMU widens 1- and 2-byte accesses
    to a full call, and x-read-set-eax writes the whole EAX before the CPU stores AL/AX."""
    label = f"GETVERSION.{op}{size}@5658"
    for _mode, regs in per_mode(results, label):
        assert {r: low(v) for r, v in regs.items()} == inputs(label) | {
            "eax": 6, "ebx": MAGIC, "ecx": 2}


@pytest.mark.parametrize("port", ["5659", "565a", "565b"])
def test_neighbouring_ports(results: dict[tuple[str, str], dict[str, str]], port: str) -> None:
    """0x5659..0x565b are not claimed: a read fills the bytes read with ones and nothing else
    changes; writes do nothing. Quirk: a *misaligned* read (port not a multiple of the
    size) of an unclaimed port reads 0 in QEMU 7.2, not all ones: the memory core refuses
    the unaligned access and returns 0 without reaching the unassigned-port handler."""
    for op in ("in", "out"):
        for size in (1, 2, 4):
            label = f"GETVERSION.{op}{size}@{port}"
            expect = inputs(label)
            if op == "in":
                mask = (1 << (8 * size)) - 1
                read = mask if int(port, 16) % size == 0 else 0
                expect["eax"] = (expect["eax"] & ~mask & ALL_ONES) | read
            for mode, regs in per_mode(results, label):
                assert {r: low(v) for r, v in regs.items()} == expect, (label, mode)


def test_port_5657(results: dict[tuple[str, str], dict[str, str]]) -> None:
    """Below the window: nothing there either (and misaligned for 4 bytes, so 0)."""
    for _mode, regs in per_mode(results, "GETVERSION.in4@5657"):
        assert {r: low(v) for r, v in regs.items()} == inputs("GETVERSION.in4@5657") | {
            "eax": 0}


def test_long_mode_upper_halves(results: dict[tuple[str, str], dict[str, str]]) -> None:
    """64-bit mode. RAX: a 4-byte IN zero-extends (the CPU's rule); at 0x5658 QEMU also
    writes the whole of RAX itself (x-read-set-eax), so its upper half is 0 for every size
    and for OUT; elsewhere 1- and 2-byte INs and OUTs keep it. Other registers: those
    QEMU's handler writes come back with a zero upper half (it stores 32-bit values into
    the 64-bit registers, where Xen keeps the upper halves); the rest keep theirs."""
    for (mode, label), regs in results.items():
        if mode != "l64":
            continue
        before = inputs(label)
        access = label.split(".")[-1].split("@")[0]
        at_backdoor = "@" not in label or label.endswith("@5658")
        for reg, text in regs.items():
            upper = full(text) >> 32
            written = (access == "in4" or at_backdoor) if reg == "eax" else (
                low(text) != before[reg])
            assert upper == (0 if written else UPPER[reg]), (label, reg, text)


# --- the other guests ---------------------------------------------------------------------


def test_battery_without_qemu_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.qemu_ref.shutil.which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="qemu-system-x86_64 not found"):
        require_qemu()


def test_demo() -> None:
    """The demo in plain words; first what QEMU's Multiboot loader passed, which shows its
    quirks next to hvmport's loader: the command line starts with the kernel's file name,
    the information structure sits at 0x9500 and the memory map comes from the BIOS e820
    table (so it lists more reserved ranges than hvmport's three entries)."""
    kernel = guests.guest_path("demo", "multiboot")
    run = run_multiboot(kernel, cmdline="console=e9 x=1")
    assert run.status == 1, run.text
    info = [line for line in run.lines if line.startswith("multiboot: ")]
    m = re.fullmatch(r"multiboot: info at 0x([0-9a-f]{8}), flags 0x([0-9a-f]{8})", info[0])
    assert m
    assert int(m[1], 16) == 0x9500
    assert int(m[2], 16) & 0x245 == 0x245  # memory, command line, memory map, loader name
    assert 'multiboot: boot loader "qemu"' in info
    assert f'multiboot: command line "{kernel} console=e9 x=1"' in info
    assert "multiboot: memory 639 KiB low, 64384 KiB above 1 MiB" in info
    maps = [line for line in info if line.startswith("multiboot: map ")]
    assert maps[0] == "multiboot: map 0x0000000000000000 +0x000000000009fc00 type 1"
    assert "multiboot: map 0x0000000000100000 +0x0000000003ee0000 type 1" in maps
    assert run.lines[len(info):] == [
        "hvmport demo: what the VMware backdoor (I/O port 0x5658) answers",
        "  GETVERSION    backdoor present: version 6, product type 2 (ESX Server)",
        "  GETHWVERSION  not answered (EAX = 0xffffffff)",
        "  GETMHZ        not answered (EAX = 0xffffffff)",
        "  GETHZ         not answered (EBX = 0xffffffff: TSC frequency unknown; "
        "EAX = 0x564d5868)",
        "  GETTIME       not answered (EAX = 0xffffffff)",
        "demo done",
    ]


def test_rep_string() -> None:
    """String I/O reaches QEMU's vmport once per byte, with ECX (the count, 4) as the
    command: unknown, so every byte reads 0xff and EAX becomes all ones (x-read-set-eax).
    Unclaimed ports read 0xff per byte and leave EAX alone. OUTSB changes no memory."""
    run = run_multiboot(guests.guest_path("rep_string", "multiboot"))
    assert run.status == 1, run.text
    lines = [line for line in run.lines if line.startswith("p32 rep.")]
    assert len(lines) == 12
    pattern = bytes(range(0xA0, 0xB0))
    for line in lines:
        m = re.match(r"p32 rep\.(insb|outsb)@(\w+)\.df([01]) eax=(\w+) ebx=0000bbbb "
                     r"ecx=00000000 edx=0000(\w+) (esi|edi)=buf\+(\w+) buf=(\w+)$", line)
        assert m, line
        op, port, df, eax, edx, ptr_name, ptr, buf = m.groups()
        assert edx == port
        assert ptr_name == ("edi" if op == "insb" else "esi")
        assert int(ptr, 16) == (8 if df == "0" else 7)
        expect = bytearray(pattern)
        if op == "insb":
            start = 4 if df == "0" else 8
            expect[start:start + 4] = b"\xff" * 4
        assert bytes.fromhex(buf) == bytes(expect), line
        assert int(eax, 16) == (ALL_ONES if port == "5658" else MAGIC), line
    assert {line.split()[1] for line in lines} == {
        f"rep.{op}@{port}.df{df}" for op in ("insb", "outsb")
        for port in ("5658", "5659", "5660") for df in "01"}


def test_cpl3_under_tcg_reaches_the_backdoor_through_the_io_bitmap() -> None:
    """TCG checks IOPL and the TSS I/O bitmap like a real CPU; the guest opens the backdoor
    ports in its bitmap (as ioperm() would), so its ring-3 calls get QEMU's answers with no
    #GP, and it still prints and exits from ring 3."""
    run = run_multiboot(guests.guest_path("cpl3", "multiboot"))
    assert run.status == 1, run.text
    stable = run.stable_lines
    assert stable[0] == "p32 cpl3 begin"
    assert "p32 cpl3 running at CPL 3" in stable
    assert stable[-1] == "p32 cpl3 end"
    found = result_lines(run)
    getversion = {"eax": 6, "ebx": MAGIC, "ecx": 2, "edx": 0x5658, "esi": 0, "edi": 0}
    assert {r: low(v) for r, v in found[("p32", "cpl0.GETVERSION.in4")].items()} == getversion
    assert {r: low(v) for r, v in found[("p32", "cpl3.GETVERSION.in4")].items()} == getversion
    ring3 = [label for mode, label in found if label.startswith("cpl3.")]
    assert len(ring3) == 5
    assert not any("#GP" in line or "exception vector" in line for line in stable)


# --- the helper itself ---------------------------------------------------------------------


def test_timeout_returns_output_so_far(tmp_path: Path) -> None:
    """A guest that never exits: the helper stops it and shows what it printed."""
    require_qemu()
    code = bytes([0xB0, ord("x"), 0xE6, 0xE9, 0xEB, 0xFE])  # mov $'x',%al; out %al,$0xe9; jmp .
    flags = 0x00010000  # a.out kludge: no ELF needed
    header = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF,
                         0x100000, 0x100000, 0, 0, 0x100020)
    kernel = tmp_path / "hang.bin"
    kernel.write_bytes(header + code)
    with pytest.raises(QemuTimeout, match=r"hang.bin did not exit within 3 s .*\nx$"):
        run_multiboot(kernel, timeout=3)
