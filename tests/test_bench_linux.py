"""hvmport bench: seconds to the Linux guest's shell, hvmport on Unicorn beside QEMU TCG."""

from __future__ import annotations

import json

import pytest

from hvmport.cli import main


def test_linux_boot_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", "--only",
                 "linux_boot_unicorn,qemu_tcg_linux_boot"]) == 0
    out = json.loads(capsys.readouterr().out)
    ours = out["scenarios"]["linux_boot_unicorn"]
    qemu = out["scenarios"]["qemu_tcg_linux_boot"]
    for fig in (ours, qemu):
        assert 0 < fig["min"] <= fig["seconds"] <= fig["max"] < 300
    ratio = out["ratios"]["linux_boot_unicorn/qemu_tcg_linux_boot"]
    assert ratio == pytest.approx(ours["seconds"] / qemu["seconds"], rel=0.01)
    print(f"seconds to the shell: hvmport/Unicorn {ours['seconds']}, QEMU TCG "
          f"{qemu['seconds']}, ratio {ratio}")
