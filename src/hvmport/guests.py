"""hvmport's own test guests: built from guests/*.S with GNU as/ld, on first use.

Binaries are never committed. The first call to :func:`guest_path` (or :func:`build_all`)
assembles every guest in every variant into ``toolchain.cache_dir()/guests/<key>/``, where
``<key>`` hashes the sources, the build recipe below and the identity of ``as``/``ld``: an
edit to any source gives a new key and so a fresh build, and an unchanged tree reuses the
old one. A build happens in a private temporary directory that is renamed into place as a
whole, so concurrent builds (parallel test workers) never see or leave half-written files.

Variants:

* ``multiboot`` - a Multiboot v1 ELF32 kernel (32-bit entry), for ``qemu -kernel`` and
  :func:`hvmport.hv.loader.load_multiboot`.
* ``flat16``, ``flat32``, ``flat64`` - flat memory images for
  :func:`hvmport.hv.loader.load_flat`, linked to run at :func:`flat_address` in the mode
  :func:`flat_mode` gives. The flat16 image is linked at offset 0 of its real-mode
  segment (the loader runs it at CS:IP = 0x1000:0000).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hvmport import toolchain
from hvmport.cpu.base import Mode
from hvmport.errors import ConfigError, HostError
from hvmport.progress import Progress

#: Physical address of the Multiboot battery's embedded 64-bit piece (guests/lib.S,
#: EMBED64_BASE; guests/multiboot.ld places it there).
EMBED64_BASE = 0x180000


@dataclass(frozen=True, slots=True)
class Variant:
    bits: int
    #: Where a flat image is linked to run (its physical load address); None for ELF.
    load_address: int | None
    #: The offset the image is linked at (differs from load_address only in real mode,
    #: where code addresses are offsets within the segment).
    link_origin: int | None
    suffix: str
    defsyms: tuple[tuple[str, int], ...] = ()

    @property
    def mode(self) -> Mode:
        return {16: Mode.REAL16, 32: Mode.PROT32, 64: Mode.LONG64}[self.bits]


VARIANTS: dict[str, Variant] = {
    "multiboot": Variant(32, None, None, ".elf", (("MULTIBOOT", 1),)),
    "flat16": Variant(16, 0x10000, 0x0, ".bin"),
    "flat32": Variant(32, 0x100000, 0x100000, ".bin"),
    "flat64": Variant(64, 0x100000, 0x100000, ".bin"),
}

#: Pieces that exist only to be embedded in another image (``.incbin``), by name.
_EMBEDDED: dict[str, Variant] = {
    "flat16e": Variant(16, 0x10000, 0x0, ".bin", (("EMBED", 1),)),
    "flat64e": Variant(64, EMBED64_BASE, EMBED64_BASE, ".bin", (("EMBED", 1),)),
}


@dataclass(frozen=True, slots=True)
class Guest:
    name: str
    description: str
    variants: tuple[str, ...]
    #: Embedded pieces the multiboot variant includes, built first.
    embeds: tuple[str, ...] = ()


GUESTS: dict[str, Guest] = {
    g.name: g
    for g in (
        Guest("demo", "says in plain words what the VMware backdoor answers",
              ("multiboot", "flat16", "flat32", "flat64")),
        Guest("battery", "every backdoor case, one stable line per result",
              ("multiboot", "flat16", "flat32", "flat64"), embeds=("flat16e", "flat64e")),
        Guest("rep_string", "REP INSB/OUTSB on the backdoor ports, DF = 0 and 1",
              ("multiboot", "flat16", "flat32", "flat64")),
        Guest("cpl3", "backdoor calls from ring 3 (IOPL 0)", ("multiboot", "flat32")),
        Guest("smp", "per-vCPU backdoor calls for --smp-entry (ESI = vCPU id, EDI = count)",
              ("flat32", "flat64")),
        Guest("guestrpc", "GuestRPC RPCs over the high-bandwidth port or 4-byte payloads, "
              "as open-vm-tools sends them", ("multiboot", "flat64")),
        Guest("fullcpu", "exceptions, interrupts, HLT, SYSCALL and ring 3 through the guest's "
              "own IDT, GDT and TSS (Unicorn's full-CPU mode)", ("flat64",)),
        Guest("vmmouse", "device-model commands and the whole vmmouse sequence; "
              "'pointer=N' waits for N host pointer packets", ("multiboot", "flat32")),
        Guest("echo", "the serial console both ways: echoes each byte typed on COM1, 'q' "
              "ends it", ("multiboot",)),
    )
}

#: Files of the source tree that take part in a build (and in the cache key).
_SOURCE_SUFFIXES = (".S", ".ld")
_RECIPE_VERSION = "1"


def guests_dir() -> Path:
    """The ``guests/`` source directory of the tree this package is installed from."""
    path = Path(__file__).resolve().parents[2] / "guests"
    if not (path / "lib.S").is_file():
        raise HostError(
            f"guest sources not found at {path}: hvmport must be installed editable from "
            "its source tree (pip install -e .), which has a guests/ directory next to src/"
        )
    return path


def available() -> list[str]:
    """Names of the guests that can be built."""
    return sorted(GUESTS)


def variants(name: str) -> tuple[str, ...]:
    return _guest(name).variants


def flat_address(variant: str) -> int:
    """Physical address a flat variant must be loaded at."""
    address = _variant(variant).load_address
    if address is None:
        raise ConfigError(f"variant {variant!r} is an ELF kernel, not a flat image")
    return address


def flat_mode(variant: str) -> Mode:
    """The mode a variant's code starts in (Multiboot kernels: 32-bit protected mode)."""
    return _variant(variant).mode


