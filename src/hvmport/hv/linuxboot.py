"""The Linux/x86 boot protocol: a bzImage or an uncompressed vmlinux, entered in 64-bit mode.

Facts from the kernel's boot protocol documentation (Documentation/arch/x86/boot.rst and
zero-page.rst). hvmport acts as a boot loader of type 0xff ("undefined") and uses the 64-bit
entry: the CPU is in long mode on identity page tables, interrupts off, RSI = the physical
address of ``struct boot_params`` (the "zero page").

* A **bzImage** is a real-mode setup part followed by a protected-mode part whose payload
  (``payload_offset``/``payload_length``, protocol 2.08+) is the compressed ``vmlinux``. The
  payload is decompressed here, in Python, and the vmlinux inside is loaded as below. Python
  reads gzip, bzip2, xz (what Debian's amd64 kernels use) and lzma; lz4, lzo and zstd
  payloads are refused with a ConfigError that says so.
* A **vmlinux** is an ELF64 x86-64 executable. Its PT_LOAD segments go to their physical
  addresses (``p_paddr``) and the entry is ``e_entry`` translated to a physical address
  (the kernel's ``startup_64``). The kernel must not be relocated: a relocatable kernel
  still runs where it is linked to be loaded.

Memory layout (the loader's reserved low 64 KiB, see :mod:`hvmport.hv.loader`):

* 0x02000 - 0x02fff ``boot_params`` (BOOT_PARAMS_ADDR)
* 0x03000 - 0x03fff the command line (NUL-terminated)
* 0x04000 - 0x09fff the identity page tables (0-4 GiB, 2 MiB pages)
* the initrd at the top of RAM, page aligned, below ``initrd_addr_max``

The GDT is the loader's flat GDT (CS = SEL_CODE64 = 0x18, data 0x10), not the protocol's
``__BOOT_CS`` 0x10 / ``__BOOT_DS`` 0x18: every hvmport backend starts 64-bit guests on that
one table, and ``startup_64`` loads its own GDT and reloads every segment register before it
depends on a selector value.

The e820 map says what the guest may use: RAM below the legacy hole, the hole (EBDA, VGA,
BIOS) reserved, and RAM from 1 MiB to the end of guest memory.
"""

from __future__ import annotations

import bz2
import itertools
import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from hvmport.cpu.base import Mode, Regs, StartState
from hvmport.errors import ConfigError
from hvmport.hv import loader
from hvmport.hv.memory import PAGE, GuestMemory

BOOT_PARAMS_ADDR = 0x2000
BOOT_PARAMS_SIZE = 0x1000
CMDLINE_ADDR = loader.CMDLINE_ADDR

# --- setup header (offsets inside the bzImage file and inside boot_params alike) ---------
HDR_START = 0x1F1
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248
OFF_PAYLOAD_LENGTH = 0x24C
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260

# --- zero page fields outside the setup header -------------------------------------------
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
E820_MAX = 128

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
#: 2.08 gives payload_offset/length; 2.12 gives xloadflags (XLF_KERNEL_64).
MIN_BZIMAGE_VERSION = 0x020C
#: What boot_params says of a vmlinux loaded without its setup part: the protocol version
#: whose fields we fill in.
SYNTHETIC_VERSION = 0x020F
LOADER_TYPE_UNDEFINED = 0xFF
LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
#: Protocol 2.03+ documents initrd_addr_max; older kernels' 0x37ffffff is the default.
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF
#: Linux's x86 COMMAND_LINE_SIZE before protocol 2.06 gave cmdline_size.
DEFAULT_CMDLINE_SIZE = 255

# --- ELF64 -------------------------------------------------------------------------------
EM_X86_64 = 62
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")

#: Magic numbers of the payload formats a kernel build can produce (boot.rst, payload).
_PAYLOAD_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x7fELF", "uncompressed ELF"),
)


@dataclass(frozen=True, slots=True)
class KernelImage:
    """A kernel ready to load: its segments, physical entry and the setup header to pass."""

    segments: tuple[loader.Segment, ...]
    entry: int
    #: Bytes 0x1f1.. of boot_params (the setup header), as the image provides them.
    setup_header: bytes
    #: Lowest address above which the initrd may go (end of the kernel's footprint).
    footprint_end: int
    initrd_addr_max: int
    cmdline_size: int


def is_linux_image(head: bytes) -> bool:
    """Whether a file starting with ``head`` (at least 0x300 bytes if the file has them)
    is for this loader: a bzImage, or an ELF64 x86-64 executable."""
    if len(head) >= OFF_HEADER + 4 and head[OFF_HEADER:OFF_HEADER + 4] == HEADER_MAGIC:
        return True
    return (len(head) >= ELF64_EHDR.size and head[:4] == b"\x7fELF" and head[4] == 2
            and struct.unpack_from("<H", head, 18)[0] == EM_X86_64)


