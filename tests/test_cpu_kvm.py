"""The KVM CPU backend, driven by real guest code (assembled with GNU as).

Tests that need /dev/kvm skip, with the reason, only when ``probe_kvm`` says it is unusable.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from support import DEBUG_EXIT_PORT, ConsoleIo

from hvmport.abi import kvm as abi
from hvmport.core.cpuid import hypervisor_leaves
from hvmport.cpu import kvm as kvmcpu
from hvmport.cpu.base import (
    GDT_NULL,
    SEL_CODE16,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_DATA16,
    Exit,
    ExitKind,
    MmioAccess,
    Mode,
    PortAccess,
    Regs,
    StartState,
    VcpuContext,
    VcpuStop,
    VmConfig,
)
from hvmport.cpu.kvm import KvmBackend, KvmVcpu, KvmVm, merge_cpuid, probe_kvm
from hvmport.hv.memory import GuestMemory
from hvmport.toolchain import assemble_flat

# Guest-physical layout every test guest uses.
GDT_BASE = 0x500
STACK_TOP = 0x7000
CODE = 0x8000
PML4 = 0x10000
DATA = 0x20000
SEL_USER_DATA = 0x30
SEL_USER_CODE64 = 0x38
SCRATCH_PORT = 0x80

_DESCRIPTORS = {
    GDT_NULL: 0,
    SEL_CODE32: 0x00CF_9A00_0000_FFFF,
    SEL_DATA: 0x00CF_9200_0000_FFFF,
    SEL_CODE64: 0x00AF_9A00_0000_FFFF,
    SEL_CODE16: 0x0000_9A00_0000_FFFF,
    SEL_DATA16: 0x0000_9200_0000_FFFF,
    SEL_USER_DATA: 0x00CF_F200_0000_FFFF,
    SEL_USER_CODE64: 0x00AF_FA00_0000_FFFF,
}
GDT = b"".join(struct.pack("<Q", _DESCRIPTORS[sel]) for sel in sorted(_DESCRIPTORS))

#: Backend variants every guest test runs on: sync regs, and the register-ioctl fallback.
BACKENDS = {"sync": True, "ioctl": False}


def exit_status(code: int) -> int:
    """What isa-debug-exit (tests/support.py) reports for ``out code, $0xf4``."""
    return (code << 1) | 1


def write_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first GiB with 2 MiB pages, user-accessible."""
    memory.write(PML4, struct.pack("<Q", (PML4 + 0x1000) | 0x7))
    memory.write(PML4 + 0x1000, struct.pack("<Q", (PML4 + 0x2000) | 0x7))
    memory.write(PML4 + 0x2000, struct.pack("<512Q", *((i << 21) | 0x87 for i in range(512))))


@dataclasses.dataclass
class Guest:
    memory: GuestMemory
    vm: KvmVm
    vcpus: list[KvmVcpu]

    @property
    def vcpu(self) -> KvmVcpu:
        return self.vcpus[0]

    def u64(self, gpa: int) -> int:
        value: int = struct.unpack("<Q", self.memory.read(gpa, 8))[0]
        return value

    def u32(self, gpa: int) -> int:
        value: int = struct.unpack("<I", self.memory.read(gpa, 4))[0]
        return value


GuestFactory = Callable[..., Guest]


@pytest.fixture
def kvm() -> None:
    reason = probe_kvm()
    if reason is not None:
        print(f"skipping: {reason}")
        pytest.skip(reason)


@pytest.fixture
def boot(kvm: None) -> Iterator[GuestFactory]:
    """Factory: assemble ``source`` for ``mode``, load it at CODE, create the VM and vCPUs."""
    with ExitStack() as cleanup:

        def make(
            mode: Mode, source: str, *, backend: KvmBackend | None = None, vcpus: int = 1,
            entries: list[int] | None = None, cpuid: dict[tuple[int, int], tuple[int, ...]]
            | None = None, hypervisor_bit: bool = True, real_cs: int = 0, org: int = CODE,
            regs: Regs | None = None, memory_mib: int = 4,
        ) -> Guest:
            memory = GuestMemory(memory_mib)
            cleanup.callback(memory.close)
            memory.write(GDT_BASE, GDT)
            write_page_tables(memory)
            memory.write(CODE, assemble_flat(source, int(mode), org))
            table: dict[tuple[int, int], tuple[int, int, int, int]] = {}
            config = VmConfig(memory, vcpus=vcpus, cpuid=table, hypervisor_bit=hypervisor_bit)
            vm = (backend or KvmBackend()).create_vm(config)
            cleanup.callback(vm.close)
            if cpuid is not None:  # filled in late, as the hypervisor glue may do
                table.update({key: (v[0], v[1], v[2], v[3]) for key, v in cpuid.items()})
            guest = Guest(memory, vm, [])
            for vcpu_id, rip in enumerate(entries or [org] * vcpus):
                start_regs = (regs or Regs()).copy()
                start_regs.rip, start_regs.rsp = rip, STACK_TOP - 0x800 * vcpu_id
                start = StartState(mode, start_regs, page_table_root=PML4, gdt_base=GDT_BASE,
                                   gdt_limit=len(GDT) - 1, real_cs=real_cs)
                guest.vcpus.append(vm.create_vcpu(vcpu_id, start))
            return guest

        yield make


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, kvm: None) -> KvmBackend:
    return KvmBackend(sync_regs=BACKENDS[request.param])


