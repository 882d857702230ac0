"""Guest loaders: Multiboot v1 ELF32 kernels and flat binaries.

A loader writes the guest image and its own boot structures into guest memory and returns
the :class:`~hvmport.cpu.base.StartState` every vCPU starts from.

Low-memory layout (fixed; every loader uses the same addresses, and no image may be loaded
below ``LOW_RESERVED_END``):

====================  =========================================================  ==========
range                 contents                                                   written by
====================  =========================================================  ==========
0x00000 - 0x00fff     left alone: real-mode IVT and BIOS data area               --
0x01000 - 0x01fff     flat GDT (selectors of hvmport.cpu.base), limit 0x2f       all
0x02000 - 0x02057     Multiboot information structure                            multiboot
0x02100 - 0x02147     Multiboot memory map (3 entries)                           multiboot
0x02200 - 0x0220f     Multiboot module list (at most one module: the ramdisk)    multiboot
0x02300 - 0x023ff     the module's string (at most 255 bytes + NUL)              multiboot
0x02f00 - 0x02fff     boot loader name "hvmport"                                 multiboot
0x03000 - 0x03fff     Multiboot command line (at most 4095 bytes + NUL)          multiboot
0x04000 - 0x04fff     PML4                                                       LONG64
0x05000 - 0x05fff     PDPT                                                       LONG64
0x06000 - 0x09fff     4 page directories: 0-4 GiB identity, 2 MiB pages          LONG64
0x0a000 - 0x0ffff     boot stack; ESP = 0x10000 in PROT32, LONG64 and Multiboot  --
0x9fc00 - 0xfffff     legacy hole (EBDA, VGA, BIOS): reserved, never loaded      --
====================  =========================================================  ==========

Images (flat binaries and ELF segments) must lie in [0x10000, end of RAM) outside the
legacy hole. The page tables map every page user-accessible and writable, so a 64-bit
guest can run ring-3 code on them.

Real mode (``load_flat(..., Mode.REAL16)``): the image must lie inside one 64 KiB segment
between 0x10000 and 0x90000 and leave the segment's top 4 KiB free for the stack.
CS = DS = ES = SS = ``real_cs`` = (address >> 4) & 0xf000 (the 64 KiB-aligned segment
holding the image), IP = address & 0xffff, SP = 0xfff0. Link a real-mode image at
``address & 0xffff``: its labels are offsets within that segment. Example: an image at
0x10000 runs at 1000:0000 with its stack at 1000:fff0.

SMP (``--smp-entry``): every vCPU starts from the same state, made distinct by
:func:`for_vcpu`, which sets ESI = vCPU id (and EDI = number of vCPUs when given). The
loader's one boot stack is only good for one vCPU: a guest started on several vCPUs must
switch to its own per-vCPU stack, computed from ESI, before it pushes anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hvmport.cpu.base import (
    SEL_CODE16,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_DATA16,
    Mode,
    Regs,
    StartState,
)
from hvmport.errors import ConfigError
from hvmport.hv.memory import GuestMemory

# --- layout ------------------------------------------------------------------------------
LOW_RESERVED_END = 0x10000
GDT_ADDR = 0x1000
MBI_ADDR = 0x2000
MMAP_ADDR = 0x2100
LOADER_NAME_ADDR = 0x2F00
CMDLINE_ADDR = 0x3000
CMDLINE_MAX = 4095
PML4_ADDR = 0x4000
PDPT_ADDR = 0x5000
PD_ADDR = 0x6000
PD_COUNT = 4
BOOT_STACK_BOTTOM = 0xA000
BOOT_STACK_TOP = 0x10000
LEGACY_HOLE_START = 0x9FC00
LEGACY_HOLE_END = 0x100000
LOADER_NAME = b"hvmport"

REAL16_SP = 0xFFF0
REAL16_STACK_SPACE = 0x1000
REAL16_MAX_ADDRESS = 0x90000

# --- Multiboot v1 (Multiboot Specification 0.6.96) ---------------------------------------
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT2_HEADER_MAGIC = 0xE85250D6
MULTIBOOT_SEARCH = 8192
MB_FLAG_PAGE_ALIGN = 1 << 0
MB_FLAG_MEMORY_INFO = 1 << 1
MB_FLAG_VIDEO_MODE = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16
#: Required-feature bits (0..15) this loader satisfies. Bit 0 (page-align modules) is
#: met: the one module (the ramdisk) starts on a page boundary.
MB_SUPPORTED_REQUIRED = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY_INFO

MBI_FLAG_MEMORY = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9
MBI_FLAGS = (MBI_FLAG_MEMORY | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP
             | MBI_FLAG_LOADER_NAME)
MBI_SIZE = 88
MMAP_ENTRY_SIZE = 24  # the 'size' field (20) plus itself
MMAP_AVAILABLE = 1
MMAP_RESERVED = 2

# --- ELF ---------------------------------------------------------------------------------
ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
PT_LOAD = 1
ELF32_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
ELF32_PHDR = struct.Struct("<IIIIIIII")

# --- GDT ---------------------------------------------------------------------------------
#: Descriptors for the fixed selectors of hvmport.cpu.base (accessed bits preset, so no
#: CPU ever needs to write the table).
_GDT_ENTRIES = {
    SEL_CODE32: 0x00CF9B000000FFFF,  # flat 4 GiB, 32-bit code
    SEL_DATA: 0x00CF93000000FFFF,    # flat 4 GiB, data
    SEL_CODE64: 0x00AF9B000000FFFF,  # 64-bit code (L = 1)
    SEL_CODE16: 0x00009B000000FFFF,  # 16-bit code, base 0, 64 KiB
    SEL_DATA16: 0x000093000000FFFF,  # 16-bit data, base 0, 64 KiB
}
GDT_LIMIT = max(_GDT_ENTRIES) + 8 - 1

PAGE_PRESENT = 1 << 0
PAGE_WRITABLE = 1 << 1
PAGE_USER = 1 << 2
PAGE_LARGE = 1 << 7
_TABLE_FLAGS = PAGE_PRESENT | PAGE_WRITABLE | PAGE_USER

#: Loader structures: (start, end, what), for overlap messages.
RESERVED_AREAS: tuple[tuple[int, int, str], ...] = (
    (0, LOW_RESERVED_END,
     "the loader's reserved low memory 0x0-0xffff (GDT, Multiboot info, page tables, "
     "boot stack)"),
    (LEGACY_HOLE_START, LEGACY_HOLE_END,
     "the legacy hole 0x9fc00-0xfffff (EBDA, VGA, BIOS; reserved in the memory map)"),
)


@dataclass(frozen=True, slots=True)
class Segment:
    """One piece of an image to place in guest memory: ``data`` then zeros to ``memsz``."""

    paddr: int
    data: bytes
    memsz: int
    what: str


# --- public API ----------------------------------------------------------------------------


MODULE_LIST_ADDR = 0x2200
MODULE_STRING_ADDR = 0x2300
MODULE_STRING_MAX = 255


def load_multiboot(path: str | os.PathLike[str], memory: GuestMemory,
                   cmdline: str = "", module: str | os.PathLike[str] | None = None,
                   ) -> StartState:
    """Load a Multiboot v1 kernel (ELF32, or any file with the a.out kludge, flags bit 16).

    Entry state (Multiboot spec section 3.2): 32-bit protected mode, paging off, flat
    segments from the loader's GDT, EAX = 0x2BADB002, EBX = the Multiboot information
    structure at MBI_ADDR with mem_lower/mem_upper, the command line, the module (xl.cfg's
    ``ramdisk``: page-aligned after the kernel's last byte, its string the file's name) or
    none, a memory map and the boot loader name. ESP = BOOT_STACK_TOP (the spec leaves it
    undefined).
    Every problem with the file raises ConfigError naming the file and what is wrong.
    """
    name = os.fspath(path)
    try:
        image = Path(name).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read kernel: {e.strerror}", path=name) from e
    cmd = _encode_cmdline(cmdline)
    try:
        segments, entry = _parse_multiboot(image, memory.size)
    except ConfigError as e:
        raise ConfigError(e.message, path=name) from None
    for seg in segments:
        _write_segment(memory, seg)
    mod = None
    if module is not None:
        end = max(seg.paddr + seg.memsz for seg in segments)
        mod = _load_module(module, memory, max(end, LEGACY_HOLE_END))
    _write_gdt(memory)
    _write_multiboot_info(memory, cmd, mod)
    regs = Regs(rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=MBI_ADDR, rip=entry, rsp=BOOT_STACK_TOP)
    return StartState(Mode.PROT32, regs, gdt_base=GDT_ADDR, gdt_limit=GDT_LIMIT)


def load_flat(data: bytes | bytearray | memoryview, memory: GuestMemory, address: int,
              mode: Mode) -> StartState:
    """Load a flat binary at physical ``address`` and enter it at its first byte in ``mode``.

    * REAL16: see the module docstring (segment, IP, SP rules).
    * PROT32: flat segments, paging off, EIP = address, ESP = BOOT_STACK_TOP.
    * LONG64: long mode on identity page tables covering 0-4 GiB with 2 MiB pages
      (page_table_root = PML4_ADDR), RIP = address, RSP = BOOT_STACK_TOP.
    The flat GDT is written in every mode.
    """
    if not isinstance(mode, Mode):
        raise ConfigError(f"unknown mode {mode!r}: use REAL16, PROT32 or LONG64")
    if not isinstance(address, int) or isinstance(address, bool) or address < 0:
        raise ConfigError(f"load address must be a non-negative integer, not {address!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigError(f"flat image must be bytes, not {type(data).__name__}")
    image = bytes(data)
    if not image:
        raise ConfigError("flat image is empty")
    end = address + len(image)
    what = f"flat image of {len(image)} bytes"
    _check_range(address, end, memory.size, what)
    what = f"{what} ({address:#x}-{end - 1:#x})"
    regs = Regs(rip=address, rsp=BOOT_STACK_TOP)
    real_cs = 0
    if mode is Mode.REAL16:
        segment = address & 0xF0000
        if address >= REAL16_MAX_ADDRESS:
            raise ConfigError(
                f"{what}: a real-mode image must start below {REAL16_MAX_ADDRESS:#x}, so its "
                f"64 KiB segment and stack end below the legacy hole at {LEGACY_HOLE_START:#x}"
            )
        stack_floor = segment + 0x10000 - REAL16_STACK_SPACE
        if end > stack_floor:
            raise ConfigError(
                f"{what}: a real-mode image must fit in one 64 KiB segment and leave its top "
                f"4 KiB for the stack, i.e. end by {stack_floor:#x} (segment {segment:#x}); "
                f"it is {end - stack_floor:#x} bytes too long"
            )
        real_cs = segment >> 4
        regs = Regs(rip=address & 0xFFFF, rsp=REAL16_SP)
    memory.write(address, image)
    _write_gdt(memory)
    root = 0
    if mode is Mode.LONG64:
        _write_page_tables(memory)
        root = PML4_ADDR
    return StartState(mode, regs, page_table_root=root, gdt_base=GDT_ADDR,
                      gdt_limit=GDT_LIMIT, real_cs=real_cs)


def for_vcpu(state: StartState, vcpu_id: int, vcpu_count: int | None = None) -> StartState:
    """The start state of one vCPU under ``--smp-entry``: a copy with RSI = vCPU id and,
    if ``vcpu_count`` is given, RDI = the number of vCPUs.

    Every vCPU gets the same stack pointer, so each must switch to its own stack (e.g. one
    computed from ESI) before using it; hvmport's smp guest does.
    """
    if not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool) or vcpu_id < 0:
        raise ValueError(f"vcpu_id must be a non-negative integer, not {vcpu_id!r}")
    regs = state.regs.copy()
    regs.rsi = vcpu_id
    if vcpu_count is not None:
        if not isinstance(vcpu_count, int) or isinstance(vcpu_count, bool) or \
                vcpu_count <= vcpu_id:
            raise ValueError(f"vcpu_count {vcpu_count!r} must be an integer above vcpu_id "
                             f"{vcpu_id}")
        regs.rdi = vcpu_count
    return dataclasses.replace(state, regs=regs)


# --- Multiboot parsing -------------------------------------------------------------------


def _parse_multiboot(image: bytes, ram_size: int) -> tuple[list[Segment], int]:
    """Validate a Multiboot v1 image; return the segments to load and the entry address."""
    if not image:
        raise ConfigError("kernel file is empty")
    offset, flags = _find_header(image)
    unsupported = flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED
    if unsupported & MB_FLAG_VIDEO_MODE:
        raise ConfigError(
            f"Multiboot header flags {flags:#010x} require video mode information (bit 2), "
            "which this loader does not provide"
        )
    if unsupported:
        bits = ", ".join(str(b) for b in range(16) if unsupported >> b & 1)
        raise ConfigError(
            f"Multiboot header flags {flags:#010x} require features this loader does not "
            f"know (bits {bits})"
        )
    if flags & MB_FLAG_AOUT_KLUDGE:
        segments, entry = _aout_kludge(image, offset)
    else:
        segments, entry = _elf32(image)
    for seg in segments:
        _check_range(seg.paddr, seg.paddr + seg.memsz, ram_size, seg.what)
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in itertools.pairwise(ordered):
        if b.paddr < a.paddr + a.memsz:
            raise ConfigError(
                f"{a.what} ({a.paddr:#x}-{a.paddr + a.memsz - 1:#x}) and {b.what} "
                f"({b.paddr:#x}-{b.paddr + b.memsz - 1:#x}) overlap"
            )
    return segments, entry


def _find_header(image: bytes) -> tuple[int, int]:
    """Offset and flags of the first valid Multiboot header in the first 8 KiB."""
    window = image[:MULTIBOOT_SEARCH]
    bad_checksum: tuple[int, int] | None = None
    for off in range(0, len(window) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", window, off)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & MB_FLAG_AOUT_KLUDGE and off + 32 > len(window):
                raise ConfigError(
                    f"Multiboot header at offset {off:#x} sets flags bit 16 but its address "
                    f"fields run past the first {MULTIBOOT_SEARCH} bytes of the file"
                )
            return off, flags
        if bad_checksum is None:
            bad_checksum = (off, checksum)
    if bad_checksum is not None:
        off, checksum = bad_checksum
        raise ConfigError(
            f"Multiboot header at offset {off:#x} has a bad checksum {checksum:#010x}: "
            "magic + flags + checksum must be 0 modulo 2^32"
        )
    for off in range(0, min(len(image), 32768) - 3, 8):
        if struct.unpack_from("<I", image, off)[0] == MULTIBOOT2_HEADER_MAGIC:
            raise ConfigError(
                f"this is a Multiboot2 kernel (header magic {MULTIBOOT2_HEADER_MAGIC:#x} at "
                f"offset {off:#x}); only Multiboot v1 is supported"
            )
    raise ConfigError(
        f"no Multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x}, 4-byte aligned) in the "
        f"first {MULTIBOOT_SEARCH} bytes: not a Multiboot v1 kernel"
    )


def _aout_kludge(image: bytes, offset: int) -> tuple[list[Segment], int]:
    """Segments from the header's address fields (flags bit 16)."""
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = struct.unpack_from(
        "<5I", image, offset + 12)
    where = f"Multiboot header at offset {offset:#x} (flags bit 16)"
    if load_addr > header_addr:
        raise ConfigError(f"{where}: load_addr {load_addr:#x} is above header_addr "
                          f"{header_addr:#x}")
    file_start = offset - (header_addr - load_addr)
    if file_start < 0:
        raise ConfigError(
            f"{where}: header_addr - load_addr = {header_addr - load_addr:#x} is larger than "
            f"the header's file offset, so the image would start before the file"
        )
    if load_end_addr == 0:
        load_size = len(image) - file_start
    else:
        if load_end_addr <= load_addr:
            raise ConfigError(f"{where}: load_end_addr {load_end_addr:#x} is not above "
                              f"load_addr {load_addr:#x}")
        load_size = load_end_addr - load_addr
        if file_start + load_size > len(image):
            raise ConfigError(
                f"{where}: load_addr..load_end_addr needs {load_size:#x} bytes from file "
                f"offset {file_start:#x}, but the file has only {len(image) - file_start:#x}"
            )
    memsz = load_size
    if bss_end_addr != 0:
        if bss_end_addr < load_addr + load_size:
            raise ConfigError(f"{where}: bss_end_addr {bss_end_addr:#x} is below the end of "
                              f"the loaded image {load_addr + load_size:#x}")
        memsz = bss_end_addr - load_addr
    if not load_addr <= entry_addr < load_addr + load_size:
        raise ConfigError(f"{where}: entry_addr {entry_addr:#x} is outside the loaded image "
                          f"{load_addr:#x}-{load_addr + load_size - 1:#x}")
    data = image[file_start:file_start + load_size]
    return [Segment(load_addr, data, memsz, "a.out-kludge image")], entry_addr


