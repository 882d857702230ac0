"""`hvmport run` with the in-hypervisor backdoor, on KVM and Unicorn, against the spec and QEMU.

The battery runs with ``--no-device-model`` here: every answer comes from the hypervisor
itself (vmware-port.md §2.3, §4.4), and a forwarded command finds no server (all ones).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests import qemu_ref as qemu
from tests.conftest import Run, guest, hvmport_run

Results = dict[tuple[str, str], dict[str, str]]
LINE = re.compile(r"^(r16|p32|l64) (\S+) (.*)$")
MAGIC = "564d5868"


def parse(lines: list[str]) -> Results:
    out: Results = {}
    for line in lines:
        m = LINE.match(line)
        if m and "#GP" not in line and "=" in m.group(3):
            regs = dict(kv.split("=", 1) for kv in m.group(3).split() if "=" in kv)
            out[(m.group(1), m.group(2))] = regs
    return out


def low(regs: dict[str, str]) -> dict[str, str]:
    """The low 32 bits, named as in 32-bit mode (masked values stay masked)."""
    return {"e" + k[1:]: v[-8:] for k, v in regs.items()}


@pytest.fixture(scope="module")
def batteries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The Multiboot battery once per backend (the runs are the slow part)."""
    from tests.conftest import kvm_unusable

    runs = {}
    for name in ("kvm", "unicorn"):
        if name == "kvm" and kvm_unusable():
            continue
        runs[name] = hvmport_run(tmp_path_factory.mktemp(name), "--backend", name, "--kernel",
                                 guest("battery"), "--no-device-model")
    return runs


@pytest.fixture
def battery(batteries: dict[str, Run], backend: str) -> Run:
    return batteries[backend]


# The hypervisor's own answers (Xen v14 semantics, with our fixes), p32 section.
EXPECTED_P32 = {
    "GETVERSION.in4": dict(eax="00000006", ebx=MAGIC, ecx="00000002", edx="00005658"),
    # OUT runs the command too but never writes EAX.
    "GETVERSION.out4": dict(eax=MAGIC, ebx=MAGIC, ecx="00000002"),
    "GETVERSION.ecx_ffff000a.in4": dict(eax="00000006", ebx=MAGIC, ecx="00000002"),
    "GETVERSION.esi.edi.in4": dict(eax="00000006", edx="43215658", esi="12345678",
                                   edi="9abcdef0"),
    "GETHWVERSION.in4": dict(eax="00000007"),
    "GETHZ.in4": dict(ebx="00000000", ecx="05f5e100"),  # 100 MHz bus; TSC < 2**32 Hz here
    "GETTIME.in4": dict(ecx="000f4240", edx="00000000"),
    "GETTIMEFULL.in4": dict(eax=MAGIC, ecx="000f4240", esi="00000000"),
    # Wrong magic: IN reads all ones, nothing else changes; OUT changes nothing.
    "magic.GETVERSION.in4": dict(eax="ffffffff", ebx="a9b2a797", ecx="0000000a"),
    "magic.GETVERSION.out4": dict(eax="564d5869", ebx="a9b2a797", ecx="0000000a"),
    # 1- and 2-byte IN replace only AL/AX.
    "GETVERSION.in1@5658": dict(eax="564d5806", ebx=MAGIC, ecx="00000002"),
    "GETVERSION.in2@5658": dict(eax="564d0006", ebx=MAGIC, ecx="00000002"),
    # Other ports of the four: ignored (all ones), never forwarded.
    "GETVERSION.in1@5659": dict(eax="564d58ff", ebx="a9b2a797"),
    "GETVERSION.in2@565a": dict(eax="564dffff", ebx="a9b2a797"),
    # Sticking out of 0x5658..0x565b: plain PIO, nobody claims it.
    "GETVERSION.in4@5659": dict(eax="ffffffff", ebx="a9b2a797"),
    "GETVERSION.in2@565b": dict(eax="564dffff", ebx="a9b2a797"),
    "GETVERSION.in4@5657": dict(eax="ffffffff", ebx="a9b2a797"),
    # 16-bit command: 0x010a is not GETVERSION for the hypervisor; no server -> all ones.
    "cmd_010a.in4": dict(eax="ffffffff", ebx="a9b2a797", ecx="0000010a"),
    "cmd_ffff.in4": dict(eax="ffffffff", ebx="11111111", ecx="0000ffff", esi="22222222"),
}

