"""GNU as/ld driven from Python: guests are assembled from our sources, never committed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from hvmport.errors import HostError

_AS_FLAGS = {16: ["--32"], 32: ["--32"], 64: ["--64"]}
_LD_EMUL = {16: "elf_i386", 32: "elf_i386", 64: "elf_x86_64"}
_CODE_DIRECTIVE = {16: ".code16", 32: ".code32", 64: ".code64"}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "hvmport"
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise HostError(
            f"missing {', '.join(missing)}: install GNU binutils (Debian package 'binutils')"
        )


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HostError(f"{cmd[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def assemble_flat(source: str, bits: int, org: int) -> bytes:
    """Assemble GNU as source into a flat binary that runs at guest-physical ``org``.

    The source starts in ``bits``-bit mode; it may switch with .code16/.code32/.code64.
    Results are cached by content, so a test suite pays for each snippet once.
    """
    if bits not in _AS_FLAGS:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    text = f"{_CODE_DIRECTIVE[bits]}\n.text\n.globl _start\n_start:\n{source}\n"
    key = hashlib.sha256(f"{bits}:{org:#x}:{text}".encode()).hexdigest()[:24]
    out = cache_dir() / "flat" / f"{key}.bin"
    if out.exists():
        return out.read_bytes()
    require_tools("as", "ld")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvmport-as-") as tmp:
        src, obj, binf = Path(tmp, "g.S"), Path(tmp, "g.o"), Path(tmp, "g.bin")
        src.write_text(text)
        _run(["as", *_AS_FLAGS[bits], "-o", str(obj), str(src)])
        _run(["ld", "-m", _LD_EMUL[bits], "-Ttext", hex(org), "--oformat", "binary",
              "-e", "_start", "-o", str(binf), str(obj)])
        data = binf.read_bytes()
    tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(out)
    return data


def assemble_file(
    source: Path,
    output: Path,
    bits: int,
    *,
    defsyms: Mapping[str, int] | None = None,
    include_dirs: Sequence[Path] = (),
) -> None:
    """Assemble one GNU as source file into an object file.

    ``bits`` selects the object format (16 and 32: i386, 64: x86-64); the source picks its
    own code size. ``defsyms`` become ``--defsym NAME=VALUE``, which is how one source
    is assembled for several modes.
    """
    if bits not in _AS_FLAGS:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    require_tools("as")
    cmd = ["as", *_AS_FLAGS[bits]]
    for name, value in (defsyms or {}).items():
        cmd += ["--defsym", f"{name}={value:#x}"]
    for directory in include_dirs:
        cmd += ["-I", str(directory)]
    cmd += ["-o", str(output), str(source)]
    _run(cmd)


def link(
    objects: Sequence[Path],
    output: Path,
    bits: int,
    *,
    script: Path,
    defsyms: Mapping[str, int] | None = None,
    binary: bool = False,
) -> None:
    """Link objects with a linker script into an ELF executable or, with ``binary``, a flat
    memory image (``--oformat binary``)."""
    if bits not in _LD_EMUL:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    require_tools("ld")
    cmd = ["ld", "-m", _LD_EMUL[bits], "-z", "max-page-size=0x1000", "-z", "noseparate-code"]
    for name, value in (defsyms or {}).items():
        cmd += ["--defsym", f"{name}={value:#x}"]
    cmd += ["-T", str(script)]
    if binary:
        cmd += ["--oformat", "binary"]
    cmd += ["-o", str(output), *(str(o) for o in objects)]
    _run(cmd)
