"""hv/linuxboot.py: the Linux boot protocol (bzImage and vmlinux, boot_params, e820, initrd).

The images are built here: a vmlinux is an ELF64 wrapped around machine code assembled with
GNU as, and a bzImage is a setup header in front of that vmlinux, compressed. The same
images run end to end on both backends, where the guest reads boot_params back.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hvmport_run

from hvmport import toolchain
from hvmport.cpu.base import Mode
from hvmport.errors import ConfigError
from hvmport.hv import linuxboot, loader
from hvmport.hv.memory import MIB, GuestMemory

KERNEL_AT = 0x1000000
VIRT_BASE = 0xFFFFFFFF81000000

#: The guest: checks the loader type, echoes the command line and the initrd to the debug
#: console, then exits with the number of e820 entries (isa-debug-exit: (n << 1) | 1).
GUEST = r"""
    movzbl 0x210(%rsi), %eax
    cmp $0xff, %eax
    jne fail
    mov 0x228(%rsi), %ebx
1:  movb (%rbx), %al
    test %al, %al
    jz 2f
    outb %al, $0xe9
    inc %rbx
    jmp 1b
2:  movb $'\n', %al
    outb %al, $0xe9
    mov 0x218(%rsi), %ebx
    mov 0x21c(%rsi), %ecx
    test %ecx, %ecx
    jz 4f
3:  movb (%rbx), %al
    outb %al, $0xe9
    inc %rbx
    loop 3b
4:  movb $'\n', %al
    outb %al, $0xe9
    movzbl 0x1e8(%rsi), %eax
    outb %al, $0xf4
fail:
    movb $0x55, %al
    outb %al, $0xf4
    hlt