def _elf32(image: bytes) -> tuple[list[Segment], int]:
    """PT_LOAD segments (at their physical addresses) and the physical entry address."""
    if image[:4] != ELF_MAGIC:
        raise ConfigError(
            "not an ELF file, and the Multiboot header does not set flags bit 16 (a.out "
            "kludge) to give load addresses: no way to know where to load it"
        )
    if len(image) < 5:
        raise ConfigError("truncated ELF header")
    if image[4] == ELFCLASS64:
        raise ConfigError("64-bit ELF (ELFCLASS64): a Multiboot v1 kernel must be a 32-bit "
                          "ELF (ELFCLASS32)")
    if image[4] != ELFCLASS32:
        raise ConfigError(f"invalid ELF class {image[4]} (expected 1, ELFCLASS32)")
    if len(image) < ELF32_EHDR.size:
        raise ConfigError(f"truncated ELF header: the file has {len(image)} bytes, an ELF32 "
                          f"header needs {ELF32_EHDR.size}")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ELF32_EHDR.unpack_from(image)
    if ident[5] != ELFDATA2LSB:
        raise ConfigError(f"ELF data encoding {ident[5]} is not little-endian (1)")
    if e_machine != EM_386:
        raise ConfigError(f"ELF machine {e_machine} is not EM_386 (3)")
    if e_type != ET_EXEC:
        raise ConfigError(f"ELF type {e_type} is not an executable (ET_EXEC, 2)")
    if e_phnum == 0:
        raise ConfigError("ELF file has no program headers")
    if e_phentsize < ELF32_PHDR.size:
        raise ConfigError(f"ELF program header size {e_phentsize} is smaller than "
                          f"{ELF32_PHDR.size}")
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > len(image):
        raise ConfigError(
            f"ELF program header table (offset {e_phoff:#x}, {e_phnum} entries of "
            f"{e_phentsize} bytes) runs past the end of the file ({len(image):#x} bytes)"
        )
    segments: list[Segment] = []
    entry: int | None = None
    for i in range(e_phnum):
        (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_flags,
         _p_align) = ELF32_PHDR.unpack_from(image, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        what = f"ELF segment {i}"
        if p_filesz > p_memsz:
            raise ConfigError(f"{what}: p_filesz {p_filesz:#x} is larger than p_memsz "
                              f"{p_memsz:#x}")
        if p_offset + p_filesz > len(image):
            raise ConfigError(
                f"{what}: file bytes {p_offset:#x}-{p_offset + p_filesz - 1:#x} run past the "
                f"end of the file ({len(image):#x} bytes)"
            )
        segments.append(Segment(p_paddr, image[p_offset:p_offset + p_filesz], p_memsz, what))
        # The entry is a virtual address; the CPU starts with paging off, so translate it
        # through the segment that contains it.
        if entry is None and p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry = e_entry - p_vaddr + p_paddr
    if not segments:
        raise ConfigError("ELF file has no loadable (PT_LOAD) segment with a size")
    if entry is None:
        raise ConfigError(f"ELF entry point {e_entry:#x} is not inside any loadable segment")
    return segments, entry


# --- writing -------------------------------------------------------------------------------


def _check_range(start: int, end: int, ram_size: int, what: str) -> None:
    if end > ram_size:
        raise ConfigError(
            f"{what} ({start:#x}-{end - 1:#x}) does not fit in guest RAM, which ends at "
            f"{ram_size:#x} ({ram_size >> 20} MiB)"
        )
    for lo, hi, name in RESERVED_AREAS:
        if start < hi and lo < end:
            raise ConfigError(f"{what} ({start:#x}-{end - 1:#x}) overlaps {name}")


def _write_segment(memory: GuestMemory, seg: Segment) -> None:
    memory.write(seg.paddr, seg.data)
    if seg.memsz > len(seg.data):
        memory.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))


