"""The user-mode backend: an unmodified Linux program under the ptrace supervisor.

The probe program (guests/user/probe.c) does from ring 3 what the VMware tools do: CPUID,
every IN/OUT form, REP INS/OUTS both ways, its own SIGILL/SIGSEGV handlers, fork, threads,
exec. Its port I/O goes through the same hypervisor path as KVM and Unicorn guests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Run, hvmport_run

from hvmport.cpu import portinsn


@pytest.fixture(scope="module")
def probe() -> str:
    from hvmport.cpu.user import probe_ptrace

    why = probe_ptrace()
    if why is not None:
        print(f"skipping the user backend: {why}")
        pytest.skip(f"ptrace not permitted: {why}")
    from hvmport import userprogs

    return str(userprogs.program_path("probe"))


def user_run(tmp_path: Path, *args: str) -> Run:
    opts = [a for a in args if a.startswith("--")]
    prog = [a for a in args if not a.startswith("--")]
    return hvmport_run(tmp_path, "--backend", "user", *opts, "--", *prog)


def test_cpuid_is_trapped_and_answered_with_the_domains_leaves(tmp_path: Path,
                                                                probe: str) -> None:
    # The CPUID instruction lives in a library the dynamic loader maps after exec.
    run = user_run(tmp_path, probe, "cpuid")
    assert run.status == 0, run.stderr
    assert run.stdout.splitlines() == [
        "cpuid: hypervisor bit 1",
        'cpuid: 0x40000000 max=40000010 signature "VMwareVMware"',
        "cpuid: 0x40000010 tsc_khz nonzero 1 bus_khz 100000",
    ]


def test_old_hardware_version_shows_no_hypervisor_signature(tmp_path: Path,
                                                            probe: str) -> None:
    run = user_run(tmp_path, "--vmware-hwver=6", probe, "cpuid")
    assert 'signature ""' in run.stdout, run.stdout + run.stderr


def test_getversion_answered_by_the_hypervisor(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, probe, "version")
    assert run.stdout == "version: eax=00000006 ebx=564d5868 ecx=00000002\n", run.stderr


def test_device_model_answers_forwarded_commands(tmp_path: Path, probe: str) -> None:
    # GETMEMSIZE (20) is not the hypervisor's: the device model (QEMU's vmport) answers.
    run = user_run(tmp_path, probe, "call:20", "call:99")
    lines = run.stdout.splitlines()
    assert lines[0] == "call 20: eax=04000000 ebx=00001177 ecx=00000014 edx=00005658"
    assert lines[1] == "call 99: eax=ffffffff ebx=00000000 ecx=00000063 edx=00005658"


def test_without_vmware_port_the_null_handler_reads_all_ones(tmp_path: Path,
                                                             probe: str) -> None:
    run = user_run(tmp_path, "--no-vmware-port", probe, "call:10")
    assert run.stdout == "call 10: eax=ffffffff ebx=00000000 ecx=0000000a edx=00005658\n"


def test_every_in_out_form(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, probe, "forms")
    assert run.status == 0, run.stderr
    assert run.stdout.splitlines() == [
        "forms: inb imm rax=11223344556677e9",  # AL only
        "forms: inw dx rax=112233445566e9e9",  # AX only
        "forms: inl imm rax=00000000e9e9e9e9",  # zero-extended
        "forms: outs advanced rsi -1, left rcx 0",
        "forms: rep insb 00 e9 e9 e9 00 rdi+4",
        "forms: rep insw down 0000 e9e9 e9e9 rdi-2",
    ]
    # Writes reach the debug console in order, the DF = 1 string backwards.
    assert run.console == "[<BCupdown]\n"


def test_string_io_reaches_the_device_model_in_order(tmp_path: Path, probe: str) -> None:
    # REP OUTSB to the UART: one data_is_ptr request each, staged in execution order, so
    # the DF = 1 string comes out backwards as the CPU sends it.
    run = user_run(tmp_path, probe, "uart")
    assert run.status == 0, run.stderr
    assert run.stdout == "up\ndown\n"


def test_each_rep_is_one_request(probe: str, capfd: pytest.CaptureFixture[str]) -> None:
    from hvmport.hv.run import Image, RunConfig, run

    result = run(RunConfig(Image(Path("/")), backend="user", program=[probe, "uart"],
                           timeout=60))
    assert result.status == 0, result.reason
    assert capfd.readouterr().out == "up\ndown\n"
    assert result.routes == {("server", None): 2}


def test_program_signals_reach_its_own_handlers(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, probe, "sigill", "sigsegv")
    assert run.stdout.splitlines() == [
        "sigill: handler called, si_code 2",  # ILL_ILLOPN: the program's own UD2
        "sigill: resumed after ud2",
        "sigsegv: eax=00000006 ebx=564d5868 ecx=00000002",
        "sigsegv: no fault",
    ]


def test_ring3_policy_off_faults_as_on_bare_metal(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, "--no-vmware-port-ring3", probe, "sigsegv", "version")
    assert run.stdout.splitlines() == ["sigsegv: the backdoor faulted"]
    assert run.status == 128 + 11  # the second call is an unhandled SIGSEGV
    assert "hvmport:" not in run.stderr.replace("hvmport: backend:", "")


def test_forks_threads_and_execs_are_followed(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, probe, "fork", "thread", "exec")
    assert run.stdout.splitlines() == [
        "fork child: eax=00000006 ebx=564d5868 ecx=00000002",
        "fork: child exited with 7",
        "thread: eax=00000006 ebx=564d5868 ecx=00000002",
        "version: eax=00000006 ebx=564d5868 ecx=00000002",
    ]
    assert run.status == 0


def test_exit_status_is_the_programs_own(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, probe, "version", "exit:42")
    assert run.status == 42
    assert run.stderr.strip().splitlines() == [
        "hvmport: backend: user (the program runs natively under a ptrace supervisor)"]


def test_missing_program_is_a_configuration_error(tmp_path: Path, probe: str) -> None:
    run = user_run(tmp_path, str(tmp_path / "no-such-program"))
    assert run.status == 2
    assert "configuration error" in run.stderr and "no such program" in run.stderr


def test_timeout_ends_the_program(tmp_path: Path, probe: str) -> None:
    run = hvmport_run(tmp_path, "--backend", "user", "--timeout", "1", "--", "sleep", "30")
    assert run.status == 124
    assert "timeout" in run.stderr


def test_user_backend_needs_a_program(tmp_path: Path) -> None:
    run = hvmport_run(tmp_path, "--backend", "user")
    assert run.status == 2 and "needs a program" in run.stderr


@pytest.mark.parametrize(("code", "expect"), [
    (b"\xec", (1, False, 1, None, False, False)),
    (b"\xed", (1, False, 4, None, False, False)),
    (b"\x66\xed", (2, False, 2, None, False, False)),
    (b"\xe4\x60", (2, False, 1, 0x60, False, False)),
    (b"\x66\xe7\x70", (3, True, 2, 0x70, False, False)),
    (b"\xee", (1, True, 1, None, False, False)),
    (b"\xf3\x6c", (2, False, 1, None, True, True)),
    (b"\xf3\x66\x6f", (3, True, 2, None, True, True)),
    (b"\x6d", (1, False, 4, None, True, False)),
    (b"\x48\xed", (2, False, 4, None, False, False)),  # REX.W does not widen
])
def test_decoder_port_instructions(code: bytes,
                                   expect: tuple[int, bool, int, int | None, bool, bool]) -> None:
    insn = portinsn.decode(code)
    assert insn is not None
    assert (insn.length, insn.is_write, insn.size, insn.imm_port, insn.string,
            insn.rep) == expect


def test_decoder_refuses_other_instructions() -> None:
    assert portinsn.decode(b"\x0f\x0b") is None  # ud2
    assert portinsn.decode(b"\xf0\xec") is None  # lock in: #UD, not ours
    assert portinsn.decode(b"\x8b\x00") is None
    assert portinsn.decode(b"\xe4") is None  # truncated
    insn = portinsn.decode(b"\x64\x67\xf3\x6e")
    assert insn is not None and insn.segment == "fs" and insn.addr32


DENY_PTRACE = """
import os, struct, sys
from hvmport.cpu import ptrace
SYS_PTRACE, EPERM = 101, 1
prog = b"".join([
    struct.pack("<HBBI", 0x20, 0, 0, 0),                       # nr
    struct.pack("<HBBI", 0x15, 0, 1, SYS_PTRACE),
    struct.pack("<HBBI", 0x06, 0, 0, 0x00050000 | EPERM),      # ptrace: EPERM
    struct.pack("<HBBI", 0x06, 0, 0, ptrace.SECCOMP_RET_ALLOW),
])
if os.geteuid() != 0:
    ptrace.set_no_new_privs()