#: Labels where QEMU's vmport answers differently, and why (so they are not compared).
DIFFERS_FROM_QEMU = {
    r"GET(MHZ|HWVERSION|TIME|TIMEFULL|HZ)\..*": "answered by Xen v14's hypervisor, not QEMU",
    r"GETVERSION\.out[124](@5658)?": "QEMU's OUT also stores the result in EAX",
    r"magic\.GETVERSION\.out4": "QEMU's OUT stores all ones in EAX",
    r"GETVERSION\.in[12]@5658": "QEMU sets all of EAX (x-read-set-eax); Xen only AL/AX",
    r"GETVERSION\.(in4@5657|in2@5659|in4@5659|in4@565a|in2@565b|in4@565b)":
        "QEMU reads misaligned unassigned ports as 0; Xen's null handler gives all ones",
    r"cmd_010a\.in4": "QEMU decodes 8 bits of ECX; the hypervisor 16 (the DM agrees with QEMU)",
}


def differs(label: str) -> bool:
    return any(re.fullmatch(p, label) for p in DIFFERS_FROM_QEMU)


def test_battery_exits_like_qemu(battery: Run) -> None:
    assert battery.status == 1, battery.stderr
    assert "p32 battery end" in battery.console and "l64 battery end" in battery.console


@pytest.mark.parametrize("label", sorted(EXPECTED_P32))
def test_battery_hypervisor_answers(battery: Run, label: str) -> None:
    got = parse(battery.lines())[("p32", label)]
    for reg, value in EXPECTED_P32[label].items():
        assert got[reg] == value, f"{label}: {reg}={got[reg]}, expected {value}"


def test_real_mode_answers_like_protected_mode(battery: Run) -> None:
    res = parse(battery.lines())
    p32 = {label: regs for (mode, label), regs in res.items() if mode == "p32"}
    r16 = {label: regs for (mode, label), regs in res.items() if mode == "r16"}
    assert len(p32) > 40 and r16 == p32


def test_long_mode_keeps_upper_halves(battery: Run) -> None:
    res = parse(battery.lines())
    for (mode, label), regs in res.items():
        if mode != "l64" or ("p32", label) not in res:
            continue
        assert low(regs) == res[("p32", label)], label
        # Only the 32-bit halves change: every register keeps the upper half the guest
        # loaded, except RAX after a 4-byte IN, which zero-extends.
        for reg, value in regs.items():
            if reg == "rax" and ".in4" in label:
                assert value.startswith("00000000"), (label, value)
            elif reg != "rax" or ".in" not in label:
                assert not value.startswith("00000000"), (label, reg, value)


def test_gettime_and_gethz_values_are_real(battery: Run) -> None:
    raw = {m.group(2): dict(kv.split("=") for kv in m.group(3).split())
           for line in battery.lines(raw=True) if line.startswith("~ p32 ")
           if (m := LINE.match(line[2:]))}
    now = time.time()
    t = raw["GETTIME.in4"]
    assert abs(int(t["eax"], 16) - now) < 120
    hz = int(raw["GETHZ.in4"]["eax"], 16)
    mhz = int(raw["GETMHZ.in4"]["eax"], 16)
    assert hz > 10**8 and abs(hz // 1_000_000 - mhz) <= 1


def test_backends_agree_line_by_line(batteries: dict[str, Run]) -> None:
    if len(batteries) < 2:
        pytest.skip("needs both backends")
    kvm, uc = batteries["kvm"].lines(), batteries["unicorn"].lines()
    assert kvm == uc


def test_battery_matches_qemu_where_the_semantics_agree(battery: Run) -> None:
    ref = qemu.run_multiboot(Path(guest("battery")))
    assert battery.status == ref.status == 1
    ours, theirs = parse(battery.lines()), parse(ref.stable_lines)
    compared = 0
    for (mode, label), regs in theirs.items():
        if differs(label) or mode == "l64":
            continue
        assert ours[(mode, label)] == regs, f"{mode} {label}: {ours[(mode, label)]} != {regs}"
        compared += 1
    assert compared >= 40
    # The done-when check: GETVERSION and a wrong-magic call print QEMU's registers.
    for label in ("GETVERSION.in4", "magic.GETVERSION.in4"):
        assert ours[("p32", label)] == theirs[("p32", label)]
        assert ours[("l64", label)] == theirs[("l64", label)] or label == "GETVERSION.in4"


@pytest.mark.parametrize(("variant", "mode"), [("flat16", "r16"), ("flat32", "p32"),
                                               ("flat64", "l64")])
def test_flat_battery_matches_multiboot_section(tmp_path: Path, backend: str, battery: Run,
                                                variant: str, mode: str) -> None:
    from hvmport import guests

    addr = hex(guests.flat_address(variant))
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("battery", variant),
                      "--mode", mode[1:], "--load-addr", addr, "--no-device-model")
    assert run.status == 1, run.stderr
    flat = {k: v for k, v in parse(run.lines()).items() if k[0] == mode}
    whole = {k: v for k, v in parse(battery.lines()).items() if k[0] == mode}
    assert flat == whole and len(flat) > 40


