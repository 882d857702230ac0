"""A stock Debian kernel and our busybox initramfs on hvmport's Unicorn platform.

The guest comes from ``hvmport guest linux`` (Debian's packages, cached). /init prints the
kernel's own dmesg lines about the platform, so these assertions are about what Linux itself
concluded: that it runs on VMware, that GETHZ answered, that the vmmouse driver bound.
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Run, hvmport_run
from linux_guest import linux_guest


def boot(tmp_path: Path, *extra: str) -> tuple[Run, float]:
    guest = linux_guest()
    started = time.monotonic()
    run = hvmport_run(tmp_path, "--backend", "unicorn", "--memory", "256",
                      "--kernel", str(guest.vmlinux), "--ramdisk", str(guest.initrd),
                      "--cmdline", guest.cmdline, "--timeout", "240", *extra, timeout=300)
    return run, time.monotonic() - started


def test_stock_kernel_boots_to_busybox_and_sees_vmware(tmp_path: Path) -> None:
    run, seconds = boot(tmp_path)
    out = run.stdout
    assert run.status == 0, run.stderr + out[-3000:]
    assert "hvmport-init: started, kernel " + linux_guest().release in out
    assert "hvmport-init: sum 42" in out  # the shell computes
    assert "hvmport-init: power off" in out
    dmesg = [line.split("] ", 1)[-1] for line in out.splitlines()
             if line.startswith("hvmport-dmesg: ")]
    assert "Hypervisor detected: VMware" in dmesg
    # The frequency comes from GETHZ, answered by the hypervisor; the kernel says so.
    assert any(line.startswith("vmware: TSC freq read from hypervisor : ") for line in dmesg)
    assert not any("stealtime" in line or "steal" in line for line in dmesg), dmesg
    assert "input: VirtualPS/2 VMware VMMouse as /devices/platform/i8042/serio1/input/input" \
        in "\n".join(dmesg)
    # The timer works: the PIT's IRQ 0 through the 8259, as Linux counts it.
    timer = [line for line in out.splitlines() if line.startswith("hvmport-irq: 0:")]
    assert timer and "XT-PIC" in timer[0] and int(timer[0].split()[2]) > 100
    print(f"boot to power-off: {seconds:.1f} s")
