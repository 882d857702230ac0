"""hvmport.linuxguest: the Debian kernel + busybox initramfs recipe, and its /init under QEMU.

These use the real apt-get and dpkg-deb (the first run downloads about 70 MB into the
cache; later runs reuse it).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

from linux_guest import linux_guest
from qemu_ref import require_qemu

from hvmport import linuxguest
from hvmport.hv import linuxboot


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_build_is_cached() -> None:
    guest = linux_guest()
    before = guest.initrd.stat().st_mtime_ns
    out = io.StringIO()
    again = linuxguest.build(progress=linuxguest.Progress(out))
    assert again == guest
    assert guest.initrd.stat().st_mtime_ns == before
    assert f"cached: {guest.directory}" in out.getvalue()
    assert guest.kernel_package.startswith("linux-image-")
    assert guest.release in guest.kernel_package


def test_initramfs_holds_busybox_init_and_modules() -> None:
    guest = linux_guest()
    listing = subprocess.run(["cpio", "--quiet", "-itv"], input=guest.initrd.read_bytes(),
                             capture_output=True, check=True).stdout.decode().splitlines()
    names = {ln.split()[-1]: ln for ln in listing if "->" not in ln}
    assert names["init"].startswith("-rwxr-xr-x")
    assert names["bin/busybox"].startswith("-rwxr-xr-x")
    assert names["dev/console"].startswith("crw")
    assert "lib/modules/00-evdev.ko" in names
    assert "lib/modules/01-psmouse.ko" in names


def test_vmlinux_is_the_bzimage_payload() -> None:
    guest = linux_guest()
    from_bz = linuxboot.parse(guest.bzimage.read_bytes())
    from_elf = linuxboot.parse(guest.vmlinux.read_bytes())
    assert from_bz.entry == from_elf.entry
    assert [s.paddr for s in from_bz.segments] == [s.paddr for s in from_elf.segments]
    # The bzImage knows the kernel's whole footprint (init_size), the vmlinux its segments.
    assert from_bz.footprint_end >= from_elf.footprint_end


def test_progress_plain_and_on_a_terminal() -> None:
    plain = io.StringIO()
    p = linuxguest.Progress(plain)
    p.step("downloading")
    p.advance(5, 10)
    p.step("extracting")
    p.done()
    assert plain.getvalue() == "hvmport guest: downloading\nhvmport guest: extracting\n"
    tty = Terminal()
    p = linuxguest.Progress(tty)
    p.step("downloading")
    p.advance(5, 10)
    p.done()
    assert "\rhvmport guest: downloading [" + "#" * 15 + "." * 15 + "]  50%" in tty.getvalue()
    quiet = io.StringIO()
    linuxguest.Progress(quiet, quiet=True).step("x")
    assert quiet.getvalue() == ""


def test_cli_prints_the_files_as_json() -> None:
    guest = linux_guest()
    proc = subprocess.run([sys.executable, "-m", "hvmport.cli", "guest", "linux", "--json"],
                          capture_output=True, text=True, check=True)
    info = json.loads(proc.stdout)
    assert info["vmlinux"] == str(guest.vmlinux)
    assert info["initrd"] == str(guest.initrd)
    assert info["cmdline"] == linuxguest.CMDLINE
    assert proc.stderr == ""  # --json is quiet


def test_init_runs_under_qemu() -> None:
    """The reference: QEMU boots the same kernel and initramfs and /init does its job."""
    qemu = require_qemu()
    guest = linux_guest()
    cmd = [qemu, "-accel", "tcg", "-machine", "pc", "-m", "256", "-nographic",
           "-monitor", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(guest.bzimage), "-initrd", str(guest.initrd),
           "-append", guest.cmdline]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\r\n"))
            # Without ACPI the kernel halts at power-off and QEMU keeps running.
            if "hvmport-init: power off" in lines[-1] or time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    text = "\n".join(lines)
    assert "hvmport-init: started, kernel " + guest.release in text, text[-3000:]
    assert "hvmport-init: loaded 00-evdev.ko" in text
    assert "hvmport-init: loaded 01-psmouse.ko" in text
    assert "hvmport-init: sum 42" in text
    assert "hvmport-init: power off" in text