def _write_gdt(memory: GuestMemory) -> None:
    table = bytearray(GDT_LIMIT + 1)
    for selector, descriptor in _GDT_ENTRIES.items():
        struct.pack_into("<Q", table, selector, descriptor)
    memory.write(GDT_ADDR, bytes(table))


def _write_page_tables(memory: GuestMemory) -> None:
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | _TABLE_FLAGS).ljust(4096, b"\0"))
    pdpt = b"".join(struct.pack("<Q", PD_ADDR + i * 4096 | _TABLE_FLAGS)
                    for i in range(PD_COUNT))
    memory.write(PDPT_ADDR, pdpt.ljust(4096, b"\0"))
    pages = struct.pack(f"<{512 * PD_COUNT}Q", *(
        (i << 21) | _TABLE_FLAGS | PAGE_LARGE for i in range(512 * PD_COUNT)))
    memory.write(PD_ADDR, pages)


def _encode_cmdline(cmdline: str) -> bytes:
    if not isinstance(cmdline, str):
        raise ConfigError(f"kernel command line must be a string, not {type(cmdline).__name__}")
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise ConfigError("kernel command line contains a NUL character")
    if len(encoded) > CMDLINE_MAX:
        raise ConfigError(f"kernel command line is {len(encoded)} bytes; at most "
                          f"{CMDLINE_MAX} fit")
    return encoded