class Recorder(ConsoleIo):
    """ConsoleIo that can script the bytes of every read and act on every access (e.g. write
    registers); it also records the CPL seen at each access but the debug-exit one."""

    def __init__(self, *, read_bytes: Callable[[PortAccess], bytes] | None = None,
                 on_access: Callable[[VcpuContext, PortAccess], None] | None = None) -> None:
        super().__init__()
        self.read_bytes = read_bytes
        self.on_access = on_access
        self.cpls: list[int] = []

    def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        if access.port != DEBUG_EXIT_PORT:
            self.cpls.append(ctx.cpl())
        if self.on_access is not None:
            self.on_access(ctx, access)
        if not access.is_write and self.read_bytes is not None:
            self.accesses.append((ctx.vcpu_id, access))
            return self.read_bytes(access)
        return super().port_io(ctx, access)

    def on_port(self, port: int) -> list[PortAccess]:
        return [a for _, a in self.accesses if a.port == port]


def counter_bytes() -> Callable[[PortAccess], bytes]:
    """Reads return 1, 2, 3, ... one byte after another, across all accesses."""
    state = [0]

    def read(access: PortAccess) -> bytes:
        n = access.size * access.count
        out = bytes((state[0] + i + 1) & 0xFF for i in range(n))
        state[0] += n
        return out

    return read


def kick_when(event: threading.Event, vcpu: KvmVcpu) -> threading.Thread:
    """A started thread that kicks ``vcpu`` once ``event`` is set (or after 30 s, to fail)."""

    def wait_and_kick() -> None:
        event.wait(30)
        vcpu.kick()

    thread = threading.Thread(target=wait_and_kick)
    thread.start()
    return thread


def kick_all(vcpus: list[KvmVcpu]) -> None:
    for vcpu in vcpus:
        vcpu.kick()


HELLO = """
    mov $0xe9, %dx
    mov $msg, %{si}
1:  lodsb
    test %al, %al
    jz 2f
    out %al, (%dx)
    jmp 1b
2:  mov ${status}, %al
    out %al, $0xf4
    hlt
msg: .asciz "{text}"
"""


def hello(bits: int, text: str, status: int) -> str:
    si = {16: "si", 32: "esi", 64: "rsi"}[bits]
    return HELLO.replace("{si}", si).replace("{status}", str(status)).replace("{text}", text)


# -- no /dev/kvm needed -------------------------------------------------------------------------


def test_abi_layouts_match_linux() -> None:
    assert ctypes.sizeof(abi.KvmRegs) == 144
    assert ctypes.sizeof(abi.KvmSegment) == 24
    assert ctypes.sizeof(abi.KvmSregs) == 312
    assert ctypes.sizeof(abi.KvmUserspaceMemoryRegion) == 32
    assert ctypes.sizeof(abi.KvmCpuidEntry2) == 40
    assert ctypes.sizeof(abi.cpuid2_type(3)) == 8 + 3 * 40
    assert ctypes.sizeof(abi.KvmPitConfig) == 64
    assert (abi.RUN_KVM_VALID_REGS, abi.RUN_KVM_DIRTY_REGS) == (288, 296)
    assert (abi.RUN_SYNC_REGS, abi.RUN_SYNC_SREGS, abi.RUN_MIN_SIZE) == (304, 448, 2352)
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_GET_REGS == 0x8090AE81
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_SET_CPUID2 == 0x4008AE90
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_GET_MP_STATE == 0x8004AE98
    assert tuple(f.name for f in dataclasses.fields(Regs)) == abi.REG_NAMES


def test_probe_kvm_explains_an_unusable_device(tmp_path: Path) -> None:
    missing = probe_kvm(str(tmp_path / "no-such-kvm"))
    assert missing is not None and "cannot open" in missing
    not_kvm = probe_kvm("/dev/null")
    assert not_kvm is not None and "KVM_GET_API_VERSION" in not_kvm


def test_merge_cpuid_replaces_hypervisor_range_and_applies_table() -> None:
    flag = abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    supported = [
        (0x0, 0, 0, 0xD, 1, 2, 3),
        (0x1, 0, 0, 0x00A10F11, 0x0102_0800, 0x0000_2000, 0x078B_FBFF),
        (0x7, 0, flag, 0, 0xAA, 0, 0),
        (0xB, 0, flag, 1, 2, 0x100, 0),
        (0xB, 1, flag, 4, 5, 0x201, 0),
        (0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D_564B, 0x564B_4D56, 0x4D),
        (0x4000_0001, 0, 0, 0x0100_7EFB, 0, 0, 0),
    ]
    table = {(0x4000_0000, 0): (0x4000_0010, 1, 2, 3), (0x7, 0): (9, 9, 9, 9),
             (0x8000_0099, 0): (5, 6, 7, 8)}
    rows = {(r[0], r[1]): r for r in merge_cpuid(supported, table, True, apic_id=3)}
    assert (0x4000_0001, 0) not in rows  # KVM's own leaf is gone
    assert rows[(0x4000_0000, 0)][3:] == (0x4000_0010, 1, 2, 3)
    assert rows[(0x7, 0)] == (0x7, 0, flag, 9, 9, 9, 9)  # stays indexed, values replaced
    assert rows[(0x8000_0099, 0)] == (0x8000_0099, 0, 0, 5, 6, 7, 8)
    assert rows[(0x1, 0)][5] == 0x8000_2000  # hypervisor bit added
    assert rows[(0x1, 0)][4] >> 24 == 3  # initial APIC ID
    assert rows[(0xB, 0)][6] == rows[(0xB, 1)][6] == 3  # x2APIC ID
    cleared = {(r[0], r[1]): r for r in merge_cpuid(supported, {(1, 0): (1, 2, 0xFFFF_FFFF, 4)},
                                                     False, apic_id=0)}
    assert cleared[(0x1, 0)][5] == 0x7FFF_FFFF  # the flag wins over the table's leaf 1
    assert not any(0x4000_0000 <= fn <= 0x4FFF_FFFF for fn, _ in cleared)
    indexed = {(r[0], r[1]): r for r in merge_cpuid([(0xD, 0, 0, 1, 1, 1, 1)],
                                                     {(0xD, 1): (2, 2, 2, 2)}, True, 0)}
    assert indexed[(0xD, 0)][2] & flag and indexed[(0xD, 1)][2] & flag