ptrace.install_filter(prog)
os.execv(sys.executable, [sys.executable, "-m", "hvmport.cli", *sys.argv[1:]])
"""


def test_ptrace_not_permitted_is_a_clear_host_error(tmp_path: Path, probe: str) -> None:
    # A seccomp filter refusing ptrace() plays a container that forbids it.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", DENY_PTRACE, "run", "--backend", "user",
                           "--timeout", "30", "--", probe, "version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "host error" in proc.stderr and "ptrace is not permitted here" in proc.stderr
    assert proc.stdout == ""


def test_bench_measures_the_user_backend(probe: str) -> None:
    from hvmport import benchmark

    res = benchmark.run_benchmarks(quick=True, only={"hv_user"})
    assert set(res.scenarios) == {"hv_user"}, res.skipped
    assert res.scenarios["hv_user"].median > 0


def test_runs_leave_no_descriptors_or_processes(probe: str,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    """In-process: runs that end by the program's exit and by timeout (the supervisor kills
    the program) give back every descriptor and leave no child behind."""
    import os

    from hvmport.hv.run import Image, RunConfig, run

    def once(program: list[str], timeout: float) -> int:
        return run(RunConfig(Image(Path("/")), backend="user", program=program,
                             timeout=timeout)).status

    assert once([probe, "fork", "thread"], 60) == 0  # warm-up
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        assert once([probe, "fork", "thread", "uart"], 60) == 0
        assert once(["sh", "-c", f"sleep {MARK} & sleep {MARK}"], 1.0) == 124
    assert len(os.listdir("/proc/self/fd")) == before
    assert not _alive_with(MARK)
    capfd.readouterr()


MARK = "30.7137"  # an unusual duration names this test's processes


def _alive_with(text: str) -> list[int]:
    import time

    time.sleep(0.2)  # SIGKILL is asynchronous
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_pause_stops_every_process_of_the_program(probe: str,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    import threading
    import time

    from hvmport.hv.lifecycle import Lifecycle
    from hvmport.hv.run import Image, RunConfig, run

    mark = "2.3571"  # this test's sleep
    lifecycle = Lifecycle()
    results = []
    runner = threading.Thread(target=lambda: results.append(run(RunConfig(
        Image(Path("/")), backend="user", lifecycle=lifecycle, timeout=60,
        program=["sh", "-c", f"sleep {mark} & sleep {mark}; wait; echo done"]))))
    runner.start()
    deadline = time.monotonic() + 20
    # The shell (its command line has the mark too) and its two sleeps.
    while len(watched := _alive_with(mark)) < 3:
        assert time.monotonic() < deadline, "the program never started its sleeps"
    lifecycle.pause()
    while any(_state(p) not in ("t", "gone") for p in watched):
        assert time.monotonic() < deadline, [(p, _state(p)) for p in watched]
        time.sleep(0.02)
    assert all(_state(p) == "t" for p in watched)  # all stopped by the supervisor
    lifecycle.unpause()
    runner.join(60)
    assert results and results[0].status == 0, results
    assert capfd.readouterr().out == "done\n"
