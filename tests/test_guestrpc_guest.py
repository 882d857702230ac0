"""GuestRPC from our own guest (guests/guestrpc.S) on KVM and Unicorn: the same RPCs the
real tools make, over the high-bandwidth port (REP OUTSB/INSB reaching the device model as
data_is_ptr requests) or 4-byte payloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import guest, hvmport_run

REPLIES = [
    "1 from the host",
    "1 ",
    "1 set by the guest",
    "0 No value found",
    "0 hvmport does not implement the RPCI command 'no-such-command'",
]


@pytest.mark.parametrize(("variant", "tag"), [("multiboot", "p32"), ("flat64", "l64")])
@pytest.mark.parametrize("hb", [True, False])
def test_guestrpc_guest(tmp_path: Path, backend: str, variant: str, tag: str,
                        hb: bool) -> None:
    args = ["--backend", backend, "--kernel", guest("guestrpc", variant),
            "--guestinfo", "x=from the host"]
    if variant == "flat64":
        args += ["--mode", "64"]
    if not hb:
        args.append("--no-guestrpc-hb")
    run = hvmport_run(tmp_path, *args)
    assert run.status == 1, run.stderr + run.console
    way = "hb" if hb else "lb"
    assert run.lines() == [
        f"{tag} guestrpc begin",
        *(f"{tag} rpc {way} {reply}" for reply in REPLIES),
        f"{tag} rpc bad cookie refused",
        f"{tag} guestrpc end",
    ]


def test_guestrpc_without_device_model_fails_cleanly(tmp_path: Path, backend: str) -> None:
    # Nobody answers command 30: OPEN's status has no SUCCESS, as on a plain QEMU.
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("guestrpc"),
                      "--no-device-model")
    assert run.status == (2 << 1) | 1
    assert run.lines()[-1] == "p32 rpc failed at open"