@pytest.mark.parametrize(
    ("code", "long_mode", "is_in", "size", "port", "dx", "expected"),
    [
        (bytes.fromhex("ed"), False, True, 4, 0x5658, 0x5658, kvmcpu._NS),  # in (%dx),%eax
        (bytes.fromhex("66ed"), False, True, 2, 0x5658, 0x5658, kvmcpu._NS),
        (bytes.fromhex("e460"), False, True, 1, 0x60, 0, kvmcpu._NS),  # in $0x60,%al
        (bytes.fromhex("e460"), False, True, 1, 0x61, 0, None),  # wrong port
        (bytes.fromhex("ec"), False, True, 1, 0x60, 0x61, None),  # DX disagrees
        (bytes.fromhex("ee"), False, True, 1, 0x60, 0x60, None),  # an OUT, not an IN
        (bytes.fromhex("6c"), False, True, 1, 0x60, 0x60, kvmcpu._S1),  # insb
        (bytes.fromhex("f36d"), False, True, 4, 0x60, 0x60, kvmcpu._SR),  # rep insl
        (bytes.fromhex("f3486f"), True, False, 4, 0x60, 0x60, kvmcpu._SR),  # rep outsl, REX
        (bytes.fromhex("f3486f"), False, False, 4, 0x60, 0x60, None),  # 0x48: dec, not REX
        (bytes.fromhex("2e6e"), False, False, 1, 0x60, 0x60, kvmcpu._S1),  # cs outsb
        (bytes.fromhex("6e"), False, False, 2, 0x60, 0x60, None),  # byte op, word exit
        (bytes.fromhex("90"), False, False, 1, 0x60, 0x60, None),
    ],
)
def test_decode_forward(code: bytes, long_mode: bool, is_in: bool, size: int, port: int,
                        dx: int, expected: int | None) -> None:
    assert kvmcpu.decode_forward(code, long_mode, is_in, size, port, dx) == expected


def test_decode_backward() -> None:
    ns, s1, sr = kvmcpu._NS, kvmcpu._S1, kvmcpu._SR
    assert kvmcpu.decode_backward(bytes.fromhex("90ee"), False, 1, 0xE9, 0xE9) == {ns}
    assert kvmcpu.decode_backward(bytes.fromhex("e680"), False, 1, 0x80, 0) == {ns}
    assert kvmcpu.decode_backward(bytes.fromhex("906e"), False, 1, 0x80, 0x80) == {s1}
    assert kvmcpu.decode_backward(bytes.fromhex("f36e"), False, 1, 0x80, 0x80) == {sr}
    # "out %al, $0x6e" and a lone outsb end the same way: both readings come back
    assert kvmcpu.decode_backward(bytes.fromhex("e66e"), False, 1, 0x6E, 0x6E) == {ns, s1}
    assert kvmcpu.decode_backward(b"", False, 1, 0x80, 0x80) == set()


def test_translate_walks_every_paging_mode() -> None:
    with GuestMemory(4) as memory:
        mem, size = memory.map, memory.size
        pg, pae, pse, la57 = abi.X86_CR0_PG, abi.X86_CR4_PAE, 1 << 4, 1 << 12
        lma = abi.X86_EFER_LMA
        assert kvmcpu.translate(mem, size, 0x1234_5678, 0, 0, 0, 0) == 0x1234_5678
        # 4-level paging down to a 4 KiB page
        memory.write(0x1000, struct.pack("<Q", 0x2000 | 1))  # PML4[0]
        memory.write(0x2000 + 8 * 1, struct.pack("<Q", 0x3000 | 1))  # PDPT[1]
        memory.write(0x3000 + 8 * 1, struct.pack("<Q", 0x4000 | 1))  # PD[1]
        memory.write(0x4000 + 8 * 3, struct.pack("<Q", 0x9000 | 1))  # PT[3]
        lin = (1 << 30) | (1 << 21) | (3 << 12) | 0x123
        assert kvmcpu.translate(mem, size, lin, pg, 0x1000, pae, lma) == 0x9123
        assert kvmcpu.translate(mem, size, lin + 0x1000, pg, 0x1000, pae, lma) is None
        # 2 MiB page at PD[2]
        memory.write(0x3000 + 8 * 2, struct.pack("<Q", 0x20_0000 | 0x81))
        lin2 = (1 << 30) | (2 << 21) | 0x1_2345
        assert kvmcpu.translate(mem, size, lin2, pg, 0x1000, pae, lma) == 0x21_2345
        # 5-level: one more table on top
        memory.write(0x5000, struct.pack("<Q", 0x1000 | 1))
        assert kvmcpu.translate(mem, size, lin, pg, 0x5000, pae | la57, lma) == 0x9123
        # 32-bit paging with a 4 MiB page, and PAE with 4 KiB pages
        memory.write(0x6000 + 4 * 1, struct.pack("<I", 0x0000_0083))
        assert kvmcpu.translate(mem, size, 0x40_0000 | 0x3_2100, pg, 0x6000, pse, 0) == 0x3_2100
        assert kvmcpu.translate(mem, size, 0x40_0000, pg, 0x6000, 0, 0) is None  # PSE off
        memory.write(0x7000, struct.pack("<Q", 0x3000 | 1))  # PDPTE[0] -> the PD above
        assert kvmcpu.translate(mem, size, (1 << 21) | (3 << 12) | 0x55, pg, 0x7000, pae,
                                0) == 0x9055