def parse(image: bytes) -> KernelImage:
    """Validate a bzImage or vmlinux; ConfigError says what is wrong with it."""
    if not image:
        raise ConfigError("kernel file is empty")
    if image[:4] == b"\x7fELF":
        segments, entry = _parse_vmlinux(image)
        end = max(s.paddr + s.memsz for s in segments)
        return KernelImage(segments, entry, _synthetic_header(), end,
                           DEFAULT_INITRD_ADDR_MAX, 2047)
    return _parse_bzimage(image)


def load_linux(path: str | os.PathLike[str], memory: GuestMemory, cmdline: str = "",
               initrd: str | os.PathLike[str] | None = None) -> StartState:
    """Load a Linux kernel (and an initrd) and return the 64-bit entry state."""
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read kernel: {e.strerror}", path=name) from e
    try:
        kernel = parse(data)
    except ConfigError as e:
        raise ConfigError(e.message, path=name) from None
    del data
    initrd_data = b""
    if initrd is not None:
        iname = os.fspath(initrd)
        try:
            initrd_data = Path(iname).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read initrd: {e.strerror}", path=iname) from e
        if not initrd_data:
            raise ConfigError("initrd is empty", path=iname)
    return place(kernel, memory, cmdline, initrd_data)


def place(kernel: KernelImage, memory: GuestMemory, cmdline: str,
          initrd: bytes = b"") -> StartState:
    """Write a parsed kernel, boot_params, the command line and the initrd into memory."""
    cmd = loader._encode_cmdline(cmdline)
    if len(cmd) > kernel.cmdline_size:
        raise ConfigError(f"kernel command line is {len(cmd)} bytes; this kernel takes at "
                          f"most {kernel.cmdline_size}")
    for seg in kernel.segments:
        loader._check_range(seg.paddr, seg.paddr + seg.memsz, memory.size, seg.what)
    if kernel.footprint_end > memory.size:
        raise ConfigError(
            f"the kernel needs memory up to {kernel.footprint_end:#x} "
            f"({-(-kernel.footprint_end // (1 << 20))} MiB) but the guest has "
            f"{memory.size >> 20} MiB")
    initrd_addr = 0
    if initrd:
        top = min(memory.size, kernel.initrd_addr_max + 1)
        initrd_addr = (top - len(initrd)) & ~(PAGE - 1)
        if initrd_addr < kernel.footprint_end:
            need = kernel.footprint_end + len(initrd) + PAGE
            raise ConfigError(
                f"the initrd ({len(initrd)} bytes) does not fit between the kernel (ending at "
                f"{kernel.footprint_end:#x}) and {top:#x}: the guest needs about "
                f"{-(-need // (1 << 20))} MiB")
    for seg in kernel.segments:
        loader._write_segment(memory, seg)
    if initrd:
        memory.write(initrd_addr, initrd)
    memory.write(BOOT_PARAMS_ADDR, build_boot_params(kernel.setup_header, memory.size,
                                                     initrd_addr, len(initrd)))
    memory.write(CMDLINE_ADDR, cmd + b"\0")
    loader._write_gdt(memory)
    loader._write_page_tables(memory)
    regs = Regs(rsi=BOOT_PARAMS_ADDR, rip=kernel.entry, rsp=loader.BOOT_STACK_TOP)
    return StartState(Mode.LONG64, regs, page_table_root=loader.PML4_ADDR,
                      gdt_base=loader.GDT_ADDR, gdt_limit=loader.GDT_LIMIT)


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """(base, length, type) of every e820 entry for a guest with ``ram_size`` bytes."""
    return loader.memory_map(ram_size)


