"""The stock Debian kernel as an xl domain: hvmport create from an xl.cfg file, the
interactive serial console, the VMware mouse seen by the kernel, on_poweroff."""

from __future__ import annotations

import time

from linux_guest import linux_guest

from tests.xltools import Console, Xl, qmp


def test_linux_from_an_xl_cfg_with_an_interactive_console(xl: Xl) -> None:
    guest = linux_guest()
    cfg = xl.cfg("linux", str(guest.bzimage), f'ramdisk = "{guest.initrd}"', "memory = 256",
                 "vmware_hwver = 7", f'cmdline = "{guest.cmdline} hvmport.shell=1"',
                 'on_poweroff = "preserve"')
    xl.create(cfg)
    info = xl.domain("linux")
    # auto does not take this machine's KVM for a kernel, and says why.
    assert info["backend"] == "unicorn"
    assert "unicorn (auto: " in (xl.run_dir / "logs" / "linux.log").read_text()

    console = Console(xl, "linux")
    console.read_until(b"hvmport-init: shell", timeout=180)
    console.read_until(b"/ # ")
    console.type(b"echo hv-$((6*7))\r")
    console.read_until(b"hv-42")
    console.type(b"dmesg | grep -E 'Hypervisor detected|VMMouse'\r")
    out = console.read_until(b"VirtualPS/2 VMware VMMouse")
    assert b"Hypervisor detected: VMware" in out
    # The kernel's vmmouse driver asked for absolute mode, through our device model.
    answers, _ = qmp(info["qmp"], ("query-mice", None))
    assert {"name": "vmmouse", "index": 1, "current": True, "absolute": True} in answers[0]

    console.type(b"exit\r")  # /init powers off when its shell ends
    console.read_until(b"hvmport-init: power off")
    deadline = time.monotonic() + 60
    while xl.domain("linux")["state"] != "shutdown":  # on_poweroff = "preserve"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert xl("destroy", "linux").returncode == 0
    assert console.close() == 0
    assert xl.leftovers() == []


def test_a_linux_kernel_with_two_vcpus_is_refused_clearly(xl: Xl) -> None:
    guest = linux_guest()
    res = xl("create", str(xl.cfg("smp", str(guest.vmlinux), f'ramdisk = "{guest.initrd}"',
                                  "vcpus = 2", "memory = 256")))
    assert res.returncode == 2
    assert "runs one vCPU" in res.stderr
    assert xl.leftovers() == []