def _load_module(path: str | os.PathLike[str], memory: GuestMemory,
                 after: int) -> tuple[int, int]:
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read ramdisk: {e.strerror}", path=name) from e
    label = os.path.basename(name).encode()
    if len(label) > MODULE_STRING_MAX or b"\0" in label:
        raise ConfigError("ramdisk file name is too long for the module string", path=name)
    start = (after + 0xFFF) & ~0xFFF
    if start + len(data) > memory.size:
        raise ConfigError(f"ramdisk of {len(data)} bytes does not fit after the kernel in "
                          f"{memory.size >> 20} MiB of RAM", path=name)
    memory.write(start, data)
    memory.write(MODULE_STRING_ADDR, label + b"\0")
    return start, start + len(data)


def memory_map(ram_size: int) -> list[tuple[int, int, int]]:
    """(base, length, type) of the guest's RAM as every boot protocol here reports it: RAM
    below the legacy hole, the hole reserved, RAM above it. Multiboot's map types and
    Linux's e820 types agree (1 available, 2 reserved)."""
    return [
        (0, LEGACY_HOLE_START, MMAP_AVAILABLE),
        (LEGACY_HOLE_START, LEGACY_HOLE_END - LEGACY_HOLE_START, MMAP_RESERVED),
        (LEGACY_HOLE_END, ram_size - LEGACY_HOLE_END, MMAP_AVAILABLE),
    ]


