"""A Linux test guest from Debian's stock packages: the kernel, and a busybox initramfs.

``hvmport guest linux`` (and :func:`build`) fetches ``linux-image-<abi>-amd64`` (the package
``linux-image-amd64`` depends on) and ``busybox-static`` with ``apt-get download``, takes the
bzImage and the input modules hvmport's tests need (evdev, psmouse) out of the kernel
package, decompresses the bzImage's payload once into a ``vmlinux`` (so that a boot does not
spend a second in xz), and writes an uncompressed newc initramfs holding busybox and our own
``/init``. Everything lands in ``<cache>/linux/<key>/``, where the key covers the package
versions and this recipe, so a second call costs nothing; the directory appears as a whole.

``/init`` mounts /proc, /sys and devtmpfs, loads the modules, prints what the tests check as
lines starting ``hvmport-init:`` on the console, and powers off. With ``hvmport.shell=1``
on the kernel command line it starts an interactive shell on the console instead; with
``hvmport.events=N`` it reads N input events from the vmmouse driver's absolute device and
prints each as ``hvmport-event: TYPE CODE VALUE``. Busybox
applets are found through ``/bin/busybox --install -s``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from hvmport import cpio, toolchain
from hvmport.errors import HostError

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Bump when the initramfs layout or /init changes, so cached guests are rebuilt.
RECIPE_VERSION = 2
#: Modules (paths under lib/modules/<release>/kernel/) that /init loads, in order.
MODULES = ("drivers/input/evdev.ko", "drivers/input/mouse/psmouse.ko")

#: The kernel command line this platform needs, and why (docs/linux-on-unicorn.md):
#: the platform has an 8259 PIC pair, an 8254 PIT, a CMOS RTC and a 16550 UART, and no local
#: APIC, I/O APIC, ACPI tables or PCI host bridge; one vCPU. ``quiet`` keeps the kernel's
#: log off the serial console (every byte is three port accesses served by the device model);
#: /init prints what the tests need from dmesg. Drop it to watch a boot.
CMDLINE = (
    "console=ttyS0 noapic nolapic acpi=off pci=off nosmp maxcpus=1 mitigations=off pti=off "
    "nokaslr no_timer_check tsc=reliable rdinit=/init panic=-1 cryptomgr.notests quiet"
)

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "hvmport-init: started, kernel $(uname -r)"
for m in /lib/modules/*.ko; do
    insmod "$m" && echo "hvmport-init: loaded $(basename "$m")"
done
# psmouse probes the aux port asynchronously: give it up to 3 s to register a mouse.
i=0
while [ $i -lt 30 ] && ! grep -q 'Mouse' /proc/bus/input/devices; do
    sleep 0.1
    i=$((i + 1))
done
events=$(sed -n 's/.*hvmport\.events=\([0-9]*\).*/\1/p' /proc/cmdline)
if grep -q 'hvmport.shell=1' /proc/cmdline; then
    echo "hvmport-init: shell"
    setsid cttyhack sh
elif [ -n "$events" ]; then
    # The vmmouse driver's absolute device is the VMMouse entry with ABS bits.
    dev=$(awk '/^N:/ {name = $0} /^H:/ {h = $0}
               /^B: ABS=/ && name ~ /VMMouse/ {match(h, /event[0-9]+/);
                                               print substr(h, RSTART, RLENGTH); exit}' \
          /proc/bus/input/devices)
    # Open the device before saying so: evdev gives a reader only events after its open.
    exec 3< "/dev/input/$dev"
    echo "hvmport-init: reading $events events from /dev/input/$dev"
    # struct input_event: 16 bytes of time, then type (u16), code (u16), value (s32).
    dd bs=24 count="$events" <&3 2>/dev/null | od -A n -v -t d4 -w24 \
        | awk '{print "hvmport-event:", $5 % 65536, int($5 / 65536), $6}'
else
    dmesg | grep -E 'Hypervisor detected|vmware|VMware|input:|steal' \
        | sed 's/^/hvmport-dmesg: /'
    echo "hvmport-init: sum $((6 * 7))"
    grep -E 'timer|serial' /proc/interrupts | sed 's/^ */hvmport-irq: /'
fi
echo "hvmport-init: power off"
poweroff -f
"""


@dataclass(frozen=True, slots=True)
class LinuxGuest:
    """A built guest: the files ``hvmport run`` takes, and where they came from."""

    directory: Path
    bzimage: Path
    vmlinux: Path
    initrd: Path
    release: str
    kernel_package: str
    kernel_version: str
    busybox_version: str
    cmdline: str = CMDLINE

    def as_json(self) -> dict[str, str]:
        return {"bzimage": str(self.bzimage), "vmlinux": str(self.vmlinux),
                "initrd": str(self.initrd), "cmdline": self.cmdline, "release": self.release,
                "kernel_package": self.kernel_package, "kernel_version": self.kernel_version,
                "busybox_version": self.busybox_version}


