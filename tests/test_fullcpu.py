"""Unicorn's full-CPU mode (cpu/uc_fullcpu.py, cpu/uc_internals.py), with guests/fullcpu.S."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import guest, hvmport_run

from hvmport.cpu import uc_internals
from hvmport.errors import HostError

FULL_TRANSCRIPT = [
    "fullcpu: page fault error=00000002 cr2=0000000002000000",
    "fullcpu: page fault error=00000000 cr2=0000000002000000",
    "fullcpu: page fault error=00000002 cr2=0000000002000008",
    "fullcpu: invalid opcode",
    "fullcpu: resumed after ud2",
    "fullcpu: five timer interrupts woke hlt",
    "fullcpu: syscall from ring 3 at cpl 0, rcx = return address",
    "fullcpu: timer interrupt from ring 3 on the rsp0 stack",
    "fullcpu: #GP from ring 3 on the ist1 stack, error=00000000",
]


def test_fullcpu_guest(tmp_path: Path, backend: str) -> None:
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("fullcpu", "flat64"),
                      "--mode", "64", "--full-cpu", "--no-device-model")
    assert run.status == (0x10 << 1) | 1, run.stderr + run.console
    if backend == "unicorn":
        assert run.lines() == FULL_TRANSCRIPT
    else:
        # This machine's nested KVM (PVM) runs ring-3 code natively on the host, where
        # SYSCALL and interrupts do not enter the guest's kernel the way a CPU does
        # (shared/spec/kvm-on-these-machines.md); ring 0 behaves like the CPU.
        assert run.lines()[:6] == FULL_TRANSCRIPT[:6]
        assert run.lines()[-1] == FULL_TRANSCRIPT[-1]


def test_without_full_cpu_an_exception_ends_the_run(tmp_path: Path) -> None:
    run = hvmport_run(tmp_path, "--backend", "unicorn", "--kernel",
                      guest("fullcpu", "flat64"), "--mode", "64", "--no-device-model")
    assert run.status == 4
    assert "#PF (page fault)" in run.stderr


def test_probe_finds_each_field_once() -> None:
    offsets = uc_internals.probe()
    fields = {offsets.hflags, offsets.old_exception, offsets.error_code}
    assert len(fields) == 3
    assert all(0 <= f < offsets.size and f % 4 == 0 for f in fields)
    assert uc_internals.probe() is offsets  # once per process


def test_probe_refuses_another_unicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import unicorn

    monkeypatch.setattr(unicorn, "__version__", "2.1.3")
    with pytest.raises(HostError, match=r"not 2\.1\.4"):
        uc_internals._probe()


def test_full_cpu_mode_runs_one_vcpu(tmp_path: Path) -> None:
    run = hvmport_run(tmp_path, "--backend", "unicorn", "--kernel", guest("fullcpu", "flat64"),
                      "--mode", "64", "--full-cpu", "--vcpus", "2", "--no-device-model")
    assert run.status == 2
    assert "full-CPU mode (Linux kernels, --full-cpu) runs one vCPU" in run.stderr
