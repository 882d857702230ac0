"""A real guest sees identical results under all four register transports (issue 6).

The device-model process is started with each ``--vmport-transport``; the vmmouse guest
(32-bit), the battery (16-, 32- and 64-bit, upper halves included) and the SMP guest (each
vCPU gets its own registers back) must print exactly what they print under v14's
registers page, on KVM and on Unicorn.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Run, guest, hvmport_run
from tests.test_device_model import EXPECTED
from tests.test_run import parse

TRANSPORTS = ("regs-page", "ioreq-union", "gpr64", "three-exchange")


def run_all(tmp_path: Path, backend: str, *args: str) -> dict[str, Run]:
    runs = {}
    for transport in TRANSPORTS:
        (tmp_path / transport).mkdir()
        runs[transport] = hvmport_run(tmp_path / transport, "--backend", backend, *args,
                                      f"--dm-arg=--vmport-transport={transport}")
    return runs


def test_vmmouse_guest_sees_the_same_under_every_transport(tmp_path: Path,
                                                           backend: str) -> None:
    runs = run_all(tmp_path, backend, "--kernel", guest("vmmouse"), "--memory", "64")
    for transport, run in runs.items():
        assert run.status == 1, (transport, run.stderr)
        res = parse(run.lines())
        for label, want in EXPECTED.items():
            for reg, value in want.items():
                assert res[("p32", label)][reg] == value, (transport, label, reg)
        assert run.lines() == runs["regs-page"].lines(), transport


def test_battery_sees_the_same_under_every_transport(tmp_path: Path, backend: str) -> None:
    runs = run_all(tmp_path, backend, "--kernel", guest("battery"))
    for transport, run in runs.items():
        assert run.status == 1, (transport, run.stderr)
        # A device-model command in long mode: only the 32-bit halves change, whichever
        # way the registers travelled (gpr64 carries all 64 bits and must keep them).
        assert parse(run.lines())[("l64", "cmd_010a.in4")]["rbx"] == "b0b0b0b0564d5868"
        assert run.lines() == runs["regs-page"].lines(), transport


def test_each_vcpu_gets_its_own_registers_under_every_transport(tmp_path: Path,
                                                                backend: str) -> None:
    from hvmport import guests

    runs = run_all(tmp_path, backend, "--kernel", guest("smp", "flat32"), "--mode", "32",
                   "--load-addr", hex(guests.flat_address("flat32")), "--vcpus", "4",
                   "--smp-entry")
    for transport, run in runs.items():
        assert run.status == 1, (transport, run.console, run.stderr)
        assert "smp done vcpus=4 errors=0" in run.lines(), transport


def test_gpr64_entries_spill_into_a_second_frame(tmp_path: Path, backend: str) -> None:
    """33 vCPUs, the fewest that need two frames: vCPU 32's entry is the first of resource
    frame 0x101."""
    from hvmport import guests

    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("smp", "flat32"),
                      "--mode", "32", "--load-addr", hex(guests.flat_address("flat32")),
                      "--vcpus", "33", "--smp-entry", "--dm-arg=--vmport-transport=gpr64")
    assert run.status == 1, (run.console, run.stderr)
    assert "smp done vcpus=33 errors=0" in run.lines()