def _real_mode_state(rip: int, dx: int) -> tuple[int, ...]:
    """``_DECODE_STATE`` for flat real-mode code: rdx, rip, cs.base/db/l, cr0, cr3, cr4, efer."""
    return (dx, rip, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("convention", ["mainline", "pvm"])
def test_string_decoder_follows_the_rip_convention(convention: str) -> None:
    out, port = abi.KVM_EXIT_IO_OUT, 0xE9
    after = (kvmcpu.MAINLINE_CONVENTION if convention == "mainline"
             else frozenset({(out, kvmcpu._NS), (out, kvmcpu._S1)}))
    with GuestMemory(2) as memory:
        memory.write(0x1000, bytes.fromhex("ee" "f36e" "90"))  # out; rep outsb; nop
        decoder = kvmcpu._StringDecoder(memory, after)
        out_rip = 0x1000 if convention == "mainline" else 0x1001
        def rax() -> int:
            return 0x41
        assert not decoder.is_string(_real_mode_state(out_rip, port), rax, False, 1, port,
                                     b"A")
        assert decoder.is_string(_real_mode_state(0x1001, port), rax, False, 1, port, b"z")
        assert decoder.is_string(_real_mode_state(0x1001, port), rax, False, 1, port, b"A")


def test_string_decoder_sees_rewritten_code() -> None:
    with GuestMemory(2) as memory:
        decoder = kvmcpu._StringDecoder(memory, kvmcpu.MAINLINE_CONVENTION)
        state = _real_mode_state(0x1000, 0x60)
        memory.write(0x1000, bytes.fromhex("ec"))  # in (%dx), %al
        assert not decoder.is_string(state, lambda: 0, True, 1, 0x60, b"")
        assert not decoder.is_string(state, lambda: 0, True, 1, 0x60, b"")  # cached
        memory.write(0x1000, bytes.fromhex("6c"))  # insb, same address and registers
        assert decoder.is_string(state, lambda: 0, True, 1, 0x60, b"")


def test_convention_probe_code_matches_its_source() -> None:
    source = """
        mov $0x80, %dx
        mov $0x2000, %si
        mov $0x3000, %di
        mov $2, %cx
        out %al, (%dx)
        outsb
        rep outsb
        mov $2, %cx
        in (%dx), %al
        insb
        rep insb
        hlt
    """
    assert assemble_flat(source, 16, kvmcpu._PROBE_ORG) == kvmcpu._PROBE_CODE


def test_kernel_sigset_bits() -> None:
    assert kvmcpu._kernel_sigset([1, 2, 64]) == 0b11 | 1 << 63
    assert kvmcpu._kernel_sigset([0, 65]) == 0


# -- guests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.REAL16, Mode.PROT32, Mode.LONG64])
def test_hello_in_every_mode(boot: GuestFactory, backend: KvmBackend, mode: Mode) -> None:
    guest = boot(mode, hello(int(mode), f"hello from {int(mode)}-bit", 0x21 + int(mode)),
                 backend=backend)
    io = ConsoleIo()
    result = guest.vcpu.run(io)
    assert result == Exit(ExitKind.STOPPED, "isa-debug-exit", exit_status(0x21 + int(mode)))
    assert io.text == f"hello from {int(mode)}-bit"
    assert guest.vm.sync_regs is backend.sync_regs
    assert guest.vm.backend_name == "kvm"


def test_real_mode_honours_real_cs(boot: GuestFactory) -> None:
    # CS = 0x700 puts IP 0x1000 at physical CODE; data is addressed through CS as well.
    source = "push %cs\n pop %ds\n" + hello(16, "segmented", 5)
    guest = boot(Mode.REAL16, source, real_cs=(CODE - 0x1000) >> 4, org=0x1000,
                 regs=Regs(rip=0x1000))
    io = ConsoleIo()
    assert guest.vcpu.run(io).status == exit_status(5)
    assert io.text == "segmented"


IN_SIZES = f"""
    mov $0x1122334455667788, %rax
    in $0x60, %al
    mov %rax, {DATA:#x}
    mov %rbx, {DATA + 8:#x}
    mov $0x1122334455667788, %rax
    in $0x60, %ax
    mov %rax, {DATA + 0x10:#x}
    mov %rbx, {DATA + 0x18:#x}
    mov $0x1122334455667788, %rax
    in $0x60, %eax
    mov %rax, {DATA + 0x20:#x}
    mov %rbx, {DATA + 0x28:#x}
    mov $0x61, %dx
    mov $0x1122334455667788, %rax
    in (%dx), %ax
    mov %rax, {DATA + 0x30:#x}
    mov %rbx, {DATA + 0x38:#x}
    mov $1, %al
    out %al, $0xf4
"""


@pytest.mark.parametrize("handler_sets_regs", [False, True], ids=["data-only", "set-regs"])
def test_in_sizes_merge_into_rax(boot: GuestFactory, backend: KvmBackend,
                                 handler_sets_regs: bool) -> None:
    guest = boot(Mode.LONG64, IN_SIZES, backend=backend, regs=Regs(rbx=0x5A5A))
    marks = iter(range(0xB0, 0xC0))

    def write_regs(ctx: VcpuContext, access: PortAccess) -> None:
        if handler_sets_regs and not access.is_write:
            regs = ctx.get_regs()
            regs.rax, regs.rbx = 0xCAFE_BABE_1234_5678, next(marks)
            ctx.set_regs(regs)

    io = Recorder(read_bytes=lambda a: bytes.fromhex("a1a2a3a4")[: a.size],
                  on_access=write_regs)
    assert guest.vcpu.run(io).status == exit_status(1)
    base = 0xCAFE_BABE_1234_5678 if handler_sets_regs else 0x1122_3344_5566_7788
    results = [(guest.u64(DATA + i), guest.u64(DATA + i + 8)) for i in range(0, 0x40, 0x10)]
    rbx = [0xB0, 0xB1, 0xB2, 0xB3] if handler_sets_regs else [0x5A5A] * 4
    assert results == [
        ((base & ~0xFF) | 0xA1, rbx[0]),  # 1 byte: only AL
        ((base & ~0xFFFF) | 0xA2A1, rbx[1]),  # 2 bytes: only AX
        (0xA4A3_A2A1, rbx[2]),  # 4 bytes: zero-extended into RAX
        ((base & ~0xFFFF) | 0xA2A1, rbx[3]),
    ]
    reads = io.on_port(0x60) + io.on_port(0x61)
    assert [(a.port, a.size, a.is_write, a.count, a.string) for a in reads] == [
        (0x60, 1, False, 1, False), (0x60, 2, False, 1, False), (0x60, 4, False, 1, False),
        (0x61, 2, False, 1, False)]


def test_out_data_and_sizes(boot: GuestFactory, backend: KvmBackend) -> None:
    source = """
        mov $0x12345678, %eax
        out %al, $0x80
        out %ax, $0x80
        out %eax, $0x80
        mov $0x84, %dx
        out %eax, (%dx)
        mov $0xfe, %al
        out %al, (%dx)
        mov $2, %al
        out %al, $0xf4
    """
    guest = boot(Mode.PROT32, source, backend=backend)
    io = Recorder()
    assert guest.vcpu.run(io).status == exit_status(2)
    writes = [(a.port, a.size, a.data, a.count, a.string, a.is_write) for _, a in io.accesses]
    assert writes == [
        (0x80, 1, b"\x78", 1, False, True),
        (0x80, 2, b"\x78\x56", 1, False, True),
        (0x80, 4, b"\x78\x56\x34\x12", 1, False, True),
        (0x84, 4, b"\x78\x56\x34\x12", 1, False, True),
        (0x84, 1, b"\xfe", 1, False, True),
        (DEBUG_EXIT_PORT, 1, b"\x02", 1, False, True),
    ]


STRING_IO = f"""
    mov ${SCRATCH_PORT}, %dx
    cld
    mov $text, %esi
    mov $6, %ecx
    rep outsb                      # "abcdef"
    std
    mov $text + 5, %esi
    mov $6, %ecx
    rep outsb                      # "fedcba"
    cld
    mov ${DATA:#x}, %edi
    mov $5, %ecx
    rep insb                       # 1..5 upwards
    std
    mov ${DATA + 0x107:#x}, %edi
    mov $8, %ecx
    rep insb                       # 6..13 downwards
    cld
    mov $words, %esi
    mov $3, %ecx
    rep outsw
    mov ${DATA + 0x200:#x}, %edi
    insb                           # one element, no REP
    mov $text, %esi
    outsb
    mov $text + 1, %esi
    mov $2, %ecx
    mov $'b', %al
    out %al, (%dx)                 # an OUT right before a REP OUTS to the same port...
    rep outsb                      # ...whose first byte equals AL: "bc"
    mov $text + 2, %esi
    mov $1, %ecx
    mov $0xee, %bl                 # ends in the opcode of "out %al, (%dx)"
    rep outsb                      # "c"
    mov $3, %al
    out %al, $0xf4
text:  .ascii "abcdef"
words: .word 0x1111, 0x2222, 0x3333
"""


def test_rep_string_io_both_directions(boot: GuestFactory, backend: KvmBackend) -> None:
    guest = boot(Mode.PROT32, STRING_IO, backend=backend)
    io = Recorder(read_bytes=counter_bytes())
    assert guest.vcpu.run(io).status == exit_status(3)
    scratch = io.on_port(SCRATCH_PORT)

    def joined(accesses: list[PortAccess]) -> bytes:
        return b"".join(a.data for a in accesses)

    byte_writes = [a for a in scratch if a.is_write and a.size == 1]
    word_writes = [a for a in scratch if a.is_write and a.size == 2]
    reads = [a for a in scratch if not a.is_write]
    # KVM may split a REP into several exits; the data and its order are what count.
    elements = [(bytes([b]), a.string) for a in byte_writes for b in a.data]
    assert elements == [(bytes([c]), True) for c in b"abcdef" + b"fedcba" + b"a"] + [
        (b"b", False), (b"b", True), (b"c", True), (b"c", True)]
    assert joined(word_writes) == struct.pack("<3H", 0x1111, 0x2222, 0x3333)
    assert all(a.string for a in word_writes)
    assert all(a.string for a in reads)
    assert sum(a.count for a in reads) == 5 + 8 + 1
    assert any(a.count > 1 for a in reads)  # this KVM batches REP INS
    assert guest.memory.read(DATA, 5) == bytes(range(1, 6))
    assert guest.memory.read(DATA + 0x100, 8) == bytes(range(13, 5, -1))
    assert guest.memory.read(DATA + 0x200, 1) == bytes([14])


CPUID_PROBE = f"""
    mov $0x40000000, %eax
    cpuid
    mov %eax, {DATA:#x}
    mov %ebx, {DATA + 4:#x}
    mov %ecx, {DATA + 8:#x}
    mov %edx, {DATA + 12:#x}
    mov $0x40000010, %eax
    cpuid
    mov %eax, {DATA + 0x10:#x}
    mov %ebx, {DATA + 0x14:#x}
    mov $0x40000001, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, {DATA + 0x20:#x}
    mov %ebx, {DATA + 0x24:#x}
    mov %ecx, {DATA + 0x28:#x}
    mov %edx, {DATA + 0x2c:#x}
    mov $1, %eax
    cpuid
    mov %ecx, {DATA + 0x30:#x}
    mov %ebx, {DATA + 0x34:#x}
    mov $4, %al
    out %al, $0xf4
"""


@pytest.mark.parametrize(("hwver", "hypervisor_bit"), [(7, True), (7, False), (4, True)])
def test_cpuid_hypervisor_leaves_at_cpl0(boot: GuestFactory, backend: KvmBackend, hwver: int,
                                         hypervisor_bit: bool) -> None:
    probe = boot(Mode.LONG64, "hlt", backend=backend)  # only to learn the TSC rate
    tsc_khz = probe.vm.tsc_khz
    leaves = hypervisor_leaves(hwver, tsc_khz)
    guest = boot(Mode.LONG64, CPUID_PROBE, backend=backend, cpuid=dict(leaves),
                 hypervisor_bit=hypervisor_bit)
    assert guest.vm.tsc_khz == tsc_khz > 0
    assert guest.vcpu.run(ConsoleIo()).status == exit_status(4)
    signature = guest.memory.read(DATA + 4, 12)
    if hwver >= 7:
        assert guest.u32(DATA) == 0x4000_0010
        assert signature == b"VMwareVMware"
        assert (guest.u32(DATA + 0x10), guest.u32(DATA + 0x14)) == (tsc_khz, 100_000)
    else:
        assert guest.u32(DATA) == 0 and signature == bytes(12)
    assert guest.memory.read(DATA + 0x20, 16) == bytes(16)  # KVM's own leaf is gone
    assert bool(guest.u32(DATA + 0x30) >> 31) is hypervisor_bit
    assert guest.u32(DATA + 0x34) >> 24 == 0  # APIC ID of vCPU 0


@pytest.mark.parametrize(("interrupts", "word"), [("cli", "disabled"), ("sti", "enabled")])
def test_hlt_halts(boot: GuestFactory, backend: KvmBackend, interrupts: str,
                   word: str) -> None:
    guest = boot(Mode.PROT32, f"mov $'h', %al\n out %al, $0xe9\n {interrupts}\n hlt\n"
                              "mov $'x', %al\n out %al, $0xe9\n", backend=backend)
    io = ConsoleIo()
    result = guest.vcpu.run(io)
    assert result.kind is ExitKind.HALTED and word in result.reason
    assert io.text == "h"


def test_hlt_with_irqchip_is_found_by_the_watchdog(boot: GuestFactory) -> None:
    guest = boot(Mode.PROT32, "cli\n out %al, $0x21\n out %al, $0x80\n hlt\n",
                 backend=KvmBackend(irqchip=True))
    io = Recorder()
    safety = threading.Timer(30, guest.vcpu.kick)  # fail, not hang, if nobody notices
    safety.start()
    result = guest.vcpu.run(io)
    safety.cancel()
    assert result.kind is ExitKind.HALTED and "disabled" in result.reason
    assert [a.port for _, a in io.accesses] == [SCRATCH_PORT]  # the PIC took port 0x21


def test_hlt_with_irqchip_and_interrupts_on_waits_for_a_kick(boot: GuestFactory) -> None:
    guest = boot(Mode.PROT32, "sti\n out %al, $0x80\n hlt\n jmp .\n",
                 backend=KvmBackend(irqchip=True))
    started = threading.Event()
    io = Recorder(on_access=lambda ctx, a: started.set())
    kicker = kick_when(started, guest.vcpu)
    result = guest.vcpu.run(io)
    kicker.join()
    assert result.kind is ExitKind.KICKED


@pytest.mark.parametrize("mode", [Mode.PROT32, Mode.LONG64])
def test_triple_fault_is_shutdown(boot: GuestFactory, backend: KvmBackend, mode: Mode) -> None:
    guest = boot(mode, "mov $'t', %al\n out %al, $0xe9\n ud2\n", backend=backend)
    io = ConsoleIo()
    assert guest.vcpu.run(io) == Exit(ExitKind.SHUTDOWN, "triple fault")
    assert io.text == "t"


MMIO_PROBE = """
    movl $0x01020304, 0x10000000
    movl 0x10000000, %eax
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4
"""


def test_access_outside_ram_is_mmio(boot: GuestFactory, backend: KvmBackend) -> None:
    # A handler without ``mmio``: the write is dropped, the read gives all ones.
    guest = boot(Mode.PROT32, MMIO_PROBE, backend=backend)
    io = ConsoleIo()
    assert guest.vcpu.run(io).kind is ExitKind.STOPPED
    assert io.console == b"\xff"


class MmioRecorder(ConsoleIo):
    def __init__(self) -> None:
        super().__init__()
        self.mmio_accesses: list[MmioAccess] = []

    def mmio(self, ctx: VcpuContext, access: MmioAccess) -> bytes | None:
        self.mmio_accesses.append(access)
        return None if access.is_write else b"\x5a\x00\x00\x00"


def test_mmio_exits_reach_the_handler(boot: GuestFactory, backend: KvmBackend) -> None:
    guest = boot(Mode.PROT32, MMIO_PROBE, backend=backend)
    io = MmioRecorder()
    assert guest.vcpu.run(io).kind is ExitKind.STOPPED
    assert io.mmio_accesses == [MmioAccess(0x10000000, 4, True, b"\x04\x03\x02\x01"),
                                MmioAccess(0x10000000, 4, False)]
    assert io.console == b"\x5a"


def test_instruction_kvm_cannot_run_is_an_exit(boot: GuestFactory, backend: KvmBackend) -> None:
    # No IDT: mainline KVM turns int3 into a triple fault; PVM cannot emulate it at CPL 0.
    guest = boot(Mode.LONG64, "int3\n", backend=backend)
    result = guest.vcpu.run(ConsoleIo())
    assert result.kind in (ExitKind.SHUTDOWN, ExitKind.ERROR)
    if result.kind is ExitKind.ERROR:
        assert "internal error" in result.reason and "cc" in result.reason


SPIN = "mov $'s', %al\n out %al, $0x80\n1: inc %ecx\n jmp 1b\n"


def test_kick_from_another_thread_ends_an_endless_loop(boot: GuestFactory,
                                                       backend: KvmBackend) -> None:
    guest = boot(Mode.PROT32, SPIN, backend=backend)
    started = threading.Event()
    io = Recorder(on_access=lambda ctx, a: started.set())
    kicker = kick_when(started, guest.vcpu)
    result = guest.vcpu.run(io)
    kicker.join()
    assert result == Exit(ExitKind.KICKED, "kicked")
    rip = guest.vcpu.get_regs().rip
    assert CODE <= rip < CODE + 16  # somewhere in the loop
    # The kick was consumed: the guest resumes, and a second kick ends it again.
    kicker = threading.Thread(target=guest.vcpu.kick)
    kicker.start()
    assert guest.vcpu.run(io).kind is ExitKind.KICKED
    kicker.join()


def test_kick_before_run_and_from_the_handler(boot: GuestFactory, backend: KvmBackend) -> None:
    source = "out %al, $0x80\n mov $'x', %al\n out %al, $0xe9\n mov $6, %al\n out %al, $0xf4\n"
    guest = boot(Mode.PROT32, source, backend=backend)
    vcpu = guest.vcpu
    vcpu.kick()  # sticky: the next run returns at once, before any guest code
    io = Recorder(on_access=lambda ctx, a: vcpu.kick() if a.port == SCRATCH_PORT else None)
    assert vcpu.run(io).kind is ExitKind.KICKED
    assert io.accesses == []
    assert vcpu.run(io).kind is ExitKind.KICKED  # kicked by the handler at port 0x80
    assert io.text == ""
    assert vcpu.run(io).status == exit_status(6)
    assert io.text == "x"


def test_two_vcpus_run_at_the_same_time(boot: GuestFactory, backend: KvmBackend) -> None:
    # Each vCPU raises its flag and waits for the other's: only concurrent runs finish.
    flags = DATA
    source = f"""
    vcpu0:
        movl $1, {flags:#x}
    1:  cmpl $1, {flags + 4:#x}
        jne 1b
        mov $'0', %al
        out %al, $0xe9
        mov $0x10, %al
        out %al, $0xf4
    .org 0x100
    vcpu1:
        movl $1, {flags + 4:#x}
    1:  cmpl $1, {flags:#x}
        jne 1b
        mov $'1', %al
        out %al, $0xe9
        mov $0x11, %al
        out %al, $0xf4
    """
    guest = boot(Mode.PROT32, source, backend=backend, vcpus=2, entries=[CODE, CODE + 0x100])
    results: dict[int, Exit] = {}
    consoles = {0: ConsoleIo(), 1: ConsoleIo()}

    def run(vcpu: KvmVcpu) -> None:
        results[vcpu.vcpu_id] = vcpu.run(consoles[vcpu.vcpu_id])

    threads = [threading.Thread(target=run, args=(v,)) for v in guest.vcpus]
    # A safety net so a broken backend fails instead of hanging; success never waits on it.
    safety = threading.Timer(60, lambda: kick_all(guest.vcpus))
    safety.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    safety.cancel()
    assert results == {0: Exit(ExitKind.STOPPED, "isa-debug-exit", exit_status(0x10)),
                       1: Exit(ExitKind.STOPPED, "isa-debug-exit", exit_status(0x11))}
    assert (consoles[0].text, consoles[1].text) == ("0", "1")


USER_MODE = f"""
    out %al, $0x80                 # at CPL 0
    push ${SEL_USER_DATA | 3}
    push ${STACK_TOP - 0x100}
    pushfq
    orq $0x3000, (%rsp)            # IOPL 3, so ring 3 may use ports on any KVM
    push ${SEL_USER_CODE64 | 3}
    push $user
    iretq
user:
    out %al, $0x80                 # at CPL 3
    mov $7, %al
    out %al, $0xf4
"""


def test_cpl_is_reported(boot: GuestFactory, backend: KvmBackend) -> None:
    guest = boot(Mode.LONG64, USER_MODE, backend=backend)
    io = Recorder()
    assert guest.vcpu.run(io).status == exit_status(7)
    assert io.cpls == [0, 3]


def trace(boot: GuestFactory, backend: KvmBackend) -> tuple[object, ...]:
    """Everything observable about one busy guest run."""
    guest = boot(Mode.LONG64, IN_SIZES.replace("mov $1, %al\n    out %al, $0xf4", "")
                 + STRING_IO.replace("%esi", "%rsi").replace("%edi", "%rdi"),
                 backend=backend, regs=Regs(rbx=7, r15=0x1234))

    def touch(ctx: VcpuContext, access: PortAccess) -> None:
        regs = ctx.get_regs()
        regs.r14 = (regs.r14 + access.port) & 0xFFFF_FFFF
        ctx.set_regs(regs)

    io = Recorder(read_bytes=counter_bytes(), on_access=touch)
    result = guest.vcpu.run(io)
    return (result, io.accesses, guest.vcpu.get_regs(), guest.memory.read(DATA, 0x300),
            io.cpls)


def test_sync_regs_and_ioctl_paths_agree(boot: GuestFactory, kvm: None) -> None:
    fast = trace(boot, KvmBackend(sync_regs=True))
    slow = trace(boot, KvmBackend(sync_regs=False))
    assert fast == slow
    assert fast[0] == Exit(ExitKind.STOPPED, "isa-debug-exit", exit_status(3))
    regs = fast[2]
    assert isinstance(regs, Regs) and regs.r15 == 0x1234 and regs.r14 != 0


def test_handler_errors_propagate_and_leave_the_vcpu_usable(boot: GuestFactory,
                                                             backend: KvmBackend) -> None:
    guest = boot(Mode.PROT32, "in $0x60, %al\n in $0x60, %al\n mov $8, %al\n out %al, $0xf4\n",
                 backend=backend)

    class Broken:
        def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
            raise RuntimeError("host bug")

    with pytest.raises(RuntimeError, match="host bug"):
        guest.vcpu.run(Broken())
    with pytest.raises(TypeError, match="2 bytes for a 1-byte read"):
        guest.vcpu.run(Recorder(read_bytes=lambda a: b"xx"))
    assert guest.vcpu.run(ConsoleIo()).status == exit_status(8)


def test_vcpu_stop_carries_status_and_reason(boot: GuestFactory) -> None:
    guest = boot(Mode.REAL16, "in $0x70, %al\n hlt\n")

    class Stopper:
        def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
            raise VcpuStop(42, "enough")

    assert guest.vcpu.run(Stopper()) == Exit(ExitKind.STOPPED, "enough", 42)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _vcpu_mappings() -> int:
    return Path("/proc/self/maps").read_text().count("kvm-vcpu")


def test_close_releases_every_fd_and_mapping(kvm: None) -> None:
    with GuestMemory(2) as scratch:  # warm up the one-time RIP convention probe
        KvmBackend().create_vm(VmConfig(scratch)).close()
    memory = GuestMemory(4)
    memory.write(CODE, assemble_flat(hello(16, "bye", 9), 16, CODE))
    fds, maps = _open_fds(), _vcpu_mappings()
    for backend in (KvmBackend(), KvmBackend(sync_regs=False), KvmBackend(irqchip=True)):
        vm = backend.create_vm(VmConfig(memory, vcpus=2))
        vcpus = [vm.create_vcpu(i, StartState(Mode.REAL16, Regs(rip=CODE))) for i in range(2)]
        assert len(_open_fds()) > len(fds) and _vcpu_mappings() == maps + 2
        assert vcpus[0].run(ConsoleIo()).status == exit_status(9)
        vcpus[1].close()
        vm.close()
        vm.close()  # idempotent
        assert _open_fds() == fds and _vcpu_mappings() == maps
    memory.close()


def test_measured_tsc_rate_matches_kvm(boot: GuestFactory) -> None:
    guest = boot(Mode.REAL16, "hlt")
    measured = kvmcpu.measure_tsc_khz(interval=0.2)
    assert abs(measured - guest.vm.tsc_khz) < guest.vm.tsc_khz * 0.1