"""


def code() -> bytes:
    return toolchain.assemble_flat(GUEST, 64, KERNEL_AT)


def elf64(segments: list[tuple[int, int, bytes, int]], entry: int, *, machine: int = 62,
          elf_class: int = 2, e_type: int = 2) -> bytes:
    """An ELF64 executable; segments are (vaddr, paddr, data, memsz)."""
    phoff = 64
    data_at = 0x1000
    phdrs = b""
    blobs = b""
    for vaddr, paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_at + len(blobs), vaddr, paddr,
                             len(data), memsz, 0x1000)
        blobs += data
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0,
                         64, 56, len(segments), 64, 0, 0)
    return (header + phdrs).ljust(data_at, b"\0") + blobs


def vmlinux() -> bytes:
    """Linked like a real vmlinux: virtual addresses high, e_entry physical."""
    return elf64([(VIRT_BASE, KERNEL_AT, code(), 0x10000)], KERNEL_AT)


def bzimage(payload: bytes, *, version: int = 0x020F, loadflags: int = 1,
            xloadflags: int = 1, boot_flag: int = 0xAA55, header_len: int = 0x6A,
            payload_length: int | None = None, init_size: int = 0x200000) -> bytes:
    setup = bytearray(1024)  # boot sector + one setup sector
    setup[0x1F1] = 1
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = header_len
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)
    struct.pack_into("<II", setup, 0x248, 0,
                     len(payload) if payload_length is None else payload_length)
    struct.pack_into("<Q", setup, 0x258, KERNEL_AT)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def with_size(stream: bytes, size: int) -> bytes:
    """The kernel build appends the decompressed size after the stream."""
    return stream + struct.pack("<I", size)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(64) as m:
        yield m


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["gzip", "bzip2", "xz", "lzma", "none"])
def test_bzimage_payload_is_decompressed_and_loaded(mem: GuestMemory, compress: str) -> None:
    elf = vmlinux()
    stream = {"gzip": lambda b: gzip.compress(b),
              "bzip2": lambda b: bz2.compress(b),
              "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ,
                                            check=lzma.CHECK_CRC32),
              "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
              "none": lambda b: b}[compress](elf)
    kernel = linuxboot.parse(bzimage(with_size(stream, len(elf))))
    state = linuxboot.place(kernel, mem, "console=ttyS0")
    assert state.mode is Mode.LONG64
    assert state.regs.rip == KERNEL_AT
    assert state.regs.rsi == linuxboot.BOOT_PARAMS_ADDR
    assert state.regs.rflags & 0x200 == 0  # interrupts off
    assert state.page_table_root == loader.PML4_ADDR
    assert mem.read(KERNEL_AT, len(code())) == code()
    assert mem.read(KERNEL_AT + len(code()), 16) == bytes(16)  # memsz beyond filesz zeroed
    # init_size reaches beyond the segments: that is the kernel's footprint.
    assert kernel.footprint_end == KERNEL_AT + 0x200000


def test_boot_params_fields(mem: GuestMemory) -> None:
    kernel = linuxboot.parse(bzimage(gzip.compress(vmlinux())))
    initrd = b"initrd-bytes" * 1000
    linuxboot.place(kernel, mem, "root=/dev/ram0 quiet", initrd)
    bp = mem.read(linuxboot.BOOT_PARAMS_ADDR, 4096)
    # The setup header is the kernel's own, with the loader's fields filled in.
    assert bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x206)[0] == 0x020F
    assert bp[0x210] == 0xFF
    assert bp[0x211] & 0x01 and not bp[0x211] & 0x80
    cmd_ptr = struct.unpack_from("<I", bp, 0x228)[0]
    assert mem.read(cmd_ptr, 21) == b"root=/dev/ram0 quiet\0"
    image, size = struct.unpack_from("<II", bp, 0x218)
    assert size == len(initrd)
    assert image % 4096 == 0
    assert image + size <= mem.size and image >= kernel.footprint_end
    assert mem.read(image, size) == initrd
    assert struct.unpack_from("<II", bp, 0x0C0) == (0, 0)
    entries = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(bp[0x1E8])]
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2),
                       (0x100000, mem.size - 0x100000, 1)]


def test_vmlinux_gets_a_synthetic_setup_header(mem: GuestMemory) -> None:
    kernel = linuxboot.parse(vmlinux())
    linuxboot.place(kernel, mem, "")
    bp = mem.read(linuxboot.BOOT_PARAMS_ADDR, 4096)
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x236)[0] & 1  # XLF_KERNEL_64
    assert kernel.footprint_end == KERNEL_AT + 0x10000


def test_virtual_entry_is_translated(mem: GuestMemory) -> None:
    image = elf64([(VIRT_BASE, KERNEL_AT, code(), 0x1000)], VIRT_BASE + 4)
    state = linuxboot.place(linuxboot.parse(image), mem, "")
    assert state.regs.rip == KERNEL_AT + 4


def test_detection() -> None:
    assert linuxboot.is_linux_image(bzimage(b"x")[:0x300])
    assert linuxboot.is_linux_image(vmlinux()[:0x300])
    assert not linuxboot.is_linux_image(elf64([(0, 0x100000, b"\x90", 1)], 0x100000,
                                              machine=3)[:0x300])
    assert not linuxboot.is_linux_image(b"\x02\xb0\xad\x1b" + bytes(0x300))


# --- rejections ------------------------------------------------------------------------------

BAD_IMAGES = {
    "empty": (b"", "empty"),
    "short": (b"\0" * 100, "too short"),
    "no signature": (bytes(0x400), "neither a bzImage nor a vmlinux"),
    "boot flag": (bzimage(b"", boot_flag=0x1234), "boot_flag"),
    "old protocol": (bzimage(b"", version=0x0204), "too old"),
    "zImage": (bzimage(b"", loadflags=0), "zImage"),
    "32-bit": (bzimage(b"", xloadflags=0), "no 64-bit entry"),
    "short header": (bzimage(b"", header_len=0x20), "setup header ends"),
    "payload outside": (bzimage(b"\x1f\x8b", payload_length=100000), "outside the file"),
    "zstd": (bzimage(b"\x28\xb5\x2f\xfd" + bytes(20)), "zstd-compressed"),
    "lz4": (bzimage(b"\x02\x21\x4c\x18" + bytes(20)), "lz4-compressed"),
    "unknown payload": (bzimage(b"\x00\x11\x22\x33" + bytes(20)), "format is unknown"),
    "corrupt gzip": (bzimage(b"\x1f\x8b\x08\x00" + bytes(30)), "does not decompress"),
    "truncated xz": (bzimage(lzma.compress(b"A" * 5000)[:40]), "truncated"),
    "payload not ELF": (bzimage(gzip.compress(b"hello")), "not an ELF"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_bzimage(name: str) -> None:
    image, message = BAD_IMAGES[name]
    with pytest.raises(ConfigError, match=message):
        linuxboot.parse(image)


def test_bad_elf() -> None:
    good = [(VIRT_BASE, KERNEL_AT, b"\x90" * 16, 16)]
    cases = [
        (elf64(good, KERNEL_AT, elf_class=1), "ELFCLASS64"),
        (elf64(good, KERNEL_AT, machine=3), "EM_X86_64"),
        (elf64(good, KERNEL_AT, e_type=3), "ET_EXEC"),
        (elf64(good, 0x5000), "not inside any loadable segment"),
        (elf64([], KERNEL_AT), "no program headers"),
        (elf64([(VIRT_BASE, KERNEL_AT, b"\x90" * 16, 8)], KERNEL_AT), "p_filesz"),
        (elf64(good, KERNEL_AT)[:0x1008], "run past the end"),
        (elf64([*good, (VIRT_BASE, KERNEL_AT + 8, b"\x90" * 16, 16)], KERNEL_AT), "overlap"),
        (vmlinux()[:40], "truncated ELF header"),
    ]
    for image, message in cases:
        with pytest.raises(ConfigError, match=message):
            linuxboot.parse(image)


def test_placement_errors(mem: GuestMemory) -> None:
    kernel = linuxboot.parse(vmlinux())
    with pytest.raises(ConfigError, match="at most 2047"):
        linuxboot.place(kernel, mem, "x" * 2048)
    with pytest.raises(ConfigError, match="does not fit"):
        linuxboot.place(kernel, mem, "", b"\1" * (mem.size - KERNEL_AT))
    big = linuxboot.parse(bzimage(gzip.compress(vmlinux()), init_size=128 * MIB))
    with pytest.raises(ConfigError, match="the kernel needs memory up to"):
        linuxboot.place(big, mem, "")
    low = elf64([(0x8000, 0x8000, b"\x90", 1)], 0x8000)
    with pytest.raises(ConfigError, match="reserved low memory"):
        linuxboot.place(linuxboot.parse(low), mem, "")


def test_load_linux_names_the_file(tmp_path: Path, mem: GuestMemory) -> None:
    bad = tmp_path / "bzImage"
    bad.write_bytes(bzimage(b"", version=0x0200))
    with pytest.raises(ConfigError, match="too old") as info:
        linuxboot.load_linux(bad, mem)
    assert str(bad) in str(info.value)
    good = tmp_path / "vmlinux"
    good.write_bytes(vmlinux())
    empty = tmp_path / "initrd"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="initrd is empty"):
        linuxboot.load_linux(good, mem, "", empty)
    with pytest.raises(ConfigError, match="cannot read initrd"):
        linuxboot.load_linux(good, mem, "", tmp_path / "missing")


# --- end to end: the guest reads what the loader wrote -----------------------------------


@pytest.mark.parametrize("kind", ["vmlinux", "bzImage"])
def test_guest_reads_boot_params(tmp_path: Path, backend: str, kind: str) -> None:
    image = vmlinux() if kind == "vmlinux" else bzimage(
        with_size(lzma.compress(vmlinux(), check=lzma.CHECK_CRC32), len(vmlinux())))
    kernel = tmp_path / kind
    kernel.write_bytes(image)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD-CONTENT")
    run = hvmport_run(tmp_path, "--backend", backend, "--memory", "64", "--no-device-model",
                      "--kernel", str(kernel), "--ramdisk", str(initrd),
                      "--cmdline", "console=ttyS0 hello")
    assert run.lines() == ["console=ttyS0 hello", "INITRD-CONTENT"], run.stderr
    assert run.status == (3 << 1) | 1, run.stderr


def test_a_ramdisk_needs_a_kernel_not_a_flat_binary(tmp_path: Path) -> None:
    """A Linux kernel takes it as its initrd, a Multiboot kernel as its one module (see
    test_loader); a flat binary has nowhere to be told where it is."""
    from conftest import guest

    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    run = hvmport_run(tmp_path, "--backend", "unicorn", "--kernel", guest("demo", "flat32"),
                      "--mode", "32", "--ramdisk", str(initrd))
    assert run.status == 2
    assert "a ramdisk needs a Linux or Multiboot kernel, not a flat binary" in run.stderr
