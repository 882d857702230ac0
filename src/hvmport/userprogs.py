"""hvmport's own user-mode test programs (guests/user/*.c) for ``--backend user``.

Built with the system's gcc on first use into ``toolchain.cache_dir()/user/<key>/``, where
the key hashes the sources and the recipe, like the guests. ``probe`` is dynamically linked
against ``libprobecpu.so`` (found through its RUNPATH), so its CPUID instruction arrives in
a mapping the dynamic loader creates after exec.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hvmport import toolchain
from hvmport.errors import HostError

_RECIPE = "1"


def _sources() -> Path:
    from hvmport.guests import guests_dir

    return guests_dir() / "user"


def _key(src: Path) -> str:
    h = hashlib.sha256(_RECIPE.encode())
    for f in sorted(src.glob("*.c")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def program_path(name: str = "probe") -> Path:
    """The built program ``name``, building every user program first if needed."""
    src = _sources()
    out = toolchain.cache_dir() / "user" / _key(src)
    target = out / name
    if target.is_file():
        return target
    toolchain.require_tools("gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    try:
        final = out
        _gcc(["-shared", "-fPIC", "-o", str(work / "libprobecpu.so"),
              str(src / "probecpu.c")])
        _gcc(["-o", str(work / "probe"), str(src / "probe.c"), f"-L{work}", "-lprobecpu",
              f"-Wl,-rpath,{final}", "-pthread"])
        try:
            os.rename(work, final)
        except OSError:
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not target.is_file():
        raise HostError(f"user program {name!r} was not built")
    return target


def _gcc(args: list[str]) -> None:
    proc = subprocess.run(["gcc", "-O1", "-Wall", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise HostError(f"gcc {' '.join(args)} failed:\n{proc.stderr}")
