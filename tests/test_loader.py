"""hv/loader.py: Multiboot v1 and flat loading, the low-memory layout, every rejection."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

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
from hvmport.hv import loader
from hvmport.hv.memory import MIB, GuestMemory

MB_MAGIC = 0x1BADB002


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(16) as m:
        yield m


# --- building test images ------------------------------------------------------------------


@dataclass
class Phdr:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    p_type: int = 1  # PT_LOAD
    offset: int | None = None  # override the file offset (to break things)
    filesz: int | None = None


def mb_header(flags: int = 0x3, checksum: int | None = None, magic: int = MB_MAGIC) -> bytes:
    if checksum is None:
        checksum = -(magic + flags) & 0xFFFFFFFF
    return struct.pack("<III", magic, flags, checksum)


def make_elf(
    segments: Sequence[Phdr],
    entry: int,
    *,
    header: bytes | None = None,
    ei_class: int = 1,
    ei_data: int = 1,
    e_type: int = 2,
    e_machine: int = 3,
    phentsize: int = 32,
    phnum: int | None = None,
    phoff: int = 52,
) -> bytes:
    """A minimal ELF32 executable: header, program headers, then the Multiboot header and the
    segment contents, in that order in the file."""
    header = mb_header() if header is None else header
    n = len(segments)
    data_start = 52 + n * 32
    mb_off = data_start
    blob = bytearray(header)
    offsets = []
    for seg in segments:
        offsets.append(mb_off + len(blob))
        blob += seg.data
    ehdr = struct.pack(
        "<4sBBBB8sHHIIIIIHHHHHH", b"\x7fELF", ei_class, ei_data, 1, 0, b"", e_type, e_machine,
        1, entry, phoff, 0, 0, 52, phentsize, n if phnum is None else phnum, 0, 0, 0)
    phdrs = b"".join(
        struct.pack(
            "<IIIIIIII", seg.p_type, off if seg.offset is None else seg.offset,
            seg.paddr if seg.vaddr is None else seg.vaddr, seg.paddr,
            len(seg.data) if seg.filesz is None else seg.filesz,
            len(seg.data) if seg.memsz is None else seg.memsz, 7, 0x1000)
        for seg, off in zip(segments, offsets, strict=True))
    return ehdr + phdrs + bytes(blob)


def write(tmp_path: Path, data: bytes, name: str = "kernel.elf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


CODE = bytes(range(1, 65))


def simple_kernel(**kw: object) -> bytes:
    return make_elf([Phdr(0x100000, CODE, memsz=0x2000)], 0x100010, **kw)  # type: ignore[arg-type]


# --- GDT ---------------------------------------------------------------------------------


def descriptor(mem: GuestMemory, state: StartState, selector: int) -> dict[str, int]:
    raw = struct.unpack("<Q", mem.read(state.gdt_base + selector, 8))[0]
    limit = (raw & 0xFFFF) | ((raw >> 32) & 0xF0000)
    flags = (raw >> 52) & 0xF
    return {
        "base": ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) << 24),
        "limit": (limit << 12 | 0xFFF) if flags & 0x8 else limit,
        "type": (raw >> 40) & 0xF,
        "s": (raw >> 44) & 1,
        "dpl": (raw >> 45) & 3,
        "p": (raw >> 47) & 1,
        "l": (flags >> 1) & 1,
        "db": (flags >> 2) & 1,
    }


def check_gdt(mem: GuestMemory, state: StartState) -> None:
    assert state.gdt_base == loader.GDT_ADDR
    assert state.gdt_limit == 0x2F
    assert mem.read(state.gdt_base, 8) == bytes(8)  # null descriptor
    code32 = descriptor(mem, state, SEL_CODE32)
    assert code32 == {"base": 0, "limit": 0xFFFFFFFF, "type": 0xB, "s": 1, "dpl": 0, "p": 1,
                      "l": 0, "db": 1}
    data = descriptor(mem, state, SEL_DATA)
    assert data == {"base": 0, "limit": 0xFFFFFFFF, "type": 0x3, "s": 1, "dpl": 0, "p": 1,
                    "l": 0, "db": 1}
    code64 = descriptor(mem, state, SEL_CODE64)
    assert (code64["type"], code64["l"], code64["db"], code64["p"]) == (0xB, 1, 0, 1)
    code16 = descriptor(mem, state, SEL_CODE16)
    assert code16 == {"base": 0, "limit": 0xFFFF, "type": 0xB, "s": 1, "dpl": 0, "p": 1,
                      "l": 0, "db": 0}
    data16 = descriptor(mem, state, SEL_DATA16)
    assert data16 == {"base": 0, "limit": 0xFFFF, "type": 0x3, "s": 1, "dpl": 0, "p": 1,
                      "l": 0, "db": 0}


# --- Multiboot: what a good kernel gets ------------------------------------------------------


def test_multiboot_entry_state(mem: GuestMemory, tmp_path: Path) -> None:
    state = loader.load_multiboot(write(tmp_path, simple_kernel()), mem)
    assert state.mode is Mode.PROT32
    assert state.regs.rax == 0x2BADB002
    assert state.regs.rbx == loader.MBI_ADDR
    assert state.regs.rip == 0x100010
    assert state.regs.rsp == loader.BOOT_STACK_TOP
    assert state.regs.rflags == 0x2  # interrupts off, as the spec demands
    assert state.page_table_root == 0
    check_gdt(mem, state)


def test_multiboot_segment_loaded_and_bss_zeroed(mem: GuestMemory, tmp_path: Path) -> None:
    mem.write(0x100000, b"\xaa" * 0x3000)  # stale contents the loader must clear
    loader.load_multiboot(write(tmp_path, simple_kernel()), mem)
    assert mem.read(0x100000, len(CODE)) == CODE
    assert mem.read(0x100000 + len(CODE), 0x2000 - len(CODE)) == bytes(0x2000 - len(CODE))
    assert mem.read(0x102000, 0x1000) == b"\xaa" * 0x1000  # beyond memsz: untouched


def test_multiboot_info_structure(mem: GuestMemory, tmp_path: Path) -> None:
    state = loader.load_multiboot(write(tmp_path, simple_kernel()), mem, cmdline="console=e9 x=1")
    info = mem.read(state.regs.rbx, 88)
    flags, mem_lower, mem_upper = struct.unpack_from("<III", info, 0)
    assert flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert mem_lower == 639
    assert mem_upper == (16 * MIB - MIB) // 1024
    cmdline_addr, mods_count, _mods_addr = struct.unpack_from("<III", info, 16)
    assert mods_count == 0
    assert mem.read(cmdline_addr, 15) == b"console=e9 x=1\0"
    name_addr = struct.unpack_from("<I", info, 64)[0]
    assert mem.read(name_addr, 8) == b"hvmport\0"
    # Everything the kernel is told about lies in low memory it does not occupy.
    for addr in (state.regs.rbx, cmdline_addr, name_addr):
        assert loader.GDT_ADDR < addr < loader.LOW_RESERVED_END


def parse_mmap(mem: GuestMemory, info_addr: int) -> list[tuple[int, int, int]]:
    length, addr = struct.unpack("<II", mem.read(info_addr + 44, 8))
    entries = []
    pos = addr
    while pos < addr + length:
        size = struct.unpack("<I", mem.read(pos, 4))[0]
        base, ln, kind = struct.unpack("<QQI", mem.read(pos + 4, 20))
        entries.append((base, ln, kind))
        pos += size + 4
    assert pos == addr + length
    return entries


@pytest.mark.parametrize("mib", [2, 16, 3072])
def test_multiboot_memory_map(tmp_path: Path, mib: int) -> None:
    with GuestMemory(mib) as m:
        state = loader.load_multiboot(write(tmp_path, simple_kernel()), m)
        assert parse_mmap(m, state.regs.rbx) == [
            (0, 0x9FC00, 1),
            (0x9FC00, 0x100000 - 0x9FC00, 2),
            (0x100000, mib * MIB - 0x100000, 1),
        ]
        assert struct.unpack("<I", m.read(state.regs.rbx + 8, 4))[0] == (mib - 1) * 1024


def test_multiboot_empty_and_longest_cmdline(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = write(tmp_path, simple_kernel())
    state = loader.load_multiboot(kernel, mem)
    addr = struct.unpack("<I", mem.read(state.regs.rbx + 16, 4))[0]
    assert mem.read(addr, 1) == b"\0"
    longest = "k" * loader.CMDLINE_MAX
    loader.load_multiboot(kernel, mem, cmdline=longest)
    assert mem.read(addr, loader.CMDLINE_MAX + 1) == longest.encode() + b"\0"


def test_multiboot_cmdline_rejections(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = write(tmp_path, simple_kernel())
    with pytest.raises(ConfigError, match="4096 bytes; at most 4095"):
        loader.load_multiboot(kernel, mem, cmdline="k" * 4096)
    with pytest.raises(ConfigError, match="NUL"):
        loader.load_multiboot(kernel, mem, cmdline="a\0b")


def test_multiboot_virtual_entry_is_translated(mem: GuestMemory, tmp_path: Path) -> None:
    """A higher-half kernel: vaddr 0xc0100000 at paddr 0x100000; paging is off at entry."""
    elf = make_elf([Phdr(0x100000, CODE, vaddr=0xC0100000),
                    Phdr(0x200000, b"data", memsz=0x100, vaddr=0xC0200000)], 0xC0100020)
    state = loader.load_multiboot(write(tmp_path, elf), mem)
    assert state.regs.rip == 0x100020
    assert mem.read(0x200000, 4) == b"data"


def test_multiboot_header_anywhere_in_first_8k(mem: GuestMemory, tmp_path: Path) -> None:
    """The header need not come first: put it at the last possible place (8192 - 12)."""
    pad = 8192 - 12 - (52 + 32)
    elf = make_elf([Phdr(0x100000, CODE)], 0x100000, header=bytes(pad) + mb_header())
    assert elf.find(mb_header()) == 8192 - 12
    assert loader.load_multiboot(write(tmp_path, elf), mem).regs.rip == 0x100000


def test_multiboot_non_load_segments_ignored(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Phdr(0x0, b"note", p_type=4), Phdr(0x100000, CODE)], 0x100000)
    loader.load_multiboot(write(tmp_path, elf), mem)
    assert mem.read(0, 4) == bytes(4)


def aout_image(header_at: int = 0x40, load_addr: int = 0x100000, *, header_addr: int | None = None,
               load_end: int | None = None, bss_end: int | None = None,
               entry: int | None = None) -> bytes:
    """A non-ELF kernel described only by its Multiboot address fields (flags bit 16)."""
    body = CODE * 4
    flags = 0x00010003
    header_addr = load_addr + header_at if header_addr is None else header_addr
    image = bytearray(b"\x90" * header_at)
    image += mb_header(flags)
    image += struct.pack("<5I", header_addr,
                         load_addr,
                         load_addr + header_at + 32 + len(body) if load_end is None else load_end,
                         load_addr + 0x8000 if bss_end is None else bss_end,
                         load_addr if entry is None else entry)
    image += body
    return bytes(image)


def test_multiboot_aout_kludge(mem: GuestMemory, tmp_path: Path) -> None:
    image = aout_image(entry=0x100004)
    mem.write(0x100000, b"\xcc" * 0x9000)
    state = loader.load_multiboot(write(tmp_path, image, "kernel.bin"), mem)
    assert state.regs.rip == 0x100004
    assert mem.read(0x100000, len(image)) == image
    assert mem.read(0x100000 + len(image), 0x8000 - len(image)) == bytes(0x8000 - len(image))
    assert mem.read(0x108000, 4) == b"\xcc" * 4


def test_multiboot_aout_kludge_load_to_end_of_file(mem: GuestMemory, tmp_path: Path) -> None:
    image = aout_image(load_end=0, bss_end=0) + b"TAIL"
    loader.load_multiboot(write(tmp_path, image, "kernel.bin"), mem)
    assert mem.read(0x100000 + len(image) - 4, 4) == b"TAIL"


# --- Multiboot: every rejection -------------------------------------------------------------

ELF_OK = [Phdr(0x100000, CODE)]


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "kernel file is empty"),
        (b"\0" * 9000, r"no Multiboot header \(magic 0x1badb002, 4-byte aligned\) in the first "
                       "8192 bytes"),
        (bytes(8192) + mb_header(), "no Multiboot header"),
        (bytes(2) + mb_header() + bytes(100), "no Multiboot header"),  # misaligned
        (mb_header(checksum=0x12345678), "offset 0x0 has a bad checksum 0x12345678"),
        (bytes(8) + struct.pack("<IIII", 0xE85250D6, 0, 16, -(0xE85250D6 + 16) & 0xFFFFFFFF),
         "Multiboot2 kernel"),
        (mb_header(flags=0x7) + bytes(64), r"require video mode information \(bit 2\)"),
        (mb_header(flags=0x23) + bytes(64), r"features this loader does not know \(bits 5\)"),
        (mb_header(flags=0x8003) + bytes(64), r"\(bits 15\)"),
        (mb_header() + bytes(64), "not an ELF file, and the Multiboot header does not set flags "
                                  r"bit 16 \(a.out kludge\)"),
        (simple_kernel(ei_class=2), r"64-bit ELF \(ELFCLASS64\)"),
        (simple_kernel(ei_class=3), "invalid ELF class 3"),
        (simple_kernel(ei_data=2), "not little-endian"),
        (simple_kernel(e_machine=62), r"ELF machine 62 is not EM_386 \(3\)"),
        (simple_kernel(e_type=3), r"ELF type 3 is not an executable \(ET_EXEC, 2\)"),
        (make_elf(ELF_OK, 0x100000, phnum=0), "no program headers"),
        (make_elf(ELF_OK, 0x100000, phentsize=16), "program header size 16 is smaller"),
        (make_elf(ELF_OK, 0x100000, phoff=0x10000), "program header table .* runs past the "
                                                    "end of the file"),
        (make_elf([Phdr(0x100000, CODE, memsz=8)], 0x100000), "p_filesz 0x40 is larger than "
                                                             "p_memsz 0x8"),
        (make_elf([Phdr(0x100000, CODE, offset=0x5000)], 0x100000), "ELF segment 0: file bytes "
                                                                    ".* run past the end"),
        (make_elf([Phdr(0x100000, CODE, p_type=4)], 0x100000), r"no loadable \(PT_LOAD\)"),
        (make_elf(ELF_OK, 0x200000), "entry point 0x200000 is not inside any loadable"),
        (make_elf([Phdr(0xFF0000, CODE, memsz=0x20000)], 0xFF0000),
         r"ELF segment 0 \(0xff0000-0x100ffff\) does not fit in guest RAM, which ends at "
         r"0x1000000 \(16 MiB\)"),
        (make_elf([Phdr(0x8000, CODE)], 0x8000), "overlaps the loader's reserved low memory"),
        (make_elf([Phdr(0xFFFF, CODE)], 0xFFFF), "overlaps the loader's reserved low memory"),
        (make_elf([Phdr(0xA0000, CODE)], 0xA0000), "overlaps the legacy hole"),
        (make_elf([Phdr(0x9F000, CODE, memsz=0x1000)], 0x9F000), "overlaps the legacy hole"),
        (make_elf([Phdr(0x100000, CODE, memsz=0x1000), Phdr(0x100800, CODE)], 0x100000),
         r"ELF segment 0 \(0x100000-0x100fff\) and ELF segment 1 \(0x100800-0x10083f\) overlap"),
        (b"\x7fELF\x01\0\0\0" + mb_header() + bytes(20), "truncated ELF header"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_multiboot_rejects(mem: GuestMemory, tmp_path: Path, image: bytes, message: str) -> None:
    path = write(tmp_path, image)
    with pytest.raises(ConfigError, match=message) as info:
        loader.load_multiboot(path, mem)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"header_addr": 0x0FFFFF}, "load_addr 0x100000 is above header_addr 0xfffff"),
        ({"header_addr": 0x101000}, "larger than the header's file offset"),
        ({"load_end": 0x100000}, "load_end_addr 0x100000 is not above load_addr"),
        ({"load_end": 0x180000}, "needs 0x80000 bytes from file offset 0x0, but the file has "
                                 "only"),
        ({"bss_end": 0x100010}, "bss_end_addr 0x100010 is below the end of the loaded image"),
        ({"entry": 0x0FFFFF}, "entry_addr 0xfffff is outside the loaded image"),
        ({"entry": 0x180000}, "entry_addr 0x180000 is outside the loaded image"),
        ({"load_addr": 0x8000}, "a.out-kludge image .* overlaps the loader's reserved low"),
        ({"load_addr": 0xFFF000}, "does not fit in guest RAM"),
    ],
)
def test_multiboot_aout_kludge_rejects(mem: GuestMemory, tmp_path: Path, kw: dict[str, int],
                                       message: str) -> None:
    path = write(tmp_path, aout_image(**kw), "kernel.bin")
    with pytest.raises(ConfigError, match=message):
        loader.load_multiboot(path, mem)


def test_multiboot_aout_fields_past_8k(mem: GuestMemory, tmp_path: Path) -> None:
    image = aout_image(header_at=8192 - 16)
    with pytest.raises(ConfigError, match="address fields run past the first 8192 bytes"):
        loader.load_multiboot(write(tmp_path, image, "kernel.bin"), mem)


def test_multiboot_missing_file(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read kernel: No such file"):
        loader.load_multiboot(tmp_path / "nope.elf", mem)


def test_multiboot_rejection_writes_nothing(mem: GuestMemory, tmp_path: Path) -> None:
    """A kernel is checked completely before any byte of it is written."""
    elf = make_elf([Phdr(0x100000, CODE), Phdr(0x5000, CODE)], 0x100000)
    with pytest.raises(ConfigError):
        loader.load_multiboot(write(tmp_path, elf), mem)
    assert mem.read(0x100000, len(CODE)) == bytes(len(CODE))
    assert mem.read(loader.MBI_ADDR, 88) == bytes(88)


# --- flat loading -------------------------------------------------------------------------


def test_flat_prot32(mem: GuestMemory) -> None:
    state = loader.load_flat(CODE, mem, 0x100000, Mode.PROT32)
    assert mem.read(0x100000, len(CODE)) == CODE
    assert state.mode is Mode.PROT32
    assert state.regs == Regs(rip=0x100000, rsp=loader.BOOT_STACK_TOP)
    assert state.page_table_root == 0
    assert state.real_cs == 0
    check_gdt(mem, state)


def translate(mem: GuestMemory, root: int, va: int) -> tuple[int, int]:
    """Walk 4-level page tables; return (physical address, combined U/W bits)."""
    table = root
    rights = 0b110
    for shift in (39, 30, 21):
        entry = struct.unpack("<Q", mem.read(table + ((va >> shift) & 511) * 8, 8))[0]
        assert entry & 1, f"{va:#x}: not present at level {shift}"
        rights &= entry & 0b110
        if entry & 0x80:
            assert shift == 21, "only 2 MiB pages expected"
            return (entry & 0xFFFFFFFE00000) | (va & 0x1FFFFF), rights
        table = entry & 0xFFFFFFFFFF000
    raise AssertionError("4 KiB pages are not expected")


def test_flat_long64_page_tables(mem: GuestMemory) -> None:
    state = loader.load_flat(CODE, mem, 0x100000, Mode.LONG64)
    assert state.mode is Mode.LONG64
    assert state.page_table_root == loader.PML4_ADDR
    assert state.regs.rip == 0x100000
    assert state.regs.rsp == loader.BOOT_STACK_TOP
    check_gdt(mem, state)
    for va in (0, 0x1000, 0x100000, 0x1FFFFF, 0x200000, 0x12345678, 0xBFFFFFFF, 0xC0000000,
               0xFEE00000, 0xFFFFFFFF):
        assert translate(mem, state.page_table_root, va) == (va, 0b110)
    # Exactly 4 GiB: the fifth PDPT entry and the second PML4 entry are absent.
    assert struct.unpack("<Q", mem.read(loader.PDPT_ADDR + 4 * 8, 8))[0] == 0
    assert struct.unpack("<Q", mem.read(loader.PML4_ADDR + 8, 8))[0] == 0
    # The tables live in the reserved area, away from any image.
    assert loader.PML4_ADDR >= 0x1000
    assert loader.PD_ADDR + loader.PD_COUNT * 4096 <= loader.BOOT_STACK_BOTTOM


def test_flat_long64_tables_do_not_depend_on_ram_size() -> None:
    """Identity tables cover 4 GiB whatever the RAM: the guest sees MMIO addresses too."""
    with GuestMemory(2) as small:
        state = loader.load_flat(b"\xf4", small, 0x100000, Mode.LONG64)
        assert translate(small, state.page_table_root, 0xFEE00000) == (0xFEE00000, 0b110)


@pytest.mark.parametrize(
    ("address", "cs", "ip"),
    [(0x10000, 0x1000, 0x0), (0x23450, 0x2000, 0x3450), (0x8E000, 0x8000, 0xE000)],
)
def test_flat_real16(mem: GuestMemory, address: int, cs: int, ip: int) -> None:
    state = loader.load_flat(CODE, mem, address, Mode.REAL16)
    assert state.mode is Mode.REAL16
    assert state.real_cs == cs
    assert state.regs.rip == ip
    assert state.regs.rsp == loader.REAL16_SP
    assert (state.real_cs << 4) + state.regs.rip == address
    assert mem.read(address, len(CODE)) == CODE
    check_gdt(mem, state)


def test_flat_real16_largest_image(mem: GuestMemory) -> None:
    image = b"\x90" * 0xF000
    state = loader.load_flat(image, mem, 0x20000, Mode.REAL16)
    assert state.real_cs == 0x2000
    assert mem.read(0x20000, 0xF000) == image


@pytest.mark.parametrize(
    ("data", "address", "mode", "message"),
    [
        (b"", 0x100000, Mode.PROT32, "flat image is empty"),
        (CODE, 0x8000, Mode.PROT32, r"flat image of 64 bytes \(0x8000-0x803f\) overlaps the "
                                    "loader's reserved low memory 0x0-0xffff"),
        (CODE, 0x0, Mode.LONG64, "overlaps the loader's reserved low memory"),
        (CODE, 0xB8000, Mode.PROT32, "overlaps the legacy hole"),
        (CODE, 0xFFFFF0, Mode.PROT32, r"does not fit in guest RAM, which ends at 0x1000000"),
        (b"\0" * (16 * MIB), 0x100000, Mode.LONG64, "does not fit in guest RAM"),
        (CODE, -1, Mode.PROT32, "load address must be a non-negative integer"),
        (CODE, 0x10000, "long", "unknown mode"),
        (CODE, 0x90000, Mode.REAL16, "must start below 0x90000"),
        (CODE, 0x1FFF0, Mode.REAL16, "fit in one 64 KiB segment and leave its top 4 KiB for the "
                                     r"stack, i.e. end by 0x1f000 \(segment 0x10000\)"),
        (b"\x90" * 0xF001, 0x10000, Mode.REAL16, "0x1 bytes too long"),
        (CODE, 0x9F000, Mode.REAL16, "must start below 0x90000"),
        (CODE, 0x9FC00, Mode.REAL16, "overlaps the legacy hole"),
    ],
    ids=lambda v: v if isinstance(v, str) else (f"{v:#x}" if isinstance(v, int) else None),
)
def test_flat_rejects(mem: GuestMemory, data: bytes, address: int, mode: Mode,
                      message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loader.load_flat(data, mem, address, mode)


def test_flat_rejects_non_bytes(mem: GuestMemory) -> None:
    with pytest.raises(ConfigError, match="flat image must be bytes, not str"):
        loader.load_flat("code", mem, 0x100000, Mode.PROT32)  # type: ignore[arg-type]


def test_flat_accepts_bytearray_and_memoryview(mem: GuestMemory) -> None:
    loader.load_flat(bytearray(b"ab"), mem, 0x100000, Mode.PROT32)
    loader.load_flat(memoryview(b"cd"), mem, 0x100002, Mode.PROT32)
    assert mem.read(0x100000, 4) == b"abcd"


def test_flat_at_the_very_end_of_ram(mem: GuestMemory) -> None:
    loader.load_flat(b"END!", mem, mem.size - 4, Mode.PROT32)
    assert mem.read(mem.size - 4, 4) == b"END!"


# --- SMP --------------------------------------------------------------------------------


def test_for_vcpu(mem: GuestMemory) -> None:
    state = loader.load_flat(CODE, mem, 0x100000, Mode.LONG64)
    states = [loader.for_vcpu(state, i, 4) for i in range(4)]
    for i, s in enumerate(states):
        assert s.regs.rsi == i
        assert s.regs.rdi == 4
        assert (s.mode, s.page_table_root, s.gdt_base, s.gdt_limit, s.real_cs) == (
            state.mode, state.page_table_root, state.gdt_base, state.gdt_limit, state.real_cs)
        assert (s.regs.rip, s.regs.rsp, s.regs.rax) == (state.regs.rip, state.regs.rsp,
                                                        state.regs.rax)
    # Copies: changing one vCPU's registers changes no other state.
    states[1].regs.rax = 0x1234
    assert states[0].regs.rax == 0 and state.regs.rax == 0
    assert state.regs.rsi == 0 and state.regs.rdi == 0


def test_for_vcpu_without_count_keeps_rdi(mem: GuestMemory) -> None:
    state = loader.load_flat(CODE, mem, 0x100000, Mode.PROT32)
    state.regs.rdi = 0x77
    assert loader.for_vcpu(state, 3).regs.rdi == 0x77


@pytest.mark.parametrize(("vcpu_id", "count"), [(-1, None), (2, 2), (0, 0), (True, None)])
def test_for_vcpu_rejects(mem: GuestMemory, vcpu_id: int, count: int | None) -> None:
    state = loader.load_flat(CODE, mem, 0x100000, Mode.PROT32)
    with pytest.raises(ValueError):
        loader.for_vcpu(state, vcpu_id, count)


def test_multiboot_ramdisk_is_one_page_aligned_module_after_the_kernel(
        mem: GuestMemory, tmp_path: Path) -> None:
    rd = tmp_path / "initrd.img"
    rd.write_bytes(bytes(range(256)) * 20)
    state = loader.load_multiboot(write(tmp_path, simple_kernel()), mem, module=rd)
    info = mem.read(state.regs.rbx, 88)
    mods_count, mods_addr = struct.unpack_from("<II", info, 20)
    assert mods_count == 1
    start, end, string, reserved = struct.unpack("<IIII", mem.read(mods_addr, 16))
    assert start % 4096 == 0 and start >= 0x100000 + 0x2000  # after the kernel's last byte
    assert end - start == 5120 and reserved == 0
    assert mem.read(start, end - start) == rd.read_bytes()
    assert mem.read(string, 11) == b"initrd.img\0"


def test_multiboot_ramdisk_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    rd = tmp_path / "big.img"
    rd.write_bytes(bytes(3 * MIB))
    with GuestMemory(2) as small, pytest.raises(ConfigError, match="does not fit"):
        loader.load_multiboot(write(tmp_path, simple_kernel()), small, module=rd)
    with GuestMemory(2) as small, pytest.raises(ConfigError, match="cannot read ramdisk"):
        loader.load_multiboot(write(tmp_path, simple_kernel()), small,
                              module=tmp_path / "missing")
