"""`hvmport bench`: what it measures and reports (never how fast: that is its output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvmport import benchmark
from tests import qemu_ref
from tests.conftest import kvm_unusable


def test_loop_image_runs_everywhere_with_markers(tmp_path: Path, backend: str) -> None:
    image = tmp_path / "loop.bin"
    image.write_bytes(benchmark.loop_image(50, benchmark.GETVERSION))
    proc = subprocess.run([sys.executable, "-m", "hvmport.cli", "run", "--backend", backend,
                           "--kernel", str(image), "--debugcon", "-", "--no-device-model"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == b"[]"


def test_loop_image_under_qemu(tmp_path: Path) -> None:
    image = tmp_path / "loop.bin"
    image.write_bytes(benchmark.loop_image(50, benchmark.STATUS))
    run = qemu_ref.run_multiboot(image)
    assert (run.status, run.text) == (1, "[]")


def test_c_floor_runs_the_same_image(tmp_path: Path) -> None:
    if kvm_unusable():
        pytest.skip(f"/dev/kvm unusable: {kvm_unusable()}")
    image = tmp_path / "loop.bin"
    data = benchmark.loop_image(50, benchmark.GETVERSION)
    image.write_bytes(data)
    floor = benchmark._floor_binary()
    proc = subprocess.run([str(floor), str(image), hex(benchmark.LOAD),
                           hex(benchmark.loop_image_entry(data))],
                          capture_output=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (1, b"[]"), proc.stderr


def test_json_shape_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    from hvmport.cli import main

    assert main(["bench", "--quick", "--json", "--only",
                 "floor_unicorn,hv_unicorn,dm_unicorn"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["scenarios"]) == {"floor_unicorn", "hv_unicorn", "dm_unicorn"}
    for fig in out["scenarios"].values():
        assert set(fig) == {"us_per_call", "min", "max"}
        assert 0 < fig["min"] <= fig["us_per_call"] <= fig["max"]
    ratio = out["ratios"]["dm_unicorn/floor_unicorn"]
    assert ratio == pytest.approx(out["scenarios"]["dm_unicorn"]["us_per_call"]
                                  / out["scenarios"]["floor_unicorn"]["us_per_call"], rel=1e-2)


def test_missing_qemu_is_reported_as_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark.shutil, "which", lambda name: None)
    res = benchmark.run_benchmarks(quick=True, only={"qemu_kvm", "qemu_tcg"})
    assert not res.scenarios
    assert res.skipped["qemu_tcg"] == "qemu-system-x86_64 not installed"
    assert "qemu_kvm" in res.skipped


def test_buffered_ring_between_processes_never_stalls() -> None:
    # Each run streams writes from the hypervisor's producer to a real device-model
    # process. It stalled (the device model saw write_pointer 0 for an instant, because
    # struct.pack_into zero-fills before it writes) within the first thousand writes.
    for _ in range(2):
        assert benchmark.buffered_writes_per_s(30000) > 0


def test_repetitions_are_marked_one_by_one(tmp_path: Path) -> None:
    image = tmp_path / "loop.bin"
    image.write_bytes(benchmark.loop_image(20, benchmark.STATUS, reps=3))
    proc = subprocess.run([sys.executable, "-m", "hvmport.cli", "run", "--backend", "unicorn",
                           "--kernel", str(image), "--debugcon", "-", "--serial", "none"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == b"[][][]"
    # The in-process Unicorn floor sees the same markers: one interval per repetition.
    assert len(benchmark._floor_unicorn(image)) == 3


def test_ratios_are_between_medians_of_the_same_run() -> None:
    res = benchmark.Results()
    for name, samples in {"floor_c": [10, 11, 12], "hv_kvm": [11, 12, 30],
                          "dm_kvm_regs-page": [40, 50, 60], "qemu_kvm": [100, 200, 300],
                          "dm_kvm_three-exchange": [100, 120, 130],
                          "floor_unicorn": [1, 2, 3], "dm_unicorn": [4, 4, 4]}.items():
        res.scenarios[name] = benchmark.Figure([float(x) for x in samples])
    assert res.ratios() == {
        "hv_kvm/floor_c": round(12 / 11, 3),
        "dm_kvm_regs-page/qemu_kvm": 0.25,
        "dm_kvm_three-exchange/dm_kvm_regs-page": 2.4,
        "dm_unicorn/floor_unicorn": 2.0,
    }
    assert set(res.as_json()) == {"scenarios", "ratios", "skipped"}


def test_each_transport_is_a_scenario() -> None:
    assert [f"dm_kvm_{t}" for t in benchmark.TRANSPORTS] == [
        "dm_kvm_regs-page", "dm_kvm_ioreq-union", "dm_kvm_gpr64", "dm_kvm_three-exchange"]
    from hvmport.dm.client import VMPORT_TRANSPORTS

    assert set(benchmark.TRANSPORTS) == set(VMPORT_TRANSPORTS)
