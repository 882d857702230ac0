"""Where the CPUID instructions are in an ELF file, and the host's own CPUID.

These hosts have no CPUID faulting, so the user-mode backend replaces every CPUID of the
program's code with a trapping instruction. Finding CPUID *instructions* (not bytes 0F A2
inside other instructions or data) needs a disassembler: GNU objdump's linear sweep over the
executable sections, which is exact for compiler output. Results are cached on disk by file
identity, because libc alone takes half a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

from hvmport.errors import HostError

CPUID = b"\x0f\xa2"
_LINE = re.compile(r"^\s*([0-9a-f]+):\s+cpuid\b", re.MULTILINE)
_PT_LOAD = 1


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvmport" / "cpuid-sites"


def _load_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(p_vaddr, p_offset, p_filesz) of each PT_LOAD of a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segs = []
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, off)
        if p_type == _PT_LOAD:
            segs.append((p_vaddr, p_offset, p_filesz))
    return segs


def _objdump_sites(path: str) -> list[int]:
    objdump = shutil.which("objdump")
    if objdump is None:
        raise HostError("objdump (GNU binutils) is needed to find CPUID instructions; "
                        "scripts/setup installs it")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True,
                         text=True, check=False).stdout
    return [int(m.group(1), 16) for m in _LINE.finditer(out)]


def file_sites(path: str) -> list[int]:
    """File offsets of the CPUID instructions in an ELF file (empty if it is not one)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    key = hashlib.sha256(f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                         f"{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.json"
    try:
        found: list[int] = json.loads(cached.read_text())
        return found
    except (OSError, ValueError):
        pass
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        except ValueError:
            return []
        with data:
            if data.find(CPUID) < 0:
                offsets: list[int] = []  # the common case: no need to disassemble
            else:
                segs = _load_segments(data[:65536])
                offsets = []
                for vaddr in _objdump_sites(path):
                    for seg_vaddr, seg_off, filesz in segs:
                        if seg_vaddr <= vaddr < seg_vaddr + filesz:
                            off = seg_off + vaddr - seg_vaddr
                            if data[off:off + 2] == CPUID:
                                offsets.append(off)
                            break
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(offsets))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs time
    return offsets


# push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_STUB = bytes.fromhex("53" "89f8" "89f1" "4989d0" "0fa2"
                      "418900" "41895804" "41894808" "4189500c" "5b" "c3")


class HostCpuid:
    """Runs the CPUID instruction in this process (a few bytes of machine code)."""

    def __init__(self) -> None:
        try:
            self._mem = mmap.mmap(-1, mmap.PAGESIZE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError as e:
            raise HostError(f"cannot map executable memory for the host CPUID stub "
                            f"({e.strerror}): this host forbids it") from e
        self._mem.write(_STUB)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                    ctypes.c_void_p)(addr)
        self._out = (ctypes.c_uint32 * 4)()

    def __call__(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        self._fn(leaf & 0xFFFFFFFF, subleaf & 0xFFFFFFFF, ctypes.addressof(self._out))
        a, b, c, d = self._out
        return a, b, c, d