def guest_path(name: str, variant: str = "multiboot", *, source_dir: Path | None = None) -> Path:
    """Path of a built guest image, building all guests first if needed."""
    guest = _guest(name)
    if variant not in guest.variants:
        raise ConfigError(
            f"guest {name!r} has no {variant!r} variant; it has: {', '.join(guest.variants)}"
        )
    return build_all(source_dir=source_dir) / _file_name(name, variant)


def build_all(*, source_dir: Path | None = None, force: bool = False) -> Path:
    """Build every guest in every variant (unless already cached) and return the directory."""
    src = source_dir if source_dir is not None else guests_dir()
    if not (src / "lib.S").is_file():
        raise HostError(f"guest sources not found at {src}: no lib.S there")
    root = toolchain.cache_dir() / "guests"
    root.mkdir(parents=True, exist_ok=True)
    final = root / source_key(src)
    if final.is_dir() and not force:
        return final
    toolchain.require_tools("as", "ld")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        with Progress("building the test guests", total=_count_builds()) as progress:
            _build_into(src, tmp, progress)
        if force and final.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=root))
            os.replace(final, old / "tree")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same build first; its result is identical.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def source_key(source_dir: Path) -> str:
    """Hash of everything a build depends on: sources, recipe, and the tools themselves."""
    h = hashlib.sha256()
    h.update(f"recipe {_RECIPE_VERSION} {GUESTS!r} {VARIANTS!r} {_EMBEDDED!r}\n".encode())
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.suffix in _SOURCE_SUFFIXES:
            content = path.read_bytes()
            h.update(f"file {path.name} {len(content)}\n".encode())
            h.update(content)
    for tool in ("as", "ld"):
        found = shutil.which(tool)
        if found is None:
            h.update(f"tool {tool} missing\n".encode())
        else:
            st = Path(found).resolve().stat()
            h.update(f"tool {tool} {Path(found).resolve()} {st.st_size} {st.st_mtime_ns}\n"
                     .encode())
    return h.hexdigest()[:20]


def _guest(name: str) -> Guest:
    try:
        return GUESTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown guest {name!r}; available: {', '.join(available())}"
        ) from None


def _variant(variant: str) -> Variant:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ConfigError(
            f"unknown guest variant {variant!r}; variants: {', '.join(VARIANTS)}"
        ) from None


def _file_name(name: str, variant: str) -> str:
    info = VARIANTS.get(variant) or _EMBEDDED[variant]
    return f"{name}.{variant}{info.suffix}"


def _count_builds() -> int:
    return sum(len(g.embeds) + len(g.variants) for g in GUESTS.values())


def _build_into(src: Path, out: Path, progress: Progress) -> None:
    work = out / ".obj"
    work.mkdir()
    for guest in GUESTS.values():
        for piece in guest.embeds:
            # Embedded pieces land in the work directory, where the .incbin finds them.
            _build_one(src, work, work, guest.name, piece, _EMBEDDED[piece])
            progress.advance(note=f"{guest.name}.{piece}")
        for variant in guest.variants:
            _build_one(src, work, out, guest.name, variant, VARIANTS[variant])
            progress.advance(note=f"{guest.name}.{variant}")
    shutil.rmtree(work)


def _build_one(src: Path, work: Path, out: Path, name: str, variant: str, info: Variant) -> None:
    obj = work / f"{name}.{variant}.o"
    defsyms = {"BITS": info.bits, **dict(info.defsyms)}
    toolchain.assemble_file(src / f"{name}.S", obj, info.bits, defsyms=defsyms,
                            include_dirs=(src, work))
    target = out / _file_name(name, variant)
    if info.link_origin is None:
        toolchain.link([obj], target, info.bits, script=src / "multiboot.ld")
    else:
        toolchain.link([obj], target, info.bits, script=src / "flat.ld",
                       defsyms={"ORG": info.link_origin}, binary=True)