def build_boot_params(setup_header: bytes, ram_size: int, initrd_addr: int,
                      initrd_size: int) -> bytes:
    """The zero page: the kernel's setup header with the loader's fields, and e820."""
    params = bytearray(BOOT_PARAMS_SIZE)
    params[HDR_START:HDR_START + len(setup_header)] = setup_header
    params[OFF_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    # LOADED_HIGH: the protected-mode kernel is at 1 MiB or above; no heap: the real-mode
    # setup code, the only user of heap_end_ptr, never runs.
    params[OFF_LOADFLAGS] = (params[OFF_LOADFLAGS] | LOADFLAG_LOADED_HIGH) \
        & ~LOADFLAG_CAN_USE_HEAP
    struct.pack_into("<H", params, OFF_HEAP_END_PTR, 0)
    struct.pack_into("<I", params, OFF_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", params, OFF_EXT_CMD_LINE_PTR, 0)
    struct.pack_into("<II", params, OFF_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF,
                     initrd_size & 0xFFFFFFFF)
    struct.pack_into("<II", params, OFF_EXT_RAMDISK_IMAGE, initrd_addr >> 32,
                     initrd_size >> 32)
    entries = e820_map(ram_size)
    params[OFF_E820_ENTRIES] = len(entries)
    for i, (base, length, kind) in enumerate(entries):
        struct.pack_into("<QQI", params, OFF_E820_TABLE + 20 * i, base, length, kind)
    return bytes(params)


def payload_format(payload: bytes) -> str:
    for magic, name in _PAYLOAD_FORMATS:
        if payload.startswith(magic):
            return name
    return "unknown"


def decompress_payload(payload: bytes) -> bytes:
    """The vmlinux inside a bzImage payload. The kernel build appends the decompressed
    size after the compressed stream, so bytes after the end of the stream are ignored."""
    fmt = payload_format(payload)
    try:
        if fmt == "gzip":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = inflater.decompress(payload)
            if not inflater.eof:
                raise ConfigError("the gzip payload is truncated")
            return out
        if fmt == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload)
        if fmt in ("xz", "lzma"):
            lz = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
            out = lz.decompress(payload)
            if not lz.eof:
                raise ConfigError(f"the {fmt} payload is truncated")
            return out
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise ConfigError(f"the {fmt} payload does not decompress: {e}") from None
    if fmt == "uncompressed ELF":
        return payload
    if fmt == "unknown":
        raise ConfigError(f"the payload's format is unknown (it starts with "
                          f"{payload[:6].hex()}); a kernel payload is gzip, bzip2, xz, lzma, "
                          f"lzo, lz4 or zstd")
    raise ConfigError(f"the payload is {fmt}-compressed, which Python cannot decompress; "
                      f"pass the uncompressed vmlinux (e.g. from extract-vmlinux) instead")


# --- parsing -----------------------------------------------------------------------------


def extract_vmlinux(image: bytes) -> bytes:
    """The vmlinux (ELF) inside a bzImage, after checking the setup header."""
    _check_setup_header(image)
    setup_sects = image[OFF_SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, OFF_PAYLOAD_OFFSET)
    start = pm_start + offset
    if length == 0 or start + length > len(image):
        raise ConfigError(
            f"the payload (offset {offset:#x} after the setup part at {pm_start:#x}, "
            f"{length} bytes) lies outside the file ({len(image)} bytes)")
    vmlinux = decompress_payload(image[start:start + length])
    if vmlinux[:4] != b"\x7fELF":
        raise ConfigError("the payload decompresses to something that is not an ELF file")
    return vmlinux


def _check_setup_header(image: bytes) -> int:
    """Validate the setup header; return where it ends."""
    if len(image) < 0x270:
        raise ConfigError(f"the file has {len(image)} bytes: too short for a bzImage setup "
                          f"header, and not an ELF file")
    if image[OFF_HEADER:OFF_HEADER + 4] != HEADER_MAGIC:
        raise ConfigError('no "HdrS" signature at offset 0x202 and no ELF magic: neither a '
                          'bzImage nor a vmlinux')
    flag = struct.unpack_from("<H", image, OFF_BOOT_FLAG)[0]
    if flag != BOOT_FLAG:
        raise ConfigError(f"boot_flag at 0x1fe is {flag:#06x}, not 0xaa55")
    version = struct.unpack_from("<H", image, OFF_VERSION)[0]
    if version < MIN_BZIMAGE_VERSION:
        raise ConfigError(
            f"boot protocol {version >> 8}.{version & 0xff:02d} is too old: the 64-bit entry "
            f"needs 2.12 or later (Linux 3.8+)")
    if not image[OFF_LOADFLAGS] & LOADFLAG_LOADED_HIGH:
        raise ConfigError("this is a zImage (loadflags bit 0 clear), not a bzImage")
    if not struct.unpack_from("<H", image, OFF_XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise ConfigError("the kernel has no 64-bit entry point (xloadflags bit 0 clear): "
                          "a 32-bit kernel")
    header_end = OFF_JUMP + 2 + image[OFF_JUMP + 1]
    if header_end > len(image) or header_end < OFF_INIT_SIZE + 4:
        raise ConfigError(f"the setup header ends at {header_end:#x}, which the jump at 0x200 "
                          f"gives; it must cover init_size at 0x260 and lie in the file")
    return header_end


def _parse_bzimage(image: bytes) -> KernelImage:
    header_end = _check_setup_header(image)
    vmlinux = extract_vmlinux(image)
    segments, entry = _parse_vmlinux(vmlinux)
    pref_address, = struct.unpack_from("<Q", image, OFF_PREF_ADDRESS)
    init_size, = struct.unpack_from("<I", image, OFF_INIT_SIZE)
    end = max(max(s.paddr + s.memsz for s in segments), pref_address + init_size)
    initrd_max, = struct.unpack_from("<I", image, OFF_INITRD_ADDR_MAX)
    cmdline_size, = struct.unpack_from("<I", image, OFF_CMDLINE_SIZE)
    return KernelImage(segments, entry, image[HDR_START:header_end], end,
                       initrd_max or DEFAULT_INITRD_ADDR_MAX,
                       cmdline_size or DEFAULT_CMDLINE_SIZE)


def _parse_vmlinux(image: bytes) -> tuple[tuple[loader.Segment, ...], int]:
    if len(image) < ELF64_EHDR.size:
        raise ConfigError(f"truncated ELF header: {len(image)} bytes, an ELF64 header needs "
                          f"{ELF64_EHDR.size}")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ELF64_EHDR.unpack_from(image)
    if ident[4] != loader.ELFCLASS64:
        raise ConfigError(f"ELF class {ident[4]} is not ELFCLASS64 (2): a Linux kernel for "
                          f"this loader is a 64-bit vmlinux")
    if ident[5] != loader.ELFDATA2LSB:
        raise ConfigError(f"ELF data encoding {ident[5]} is not little-endian (1)")
    if e_machine != EM_X86_64:
        raise ConfigError(f"ELF machine {e_machine} is not EM_X86_64 (62)")
    if e_type != loader.ET_EXEC:
        raise ConfigError(f"ELF type {e_type} is not an executable (ET_EXEC, 2)")
    if e_phnum == 0:
        raise ConfigError("ELF file has no program headers")
    if e_phentsize < ELF64_PHDR.size:
        raise ConfigError(f"ELF program header size {e_phentsize} is smaller than "
                          f"{ELF64_PHDR.size}")
    if e_phoff + e_phnum * e_phentsize > len(image):
        raise ConfigError(
            f"ELF program header table (offset {e_phoff:#x}, {e_phnum} entries of "
            f"{e_phentsize} bytes) runs past the end of the file ({len(image):#x} bytes)")
    segments: list[loader.Segment] = []
    entry: int | None = None
    for i in range(e_phnum):
        (p_type, _p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz,
         _p_align) = ELF64_PHDR.unpack_from(image, e_phoff + i * e_phentsize)
        if p_type != loader.PT_LOAD or p_memsz == 0:
            continue
        what = f"ELF segment {i}"
        if p_filesz > p_memsz:
            raise ConfigError(f"{what}: p_filesz {p_filesz:#x} is larger than p_memsz "
                              f"{p_memsz:#x}")
        if p_offset + p_filesz > len(image):
            raise ConfigError(
                f"{what}: file bytes {p_offset:#x}-{p_offset + p_filesz - 1:#x} run past the "
                f"end of the file ({len(image):#x} bytes)")
        segments.append(loader.Segment(p_paddr, image[p_offset:p_offset + p_filesz],
                                       p_memsz, what))
        # vmlinux's e_entry is already physical (startup_64 at LOAD_PHYSICAL_ADDR); other
        # ELF64 kernels give a virtual one, translated through its segment.
        if entry is None and p_paddr <= e_entry < p_paddr + p_memsz:
            entry = e_entry
        elif entry is None and p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry = e_entry - p_vaddr + p_paddr
    if not segments:
        raise ConfigError("ELF file has no loadable (PT_LOAD) segment with a size")
    if entry is None:
        raise ConfigError(f"ELF entry point {e_entry:#x} is not inside any loadable segment")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in itertools.pairwise(ordered):
        if b.paddr < a.paddr + a.memsz:
            raise ConfigError(f"{a.what} and {b.what} overlap in physical memory")
    return tuple(segments), entry


def _synthetic_header() -> bytes:
    """A setup header for a vmlinux loaded without its setup part: the fields a kernel
    reads from boot_params that a bzImage would have provided."""
    hdr = bytearray(OFF_INIT_SIZE + 4 - HDR_START)

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, hdr, offset - HDR_START, value)

    put("<H", OFF_BOOT_FLAG, BOOT_FLAG)
    hdr[OFF_HEADER - HDR_START:OFF_HEADER - HDR_START + 4] = HEADER_MAGIC
    put("<H", OFF_VERSION, SYNTHETIC_VERSION)
    put("<B", OFF_LOADFLAGS, LOADFLAG_LOADED_HIGH)
    put("<I", OFF_INITRD_ADDR_MAX, DEFAULT_INITRD_ADDR_MAX)
    put("<H", OFF_XLOADFLAGS, XLF_KERNEL_64)
    put("<I", OFF_CMDLINE_SIZE, 2047)
    return bytes(hdr)
