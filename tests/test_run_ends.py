"""How a run ends, seen from the command line: status codes and one-line reasons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hvmport.toolchain import assemble_flat
from tests.conftest import hvmport_run


def flat(tmp_path: Path, source: str) -> str:
    image = tmp_path / "guest.bin"
    image.write_bytes(assemble_flat(source, 32, 0x100000))
    return str(image)


def test_halt_with_interrupts_off_is_status_0(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel",
                      flat(tmp_path, "cli\nhlt"), "--mode", "32")
    assert run.status == 0, run.stderr


def test_timeout_is_124_with_a_reason(tmp_path: Path, backend: str) -> None:
    console = tmp_path / "c.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "hvmport.cli", "run", "--backend", backend, "--kernel",
         flat(tmp_path, "1: jmp 1b"), "--mode", "32", "--timeout", "1", "--debugcon",
         str(console)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 124
    assert "timeout after 1 s" in proc.stderr


def test_triple_fault_is_a_guest_fault(tmp_path: Path, backend: str) -> None:
    # No IDT: the #UD cannot be delivered, nor the double fault after it.
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel",
                      flat(tmp_path, "lidt zero\nud2\nzero: .quad 0"), "--mode", "32")
    assert run.status == 4, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("hvmport: vCPU 0:")


def test_debug_exit_status(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel",
                      flat(tmp_path, "mov $0x21, %al\nout %al, $0xf4"), "--mode", "32")
    assert run.status == (0x21 << 1) | 1


def test_malformed_kernel_is_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    run = hvmport_run(tmp_path, "--kernel", str(bad))
    assert run.status == 2
    assert "configuration error" in run.stderr and str(bad) in run.stderr


def test_no_such_kernel_and_bad_sizes(tmp_path: Path) -> None:
    for args, words in (
        (["--kernel", str(tmp_path / "missing")], "no such file"),
        (["--memory", "4096"], "too large"),
        (["--memory", "1"], "too small"),
        (["--vcpus", "0"], "vcpus=0"),
        (["--smp-entry", "--vcpus", "2"], "flat binary"),
    ):
        run = hvmport_run(tmp_path, *args)
        assert run.status == 2, (args, run.stderr)
        assert words in run.stderr, (args, run.stderr)


def test_multiboot_info_reaches_the_guest(tmp_path: Path, backend: str) -> None:
    from tests.conftest import guest

    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("demo"),
                      "--cmdline", "hello world", "--memory", "32")
    assert run.status == 1, run.stderr
    assert 'multiboot: command line "hello world"' in run.console
    assert "31744 KiB above 1 MiB" in run.console