class Progress:
    """Steps and a bar on a terminal; one plain line per step otherwise (logs, CI)."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self._step = ""

    def step(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty and self._step:
            self.stream.write("\n")
        self._step = text
        if self.tty:
            self.stream.write(f"\rhvmport guest: {text}")
        else:
            self.stream.write(f"hvmport guest: {text}\n")
        self.stream.flush()

    def advance(self, done: int, total: int) -> None:
        if self.quiet or not self.tty or total <= 0:
            return
        width = 30
        filled = min(width, done * width // total)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\rhvmport guest: {self._step} [{bar}] {done * 100 // total:3d}%")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._step and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        self._step = ""


Runner = Callable[[list[str], Path | None], str]


def _run(cmd: list[str], cwd: Path | None) -> str:
    """Run a host tool; its failure is the host's (HostError with its own words)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise HostError(f"{cmd[0]} is not installed; the Linux guest recipe needs Debian's "
                        f"apt-get and dpkg-deb") from None
    if proc.returncode != 0:
        raise HostError(f"{' '.join(cmd)} failed: "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout


def resolve_packages(run: Runner = _run) -> tuple[str, str, str]:
    """(kernel package, its version, busybox-static version) that apt would install now;
    runs ``apt-get update`` once if apt knows neither package."""
    try:
        return _resolve(run)
    except HostError:
        run(["apt-get", "update", "-qq"], None)
        return _resolve(run)


def _resolve(run: Runner) -> tuple[str, str, str]:
    # One apt-cache call: each one rebuilds apt's package cache in memory (over a second).
    text = run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE,
                BUSYBOX_PACKAGE], None)
    records = {m.group(1): m.group(0)
               for m in re.finditer(r"^Package: (\S+)\n(?:.+\n?)*", text, re.MULTILINE)}
    meta = records.get(KERNEL_META_PACKAGE, "")
    match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,]*-amd64)\s*\(=\s*([^)\s]+)\)",
                      meta, re.MULTILINE)
    if match is None:
        raise HostError(f"apt-cache show {KERNEL_META_PACKAGE} names no linux-image package")
    bmatch = re.search(r"^Version:\s*(\S+)", records.get(BUSYBOX_PACKAGE, ""), re.MULTILINE)
    if bmatch is None:
        raise HostError(f"apt-cache show {BUSYBOX_PACKAGE} gives no version")
    return match.group(1), match.group(2), bmatch.group(1)


def cache_root() -> Path:
    return toolchain.cache_dir() / "linux"