def _write_multiboot_info(memory: GuestMemory, cmdline: bytes,
                          module: tuple[int, int] | None = None) -> None:
    mmap = memory_map(memory.size)
    mmap_bytes = b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, base, length, kind)
                          for base, length, kind in mmap)
    info = bytearray(MBI_SIZE)
    struct.pack_into("<I", info, 0, MBI_FLAGS)
    struct.pack_into("<II", info, 4, LEGACY_HOLE_START // 1024,
                     (memory.size - LEGACY_HOLE_END) // 1024)
    struct.pack_into("<I", info, 16, CMDLINE_ADDR)
    if module is None:
        struct.pack_into("<II", info, 20, 0, 0)
    else:
        struct.pack_into("<II", info, 20, 1, MODULE_LIST_ADDR)
        memory.write(MODULE_LIST_ADDR,
                     struct.pack("<IIII", module[0], module[1], MODULE_STRING_ADDR, 0))
    struct.pack_into("<II", info, 44, len(mmap_bytes), MMAP_ADDR)
    struct.pack_into("<I", info, 64, LOADER_NAME_ADDR)
    memory.write(MBI_ADDR, bytes(info))
    memory.write(MMAP_ADDR, mmap_bytes)
    memory.write(LOADER_NAME_ADDR, LOADER_NAME + b"\0")
    memory.write(CMDLINE_ADDR, cmdline + b"\0")