def test_demo_is_the_default_guest(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend)
    assert run.status == 1, run.stderr
    assert "version 6, product type 2 (ESX Server)" in run.console
    assert "virtual hardware version 7" in run.console
    assert "TSC frequency" in run.console and "since the epoch" in run.console
    assert f"backend: {backend}" in run.stderr


def test_no_vmware_port_means_no_backdoor(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--no-vmware-port")
    assert run.status == 1, run.stderr
    assert "version 6" not in run.console
    assert "not answered" in run.console.lower() or "no backdoor" in run.console.lower()


def test_rep_string(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("rep_string"),
                      "--no-device-model")
    assert run.status == 1, run.stderr
    # REP INSB on the backdoor ports never runs a backdoor command: all ones.
    insb = [ln for ln in run.lines() if "insb" in ln.lower()]
    assert insb and all("ff" * 4 in ln.lower() for ln in insb), insb


def test_rep_string_backends_agree(tmp_path: Path) -> None:
    from tests.conftest import kvm_unusable

    if kvm_unusable():
        pytest.skip("needs both backends")
    runs = [hvmport_run(tmp_path / b, "--backend", b, "--kernel", guest("rep_string"),
                        "--no-device-model") for b in ("kvm", "unicorn")
            if (tmp_path / b).mkdir() is None]
    assert runs[0].lines() == runs[1].lines()


def test_cpl3_backdoor(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("cpl3"),
                      "--no-device-model")
    assert run.status == 1, run.stderr
    assert "p32 cpl3 running at CPL 3" in run.lines()
    res = parse(run.lines())
    assert res[("p32", "cpl3.GETVERSION.in4")] == res[("p32", "cpl0.GETVERSION.in4")]
    assert res[("p32", "cpl3.GETVERSION.in4")]["eax"] == "00000006"
    # GETHZ is CPL 0 only: from ring 3 it reads all ones and changes nothing.
    assert res[("p32", "cpl3.GETHZ.in4")]["eax"] == "ffffffff"
    assert res[("p32", "cpl0.GETHZ.in4")]["ecx"] == "05f5e100"
    assert "#GP" not in run.console


def test_cpl3_matches_qemu_for_getversion(tmp_path: Path, backend: str) -> None:
    ref = parse(qemu.run_multiboot(Path(guest("cpl3"))).stable_lines)
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("cpl3"),
                      "--no-device-model")
    ours = parse(run.lines())
    for label in ("cpl0.GETVERSION.in4", "cpl3.GETVERSION.in4"):
        assert ours[("p32", label)] == ref[("p32", label)]


@pytest.mark.parametrize("vcpus", [2, 4])
def test_smp_entry(tmp_path: Path, backend: str, vcpus: int) -> None:
    from hvmport import guests

    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("smp", "flat32"),
                      "--mode", "32", "--load-addr", hex(guests.flat_address("flat32")),
                      "--vcpus", str(vcpus), "--smp-entry", "--no-device-model")
    assert run.status == 1, (run.console, run.stderr)
    # Every vCPU got its own registers back on every call, concurrently.
    for i in range(vcpus):
        assert f"smp vcpu={i} calls=128 errors=0" in run.lines(), run.console
    assert f"smp done vcpus={vcpus} errors=0" in run.lines()


LOCKED_COUNTER = """
    # ESI = vCPU id, EDI = vCPU count (--smp-entry). Each vCPU adds 1 to a shared counter
    # 200000 times with `lock incl`, then the last one to finish prints the total.
    mov $200000, %ecx
1:  lock incl 0x200000
    dec %ecx
    jnz 1b
    mov $1, %eax
    lock xadd %eax, 0x200004
    inc %eax
    cmp %edi, %eax
    jne 2f
    mov 0x200000, %eax
    mov $4, %ecx
3:  out %al, $0xe9
    shr $8, %eax
    dec %ecx
    jnz 3b
    mov $0, %al
    out %al, $0xf4
2:  cli
    hlt
"""


def test_locked_instructions_are_atomic_across_vcpus(tmp_path: Path, backend: str) -> None:
    # Unicorn's TCG is single-CPU: two engines running in parallel lost `lock` updates
    # until the vCPUs took turns.
    from hvmport.toolchain import assemble_flat

    image = tmp_path / "counter.bin"
    image.write_bytes(assemble_flat(LOCKED_COUNTER, 32, 0x100000))
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", str(image), "--mode", "32",
                      "--vcpus", "2", "--smp-entry", "--no-device-model")
    assert run.status == 1, run.stderr
    assert int.from_bytes(run.console.encode("latin-1"), "little") == 400000
