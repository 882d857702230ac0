"""Debian's real VMware clients, fetched once per machine for the tests.

``apt-get download`` fetches open-vm-tools and imvirt-helper and the libraries
vmware-checkvm needs beyond the base system; ``dpkg-deb -x`` extracts them into a cache
directory; the programs run from there with LD_LIBRARY_PATH. Nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hvmport import toolchain

PACKAGES = (
    "open-vm-tools", "imvirt-helper",
    # libvmtools.so.0's own libraries and theirs, for a base system without them.
    "libglib2.0-0", "libtirpc3", "libtirpc-common", "libpcre2-8-0", "libffi8",
    "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2",
    "libkeyutils1",
)
_VERSION = "1"


class RealTools:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.libdir = root / "usr/lib/x86_64-linux-gnu"
        self.checkvm = root / "usr/bin/vmware-checkvm"
        self.rpctool = root / "usr/bin/vmware-rpctool"
        self.toolbox = root / "usr/bin/vmware-toolbox-cmd"
        self.imvirt_vmware = root / "usr/lib/imvirt/vmware"

    def command(self, program: Path, *args: str) -> list[str]:
        """argv for ``hvmport run --backend user --``: env sets the library path for the
        program only (the supervisor follows env's exec)."""
        path = f"{self.libdir}:{self.root / 'lib/x86_64-linux-gnu'}"
        return ["env", f"LD_LIBRARY_PATH={path}", str(program), *args]


def fetch() -> RealTools:
    root = toolchain.cache_dir() / f"debian-vmware-tools-{_VERSION}"
    tools = RealTools(root)
    if (root / ".complete").exists():
        return tools
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get and dpkg-deb are needed to fetch the real VMware tools")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debian-tools-", dir=root.parent))
    try:
        debs = work / "debs"
        debs.mkdir()
        os.chmod(work, 0o755)
        os.chmod(debs, 0o777)  # apt's sandbox user writes here
        proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 and os.geteuid() == 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs,
                                  capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download failed:\n{proc.stderr}")
        tree = work / "root"
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        (tree / ".complete").write_text("\n".join(PACKAGES) + "\n")
        try:
            os.rename(tree, root)
        except OSError:
            if not (root / ".complete").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tools