def guest_key(kernel_package: str, kernel_version: str, busybox_version: str) -> str:
    text = "\n".join([kernel_package, kernel_version, busybox_version, str(RECIPE_VERSION),
                      INIT_SCRIPT, CMDLINE, *MODULES])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(directory: Path) -> LinuxGuest | None:
    """The guest built in ``directory``, if it is complete."""
    manifest = directory / "manifest.json"
    try:
        info = json.loads(manifest.read_text())
        guest = LinuxGuest(directory, directory / "bzImage", directory / "vmlinux",
                           directory / "initrd.cpio", info["release"], info["kernel_package"],
                           info["kernel_version"], info["busybox_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if all(p.is_file() for p in (guest.bzimage, guest.vmlinux, guest.initrd)):
        return guest
    return None


def build(cache: Path | None = None, progress: Progress | None = None, *,
          run: Runner = _run) -> LinuxGuest:
    """Build the guest (or find it in the cache) and return its files."""
    progress = progress or Progress(quiet=True)
    root = cache or cache_root()
    progress.step("resolving packages with apt-cache")
    kernel_pkg, kernel_ver, busybox_ver = resolve_packages(run)
    target = root / guest_key(kernel_pkg, kernel_ver, busybox_ver)
    found = cached(target)
    if found is not None:
        progress.step(f"cached: {target}")
        progress.done()
        return found
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        debs = work / "debs"
        debs.mkdir()
        progress.step(f"downloading {kernel_pkg} {kernel_ver} and {BUSYBOX_PACKAGE} "
                      f"{busybox_ver}")
        run(["apt-get", "download", "-q", f"{kernel_pkg}={kernel_ver}",
             f"{BUSYBOX_PACKAGE}={busybox_ver}"], debs)
        kernel_deb = _one(debs, f"{kernel_pkg}_*.deb")
        busybox_deb = _one(debs, f"{BUSYBOX_PACKAGE}_*.deb")
        out = work / "guest"
        out.mkdir()
        progress.step(f"extracting the kernel from {kernel_deb.name}")
        release, modules = _extract_kernel(kernel_deb, out / "bzImage", progress)
        progress.step("extracting busybox")
        busybox = _extract_member(busybox_deb, "./bin/busybox", progress)
        progress.step("decompressing the kernel payload into vmlinux")
        from hvmport.hv import linuxboot

        kernel = linuxboot.extract_vmlinux((out / "bzImage").read_bytes())
        (out / "vmlinux").write_bytes(kernel)
        progress.step("writing the initramfs")
        (out / "initrd.cpio").write_bytes(initramfs(busybox, release, modules))
        (out / "manifest.json").write_text(json.dumps({
            "release": release, "kernel_package": kernel_pkg,
            "kernel_version": kernel_ver, "busybox_version": busybox_ver,
            "recipe": RECIPE_VERSION}, indent=2) + "\n")
        try:
            out.rename(target)
        except OSError:
            # Another build finished first; its result is as good as ours.
            if cached(target) is None:
                raise
    progress.step(f"ready: {target}")
    progress.done()
    found = cached(target)
    if found is None:  # pragma: no cover - we just wrote it
        raise HostError(f"the guest in {target} is incomplete")
    return found


def initramfs(busybox: bytes, release: str, modules: dict[str, bytes]) -> bytes:
    """The newc archive: busybox, /init, the modules, the mount points and /dev/console
    (the kernel opens it for init's stdio before devtmpfs is mounted)."""
    members = [cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "lib",
                                           "lib/modules")]
    members.append(cpio.char_device("dev/console", 5, 1))
    members.append(cpio.file("bin/busybox", busybox, 0o755))
    members.append(cpio.symlink("bin/sh", "busybox"))
    members.append(cpio.file("init", INIT_SCRIPT.encode(), 0o755))
    # /init loads them in name order: a numeric prefix keeps MODULES' order.
    for i, path in enumerate(MODULES):
        name = f"lib/modules/{i:02d}-{Path(path).name}"
        members.append(cpio.file(name, modules[path]))
    return cpio.archive(members)


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise HostError(f"apt-get download left {len(found)} files matching {pattern} in "
                        f"{directory}")
    return found[0]


def _fsys_tar(deb: Path) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise HostError("dpkg-deb is not installed; the Linux guest recipe needs it") \
            from None


def _finish(proc: subprocess.Popen[bytes], deb: Path) -> None:
    assert proc.stdout is not None and proc.stderr is not None
    while proc.stdout.read(1 << 20):  # the rest of the tar, so dpkg-deb can finish
        pass
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() != 0:
        raise HostError(f"dpkg-deb --fsys-tarfile {deb.name} failed: {err}")


def _extract_kernel(deb: Path, bzimage: Path, progress: Progress) -> tuple[str, dict[str, bytes]]:
    """Stream the package's data tar once: the bzImage, and the modules /init loads."""
    proc = _fsys_tar(deb)
    assert proc.stdout is not None
    release = ""
    modules: dict[str, bytes] = {}
    total = deb.stat().st_size
    seen = 0
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            seen += member.size
            progress.advance(min(seen // 6, total), total)  # ~6x: the .deb's compression
            name = member.name.removeprefix("./")
            vmlinuz = re.fullmatch(r"boot/vmlinuz-(.+)", name)
            if vmlinuz and member.isfile():
                release = vmlinuz.group(1)
                bzimage.write_bytes(_read(tar, member))
                continue
            mod = re.fullmatch(r"(?:usr/)?lib/modules/[^/]+/kernel/(.+)", name)
            if mod and mod.group(1) in MODULES and member.isfile():
                modules[mod.group(1)] = _read(tar, member)
    _finish(proc, deb)
    if not release:
        raise HostError(f"{deb.name} holds no boot/vmlinuz-*")
    missing = [m for m in MODULES if m not in modules]
    if missing:
        raise HostError(f"{deb.name} holds none of {', '.join(missing)}: is psmouse built in? "
                        f"The recipe expects Debian's modular input drivers")
    progress.advance(total, total)
    return release, modules


def _extract_member(deb: Path, wanted: str, progress: Progress) -> bytes:
    proc = _fsys_tar(deb)
    assert proc.stdout is not None
    data: bytes | None = None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            if member.name == wanted and member.isfile():
                data = _read(tar, member)
    _finish(proc, deb)
    if data is None:
        raise HostError(f"{deb.name} holds no {wanted}")
    progress.advance(1, 1)
    return data


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:  # pragma: no cover - isfile() members always have data
        raise HostError(f"cannot read {member.name}")
    return f.read()
