"""The Unicorn CPU backend, driven by real 16-, 32- and 64-bit guest code."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support import ConsoleIo

from hvmport.core.cpuid import hypervisor_leaves
from hvmport.cpu.base import (
    SEL_CODE16,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_DATA16,
    CpuidTable,
    Exit,
    ExitKind,
    Mode,
    PortAccess,
    Regs,
    StartState,
    VcpuContext,
    VcpuStop,
    VmConfig,
)
from hvmport.cpu.unicorn import UnicornBackend, UnicornVcpu, UnicornVm
from hvmport.errors import HostError
from hvmport.hv.memory import GuestMemory
from hvmport.toolchain import assemble_flat

MEMORY_MIB = 8
GDT_BASE = 0x1000
PML4 = 0x2000
CODE = 0x10000
STACK_TOP = 0x80000
USER_STACK_TOP = 0x70000
DATA = 0x5000

# Beyond the contract's flat GDT: ring-3 segments for the CPL 3 tests.
SEL_USER_DATA = 0x30 | 3
SEL_USER_CODE64 = 0x38 | 3
SEL_USER_CODE32 = 0x40 | 3
GDT = struct.pack(
    "<9Q",
    0,
    0x00CF9A000000FFFF,  # 0x08 code32
    0x00CF92000000FFFF,  # 0x10 data
    0x00AF9A000000FFFF,  # 0x18 code64
    0x00009A000000FFFF,  # 0x20 code16
    0x000092000000FFFF,  # 0x28 data16
    0x00CFF2000000FFFF,  # 0x30 user data
    0x00AFFA000000FFFF,  # 0x38 user code64
    0x00CFFA000000FFFF,  # 0x40 user code32
)

EXIT_TAIL = "mov ${v}, %al\nout %al, $0xf4\n"


def debug_exit_status(value: int) -> int:
    return (value << 1) | 1


class Machine:
    """A VM with memory, a GDT and identity page tables, ready for vCPUs."""

    def __init__(self, vcpus: int = 1, cpuid: CpuidTable | None = None,
                 hypervisor_bit: bool = True) -> None:
        self.memory = GuestMemory(MEMORY_MIB)
        self.vm: UnicornVm = UnicornBackend().create_vm(
            VmConfig(self.memory, vcpus=vcpus, cpuid=cpuid or {},
                     hypervisor_bit=hypervisor_bit))
        self.memory.write(GDT_BASE, GDT)
        # Identity map of all guest memory in 2 MiB pages, user-accessible.
        self.memory.write(PML4, struct.pack("<Q", (PML4 + 0x1000) | 7))
        self.memory.write(PML4 + 0x1000, struct.pack("<Q", (PML4 + 0x2000) | 7))
        self.memory.write(PML4 + 0x2000, b"".join(
            struct.pack("<Q", (i << 21) | 0x87) for i in range(MEMORY_MIB // 2)))

    def load(self, source: str, bits: int, at: int = CODE) -> int:
        code = assemble_flat(source, bits, at)
        self.memory.write(at, code)
        return at

    def vcpu(self, mode: Mode, rip: int = CODE, vcpu_id: int = 0, *,
             real_cs: int = 0, regs: Regs | None = None) -> UnicornVcpu:
        regs = regs or Regs()
        regs.rip = rip
        regs.rsp = regs.rsp or STACK_TOP
        start = StartState(mode, regs, real_cs=real_cs, gdt_base=GDT_BASE,
                           gdt_limit=len(GDT) - 1,
                           page_table_root=PML4 if mode is Mode.LONG64 else 0)
        return self.vm.create_vcpu(vcpu_id, start)

    def close(self) -> None:
        self.vm.close()
        self.memory.close()


@pytest.fixture
def machine() -> Iterator[Callable[..., Machine]]:
    made: list[Machine] = []

    def make(**kwargs: object) -> Machine:
        m = Machine(**kwargs)  # type: ignore[arg-type]
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


class Io(ConsoleIo):
    """ConsoleIo plus per-port behaviour a test installs."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: dict[int, Callable[[VcpuContext, PortAccess], bytes | None]] = {}
        self.cpls: list[tuple[int, int]] = []

    def port_io(self, ctx: VcpuContext, access: PortAccess) -> bytes | None:
        self.cpls.append((access.port, ctx.cpl()))
        action = self.ports.get(access.port)
        if action is not None:
            self.accesses.append((ctx.vcpu_id, access))
            return action(ctx, access)
        return super().port_io(ctx, access)

    def writes(self, port: int) -> list[PortAccess]:
        return [a for _, a in self.accesses if a.port == port and a.is_write]

    def value(self, port: int) -> int:
        (access,) = self.writes(port)
        return int.from_bytes(access.data, "little")


def run_in_thread(vcpu: UnicornVcpu, io: Io) -> tuple[threading.Thread, list[Exit | BaseException]]:
    result: list[Exit | BaseException] = []

    def body() -> None:
        try:
            result.append(vcpu.run(io))
        except BaseException as e:  # surfaced by the test
            result.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll for a state another thread reaches; the deadline only guards against a hang."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def finish(thread: threading.Thread, result: list[Exit | BaseException],
           vcpu: UnicornVcpu) -> Exit:
    thread.join(60)  # a safety net against a hung test, not a timing assertion
    if thread.is_alive():
        vcpu.kick()
        thread.join(60)
        pytest.fail("the vCPU did not finish")
    (outcome,) = result
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


# -- guests printing and exiting in every mode -----------------------------------------


PRINT_LOOP = """
1:  lodsb
    test %al, %al
    jz 2f
    out %al, $0xe9
    jmp 1b
2:
"""


def test_real_mode_guest_prints_and_exits_with_status(machine: Callable[..., Machine]) -> None:
    m = machine()
    # CS = 0x1000 puts IP 0x100 at 0x10100; the guest addresses its data through CS, so the
    # code is assembled for its offset (0x100), not its physical address.
    m.memory.write(0x10100, assemble_flat(f"""
    mov %cs, %ax
    mov %ax, %ds
    mov $msg, %si
    cld
    {PRINT_LOOP}
    mov %cs, %ax
    out %ax, $0x80
    {EXIT_TAIL.format(v=0x2A)}
    msg: .asciz "real mode says hi"
    """, 16, 0x100))
    vcpu = m.vcpu(Mode.REAL16, rip=0x100, real_cs=0x1000)
    io = Io()
    exit_ = vcpu.run(io)
    assert exit_.kind is ExitKind.STOPPED
    assert exit_.status == debug_exit_status(0x2A)
    assert io.text == "real mode says hi"
    assert io.value(0x80) == 0x1000
    assert (0xE9, 0) in io.cpls  # real mode is CPL 0


def test_protected_mode_guest_reloads_segments_and_far_jumps(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov ${SEL_DATA}, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov ${STACK_TOP}, %esp
    ljmp ${SEL_CODE32}, $1f
1:  pushf
    push %cs
    push $2f
    iret
2:  mov $msg, %esi
    call print
    mov %cs, %eax
    out %eax, $0x80
    {EXIT_TAIL.format(v=0x33)}
print:
    {PRINT_LOOP}
    ret
msg: .asciz "protected mode says hi"
    """, 32)
    vcpu = m.vcpu(Mode.PROT32)
    io = Io()
    exit_ = vcpu.run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(0x33))
    assert io.text == "protected mode says hi"
    assert io.value(0x80) == SEL_CODE32


def test_long_mode_guest_far_returns_and_exits(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov ${SEL_DATA}, %eax
    mov %eax, %ds
    push ${SEL_CODE64}
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  lea msg(%rip), %rsi
    {PRINT_LOOP}
    mov %cr3, %rax
    out %eax, $0x80
    {EXIT_TAIL.format(v=0x64)}
msg: .asciz "long mode says hi"
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    exit_ = vcpu.run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(0x64))
    assert io.text == "long mode says hi"
    assert io.value(0x80) == PML4


# -- IN and OUT ------------------------------------------------------------------------


IN_REPLIES = {1: b"\xa1", 2: b"\xb1\xb2", 4: b"\xc1\xc2\xc3\xc4"}
RAX_BEFORE = 0x1111111122223333


@pytest.mark.parametrize("size", [1, 2, 4])
def test_in_merges_into_rax_by_size(machine: Callable[..., Machine], size: int) -> None:
    m = machine()
    reg = {1: "%al", 2: "%ax", 4: "%eax"}[size]
    m.load(f"""
    mov ${RAX_BEFORE:#x}, %rax
    in $0x60, {reg}
    mov %rax, ({DATA})
    {EXIT_TAIL.format(v=1)}
    """, 64)
    io = Io()
    io.ports[0x60] = lambda ctx, access: IN_REPLIES[access.size]
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    (rax,) = struct.unpack("<Q", m.memory.read(DATA, 8))
    reply = int.from_bytes(IN_REPLIES[size], "little")
    expected = {1: (RAX_BEFORE & ~0xFF) | reply, 2: (RAX_BEFORE & ~0xFFFF) | reply,
                4: reply}[size]
    assert rax == expected
    access = io.accesses[0][1]
    assert (access.port, access.size, access.is_write, access.count, access.string) == \
        (0x60, size, False, 1, False)


HANDLER_REGS = dict(
    rax=0xAAAAAAAABBBBBBBB, rbx=0x0101010101010101, rcx=0x0202020202020202,
    rdx=0x0303030303035658, rsi=0x0404040404040404, rdi=0x0505050505050505,
    rbp=0x0606060606060606, r8=0x0808080808080808, r9=0x0909090909090909,
    r10=0x1010101010101010, r11=0x1111111111111111, r12=0x1212121212121212,
    r13=0x1313131313131313, r14=0x1414141414141414, r15=0x1515151515151515,
)
STORED = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
          "r13", "r14", "r15")


@pytest.mark.parametrize("size", [1, 2, 4])
def test_in_result_lands_on_the_registers_the_handler_set(
        machine: Callable[..., Machine], size: int) -> None:
    m = machine()
    reg = {1: "%al", 2: "%ax", 4: "%eax"}[size]
    stores = "\n".join(f"mov %{name}, {DATA + 8 * i}" for i, name in enumerate(STORED))
    m.load(f"""
    mov $0x5658, %dx
    in %dx, {reg}
    {stores}
    {EXIT_TAIL.format(v=1)}
    """, 64)
    seen: list[Regs] = []

    def backdoor(ctx: VcpuContext, access: PortAccess) -> bytes:
        regs = ctx.get_regs()
        seen.append(regs.copy())
        for name, value in HANDLER_REGS.items():
            setattr(regs, name, value)
        ctx.set_regs(regs)
        return IN_REPLIES[access.size]

    io = Io()
    io.ports[0x5658] = backdoor
    vcpu = m.vcpu(Mode.LONG64)
    assert vcpu.run(io).kind is ExitKind.STOPPED
    assert seen[0].rdx & 0xFFFF == 0x5658
    assert seen[0].rip == CODE + 4  # the IN itself, after the 4-byte mov to DX
    values = struct.unpack(f"<{len(STORED)}Q", m.memory.read(DATA, 8 * len(STORED)))
    got = dict(zip(STORED, values, strict=True))
    reply = int.from_bytes(IN_REPLIES[size], "little")
    rax = HANDLER_REGS["rax"]
    assert got["rax"] == {1: (rax & ~0xFF) | reply, 2: (rax & ~0xFFFF) | reply,
                          4: reply}[size]
    for name in STORED[1:]:
        assert got[name] == HANDLER_REGS[name], name


@pytest.mark.parametrize("mode,bits", [(Mode.REAL16, 16), (Mode.PROT32, 32)])
def test_in_in_16_and_32_bit_modes(machine: Callable[..., Machine], mode: Mode,
                                   bits: int) -> None:
    m = machine()
    at = 0x7C00 if mode is Mode.REAL16 else CODE
    m.load(f"""
    mov $0x12345678, %eax
    in $0x60, %al
    out %eax, $0x81
    mov $0x12345678, %eax
    in $0x60, %ax
    out %eax, $0x82
    in $0x60, %eax
    out %eax, $0x83
    {EXIT_TAIL.format(v=1)}
    """, bits, at=at)
    io = Io()
    io.ports[0x60] = lambda ctx, access: IN_REPLIES[access.size]
    assert m.vcpu(mode, rip=at).run(io).kind is ExitKind.STOPPED
    assert io.value(0x81) == 0x123456A1
    assert io.value(0x82) == 0x1234B2B1
    assert io.value(0x83) == 0xC4C3C2C1


def test_out_sizes_and_data(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov $0x87654321, %eax
    out %al, $0x70
    mov $0x1234, %dx
    out %ax, %dx
    out %eax, %dx
    {EXIT_TAIL.format(v=1)}
    """, 64)
    io = Io()
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    writes = [(a.port, a.size, a.data, a.count, a.string) for _, a in io.accesses]
    assert writes == [
        (0x70, 1, b"\x21", 1, False),
        (0x1234, 2, b"\x21\x43", 1, False),
        (0x1234, 4, b"\x21\x43\x65\x87", 1, False),
        (0xF4, 1, b"\x01", 1, False),
    ]


# -- string I/O ------------------------------------------------------------------------


def test_rep_outsb_forward_and_backward(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov $0xe9, %dx
    lea msg(%rip), %rsi
    mov $5, %ecx
    cld
    rep outsb
    mov %rsi, ({DATA})
    mov %rcx, ({DATA + 8})
    lea msg+4(%rip), %rsi
    mov $5, %ecx
    std
    rep outsb
    cld
    mov %rsi, ({DATA + 16})
    {EXIT_TAIL.format(v=1)}
msg: .ascii "hello"
    """, 64)
    io = Io()
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    assert io.text == "hello" + "olleh"
    strings = [a for _, a in io.accesses if a.string]
    assert [(a.port, a.size, a.count, a.is_write, a.data) for a in strings] == [
        (0xE9, 1, 5, True, b"hello"),
        (0xE9, 1, 5, True, b"olleh"),
    ]
    rsi_fwd, rcx, rsi_back = struct.unpack("<3Q", m.memory.read(DATA, 24))
    msg = CODE + m.memory.read(CODE, 0x100).index(b"hello")
    assert (rsi_fwd, rcx, rsi_back) == (msg + 5, 0, msg - 1)


def test_rep_outsw_split_at_a_page_boundary(machine: Callable[..., Machine]) -> None:
    m = machine()
    buffer = 0x6FF0  # 8 words: 16 bytes up to 0x7000, the rest beyond
    payload = bytes(range(0x40, 0x40 + 40))
    m.memory.write(buffer, payload)
    m.load(f"""
    mov $0x300, %dx
    mov ${buffer}, %esi
    mov $20, %ecx
    rep outsw
    {EXIT_TAIL.format(v=1)}
    """, 32)
    io = Io()
    assert m.vcpu(Mode.PROT32).run(io).kind is ExitKind.STOPPED
    batches = [a for _, a in io.accesses if a.port == 0x300]
    assert all(a.string and a.size == 2 for a in batches)
    assert [a.count for a in batches] == [8, 12]
    assert b"".join(a.data for a in batches) == payload


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_rep_insb_fills_memory_in_either_direction(machine: Callable[..., Machine],
                                                   direction: str) -> None:
    m = machine()
    buffer = DATA + 0x100
    start = buffer if direction == "forward" else buffer + 5
    flag = "cld" if direction == "forward" else "std"
    m.load(f"""
    mov $0x61, %dx
    mov ${start}, %edi
    mov $6, %ecx
    {flag}
    rep insb
    cld
    mov %rdi, ({DATA})
    mov %rcx, ({DATA + 8})
    {EXIT_TAIL.format(v=1)}
    """, 64)
    io = Io()
    io.ports[0x61] = lambda ctx, access: b"ABCDEF"[:access.count * access.size]
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    ((_, access),) = [x for x in io.accesses if x[1].port == 0x61]
    assert (access.string, access.count, access.size, access.is_write) == (True, 6, 1, False)
    filled = m.memory.read(buffer, 6)
    assert filled == (b"ABCDEF" if direction == "forward" else b"FEDCBA")
    rdi, rcx = struct.unpack("<2Q", m.memory.read(DATA, 16))
    assert rcx == 0
    assert rdi == (buffer + 6 if direction == "forward" else buffer - 1)


def test_rep_insw_in_real_mode(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    xor %ax, %ax
    mov %ax, %es
    mov $0x62, %dx
    mov ${DATA}, %di
    mov $3, %cx
    cld
    rep insw
    out %ax, $0x80
    {EXIT_TAIL.format(v=1)}
    """, 16, at=0x7C00)
    io = Io()
    io.ports[0x62] = lambda ctx, access: bytes(range(1, 1 + 2 * access.count))
    assert m.vcpu(Mode.REAL16, rip=0x7C00).run(io).kind is ExitKind.STOPPED
    assert m.memory.read(DATA, 6) == bytes(range(1, 7))
    assert [a.count for _, a in io.accesses if a.port == 0x62] == [3]


# -- CPUID -----------------------------------------------------------------------------


CPUID_PROBE = f"""
    mov $0x40000000, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, ({DATA})
    mov %ebx, ({DATA + 4})
    mov %ecx, ({DATA + 8})
    mov %edx, ({DATA + 12})
    mov $0x40000010, %eax
    cpuid
    mov %eax, ({DATA + 16})
    mov %ebx, ({DATA + 20})
    mov $0x40000100, %eax
    cpuid
    mov %eax, ({DATA + 24})
    mov %ebx, ({DATA + 28})
    mov $1, %eax
    cpuid
    mov %ecx, ({DATA + 32})
    xor %eax, %eax
    cpuid
    mov %eax, ({DATA + 36})
    mov %ebx, ({DATA + 40})
    mov $7, %eax
    mov $1, %ecx
    cpuid
    mov %ebx, ({DATA + 44})
    {EXIT_TAIL.format(v=1)}
"""


@pytest.mark.parametrize("hypervisor_bit", [True, False])
def test_cpuid_serves_the_table_and_the_hypervisor_bit(
        machine: Callable[..., Machine], hypervisor_bit: bool) -> None:
    table = dict(hypervisor_leaves(vmware_hwver=7, tsc_khz=2_500_000))
    table[(7, 1)] = (0, 0x5EB1, 0, 0)
    m = machine(cpuid=table, hypervisor_bit=hypervisor_bit)
    m.load(CPUID_PROBE, 64)
    assert m.vcpu(Mode.LONG64).run(Io()).kind is ExitKind.STOPPED
    words = struct.unpack("<12I", m.memory.read(DATA, 48))
    assert words[0] == 0x40000010
    assert struct.pack("<3I", *words[1:4]) == b"VMwareVMware"
    assert words[4:6] == (2_500_000, 100_000)
    assert words[6:8] == (0, 0)  # not in the table: zeros, never Unicorn's own answer
    assert bool(words[8] >> 31) is hypervisor_bit
    assert words[9] >= 7 and words[10] != 0  # leaf 0 comes from Unicorn's CPU
    assert words[11] == 0x5EB1  # indexed leaf 7 subleaf 1 from the table


def test_cpuid_without_vmware_leaves_shows_no_signature(
        machine: Callable[..., Machine]) -> None:
    m = machine(cpuid={(0, 0): (0x16, *struct.unpack("<3I", b"hvmportTests"))})
    m.load(CPUID_PROBE, 64)
    assert m.vcpu(Mode.LONG64).run(Io()).kind is ExitKind.STOPPED
    words = struct.unpack("<12I", m.memory.read(DATA, 48))
    assert words[0:4] == (0, 0, 0, 0)
    assert words[9:11] == (0x16, struct.unpack("<I", b"hvmp")[0])  # the table overrides


# -- privilege levels ------------------------------------------------------------------


def test_in_from_cpl3_reports_cpl3(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov $0x5658, %dx
    in %dx, %eax
    push ${SEL_USER_DATA}
    push ${USER_STACK_TOP}
    push $0x2
    push ${SEL_USER_CODE64}
    lea user(%rip), %rax
    push %rax
    iretq
user:
    mov $0x5658, %dx
    in %dx, %eax
    out %eax, $0x81
    mov %ss, %eax
    out %eax, $0x82
    {EXIT_TAIL.format(v=3)}
    """, 64)
    io = Io()
    io.ports[0x5658] = lambda ctx, access: b"\x78\x56\x34\x12"
    exit_ = m.vcpu(Mode.LONG64).run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(3))
    assert [cpl for port, cpl in io.cpls if port == 0x5658] == [0, 3]
    assert io.value(0x81) == 0x12345678
    assert io.value(0x82) == SEL_USER_DATA
    assert io.cpls[-1] == (0xF4, 3)


def test_protected_mode_iret_to_cpl3(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    push ${SEL_USER_DATA}
    push ${USER_STACK_TOP}
    push $0x2
    push ${SEL_USER_CODE32}
    push $user
    iret
user:
    in $0x60, %al
    {EXIT_TAIL.format(v=4)}
    """, 32)
    io = Io()
    io.ports[0x60] = lambda ctx, access: b"\x01"
    exit_ = m.vcpu(Mode.PROT32).run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(4))
    assert (0x60, 3) in io.cpls


# -- halts, faults, errors -------------------------------------------------------------


def test_hlt_with_interrupts_disabled_halts_and_resumes_after_it(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    cli
    hlt
    {EXIT_TAIL.format(v=5)}
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    first = vcpu.run(io)
    assert first.kind is ExitKind.HALTED
    assert f"{CODE + 1:#x}" in first.reason
    assert io.accesses == []
    second = vcpu.run(io)
    assert (second.kind, second.status) == (ExitKind.STOPPED, debug_exit_status(5))


def test_hlt_with_interrupts_enabled_stays_halted_until_kicked(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    out %al, $0x80
    sti
    hlt
    {EXIT_TAIL.format(v=6)}
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    for _ in range(2):
        thread, result = run_in_thread(vcpu, io)
        wait_until(lambda: vcpu.halted)  # a kick racing the hlt itself would win instead
        vcpu.kick()
        assert finish(thread, result, vcpu).kind is ExitKind.KICKED
        assert vcpu.halted
    assert [a.port for _, a in io.accesses] == [0x80]  # never ran past the hlt


@pytest.mark.parametrize("body,name", [
    ("ud2", "#UD"),
    ("int3", "#BP"),
    ("mov $0x99, %eax\nmov %eax, %ds", "#GP"),
])
def test_exception_without_idt_is_a_triple_fault(machine: Callable[..., Machine], body: str,
                                                 name: str) -> None:
    m = machine()
    m.load(f"""
    {body}
    {EXIT_TAIL.format(v=1)}
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    exit_ = vcpu.run(io)
    assert exit_.kind is ExitKind.SHUTDOWN
    assert "triple fault" in exit_.reason and name in exit_.reason
    assert io.accesses == []
    again = vcpu.run(io)  # the vCPU stays dead, the host stays up
    assert (again.kind, again.reason) == (exit_.kind, exit_.reason)


def test_exception_with_an_idt_is_an_error_naming_vector_and_rip(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load("""
    xor %cx, %cx
    mov $1, %ax
    div %cx
    hlt
    """, 16, at=0x7C00)
    exit_ = m.vcpu(Mode.REAL16, rip=0x7C00).run(Io())
    assert exit_.kind is ExitKind.ERROR
    assert "#DE" in exit_.reason and "0x7c05" in exit_.reason


def test_access_outside_guest_memory_is_an_error(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov (0x7000000), %eax
    {EXIT_TAIL.format(v=1)}
    """, 32)
    exit_ = m.vcpu(Mode.PROT32).run(Io())
    assert exit_.kind is ExitKind.ERROR
    assert "0x7000000" in exit_.reason


def test_syscall_is_an_error(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    syscall
    {EXIT_TAIL.format(v=1)}
    """, 64)
    exit_ = m.vcpu(Mode.LONG64).run(Io())
    assert exit_.kind is ExitKind.ERROR and "SYSCALL" in exit_.reason


# -- stopping, kicking, handler errors -------------------------------------------------


def test_vcpustop_ends_the_run_before_the_next_io(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load("""
    mov $0x09, %al
    out %al, $0xf4
    mov $0x58, %al
    out %al, $0xe9
    in $0x60, %al
    1: jmp 1b
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    exit_ = vcpu.run(io)
    assert (exit_.kind, exit_.status, exit_.reason) == \
        (ExitKind.STOPPED, debug_exit_status(9), "isa-debug-exit")
    assert [a.port for _, a in io.accesses] == [0xF4]
    assert vcpu.run(io).status == debug_exit_status(9)  # stopped for good


def test_handler_exception_propagates_and_the_io_is_retried(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov $3, %ecx
    cmp $3, %ecx          # ZF=1 must survive the rewind to the OUT
    mov $0x41, %al
    out %al, $0x90
    jnz 1f
    out %al, $0xe9
    {EXIT_TAIL.format(v=1)}
1:  {EXIT_TAIL.format(v=2)}
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    broken = Io()

    def explode(ctx: VcpuContext, access: PortAccess) -> None:
        raise RuntimeError("handler bug")

    broken.ports[0x90] = explode
    with pytest.raises(RuntimeError, match="handler bug"):
        vcpu.run(broken)
    assert broken.text == ""
    io = Io()
    io.ports[0x90] = lambda ctx, access: None
    assert vcpu.run(io).status == debug_exit_status(1)
    assert [a.port for _, a in io.accesses] == [0x90, 0xE9, 0xF4]
    assert io.text == "A"


def test_handler_reply_of_the_wrong_length_is_a_host_error(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load("in $0x60, %eax\nhlt\n", 64)
    io = Io()
    io.ports[0x60] = lambda ctx, access: b"\x01"
    with pytest.raises(TypeError, match="exactly 4 bytes"):
        m.vcpu(Mode.LONG64).run(io)


def test_handler_moving_rip_abandons_the_in(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    mov $0x55, %eax
    xor %ebx, %ebx
    in $0x91, %al
    mov $0xbad, %ebx
    out %eax, $0x81
    mov %ebx, %eax
    out %eax, $0x82
    {EXIT_TAIL.format(v=1)}
    """, 64)

    def skip(ctx: VcpuContext, access: PortAccess) -> bytes:
        regs = ctx.get_regs()
        regs.rip += 2 + 5  # past this IN and the mov to EBX
        regs.rbx = 7
        ctx.set_regs(regs)
        return b"\x99"

    io = Io()
    io.ports[0x91] = skip
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    assert io.value(0x81) == 0x55  # the abandoned IN left AL alone
    assert io.value(0x82) == 7


def test_handler_changing_rflags_completes_the_in(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"""
    clc
    in $0x92, %al
    jc 1f
    xor %eax, %eax
1:  out %al, $0x81
    {EXIT_TAIL.format(v=1)}
    """, 64)

    def carry(ctx: VcpuContext, access: PortAccess) -> bytes:
        regs = ctx.get_regs()
        regs.rflags |= 1
        ctx.set_regs(regs)
        assert ctx.get_regs().rflags & 1
        return b"\x42"

    io = Io()
    io.ports[0x92] = carry
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    assert io.value(0x81) == 0x42


def test_kick_ends_an_infinite_loop(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load("""
    out %al, $0x80
1:  add $1, %rbx
    jmp 1b
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    started = threading.Event()
    io.ports[0x80] = lambda ctx, access: started.set()
    thread, result = run_in_thread(vcpu, io)
    assert started.wait(60)
    vcpu.kick()
    assert finish(thread, result, vcpu).kind is ExitKind.KICKED
    assert vcpu.get_regs().rbx > 0


def test_kick_before_run_returns_at_once(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"{EXIT_TAIL.format(v=1)}", 64)
    vcpu = m.vcpu(Mode.LONG64)
    vcpu.kick()
    io = Io()
    assert vcpu.run(io).kind is ExitKind.KICKED
    assert io.accesses == []
    assert vcpu.run(io).kind is ExitKind.STOPPED


def test_two_vcpus_run_concurrently_and_share_memory(machine: Callable[..., Machine]) -> None:
    m = machine(vcpus=2)
    flag = DATA + 0x200
    m.load(f"""
    out %al, $0x80
    movl $0x1234, ({flag})
    {EXIT_TAIL.format(v=1)}
    """, 64, at=CODE)
    m.load(f"""
    out %al, $0x80
1:  cmpl $0x1234, ({flag})
    jne 1b
    mov ({flag}), %eax
    out %eax, $0x81
    {EXIT_TAIL.format(v=2)}
    """, 64, at=CODE + 0x1000)
    vcpus = [m.vcpu(Mode.LONG64, rip=CODE, vcpu_id=0),
             m.vcpu(Mode.LONG64, rip=CODE + 0x1000, vcpu_id=1,
                    regs=Regs(rsp=STACK_TOP - 0x8000))]
    # Each vCPU waits inside its handler for the other: only concurrent runs get past.
    barrier = threading.Barrier(2, timeout=60)

    def meet(ctx: VcpuContext, access: PortAccess) -> None:
        barrier.wait()

    ios = [Io(), Io()]
    for io in ios:
        io.ports[0x80] = meet
    runs = [run_in_thread(v, io) for v, io in zip(vcpus, ios, strict=True)]
    exits = [finish(t, r, v) for (t, r), v in zip(runs, vcpus, strict=True)]
    assert [(e.kind, e.status) for e in exits] == [
        (ExitKind.STOPPED, debug_exit_status(1)), (ExitKind.STOPPED, debug_exit_status(2))]
    assert ios[1].value(0x81) == 0x1234
    assert {vid for io in ios for vid, _ in io.accesses} == {0, 1}
    assert all(vid == i for i, io in enumerate(ios) for vid, _ in io.accesses)


def test_guest_memory_is_the_domain_memory(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.memory.write(DATA, struct.pack("<I", 0xCAFEF00D))
    m.load(f"""
    mov ({DATA}), %eax
    out %eax, $0x81
    movl $0xfeedface, ({DATA + 4})
    in $0x60, %al
    mov ({DATA + 8}), %eax
    out %eax, $0x82
    {EXIT_TAIL.format(v=1)}
    """, 64)
    io = Io()

    def poke(ctx: VcpuContext, access: PortAccess) -> bytes:
        assert m.memory.read(DATA + 4, 4) == struct.pack("<I", 0xFEEDFACE)
        m.memory.write(DATA + 8, struct.pack("<I", 0x11223344))
        return b"\x00"

    io.ports[0x60] = poke
    assert m.vcpu(Mode.LONG64).run(io).kind is ExitKind.STOPPED
    assert io.value(0x81) == 0xCAFEF00D
    assert io.value(0x82) == 0x11223344


def test_code_the_host_rewrites_between_runs_is_executed(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    source = "mov $'{c}', %al\nout %al, $0xe9\ncli\nhlt\n"
    m.load(source.format(c="A"), 64)
    vcpu = m.vcpu(Mode.LONG64)
    io = Io()
    assert vcpu.run(io).kind is ExitKind.HALTED
    m.load(source.format(c="B"), 64)  # same place, new code
    regs = vcpu.get_regs()
    regs.rip = CODE
    vcpu.set_regs(regs)
    assert vcpu.run(io).kind is ExitKind.HALTED
    assert io.text == "AB"


# -- VM-level --------------------------------------------------------------------------


def test_tsc_khz_is_stable_whole_mhz(machine: Callable[..., Machine]) -> None:
    first, second = machine(), machine()
    khz = first.vm.tsc_khz
    assert khz >= 100_000 and khz % 1000 == 0
    assert second.vm.tsc_khz == khz
    assert first.vm.backend_name == UnicornBackend.name == "unicorn"


def test_start_state_and_vcpu_ids_are_checked(machine: Callable[..., Machine]) -> None:
    m = machine()
    with pytest.raises(ValueError, match="page_table_root"):
        m.vm.create_vcpu(0, StartState(Mode.LONG64, Regs(), page_table_root=MEMORY_MIB << 20))
    m.vcpu(Mode.PROT32)
    with pytest.raises(ValueError, match="already exists"):
        m.vcpu(Mode.PROT32)
    with pytest.raises(ValueError, match="outside"):
        m.vcpu(Mode.PROT32, vcpu_id=1)


def test_close_releases_the_vcpu(machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load(f"{EXIT_TAIL.format(v=1)}", 64)
    vcpu = m.vcpu(Mode.LONG64)
    vcpu.close()
    vcpu.close()
    with pytest.raises(HostError, match="closed"):
        vcpu.run(Io())


def test_vcpustop_from_an_in_carries_status_and_reason(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load("in $0x60, %al\nhlt\n", 16, at=0x7C00)
    io = Io()

    def stop(ctx: VcpuContext, access: PortAccess) -> bytes:
        raise VcpuStop(77, "handler said so")

    io.ports[0x60] = stop
    exit_ = m.vcpu(Mode.REAL16, rip=0x7C00).run(io)
    assert (exit_.kind, exit_.status, exit_.reason) == (ExitKind.STOPPED, 77, "handler said so")


# -- string I/O in other code sizes, and replays -----------------------------------------


def test_rep_outsb_from_a_16_bit_protected_mode_segment(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    # The 16-bit code segment has base 0 and a 64 KiB limit, so this guest lives below it.
    at = 0x8000
    m.load(f"""
    ljmp ${SEL_CODE16}, $code16
back:
    {EXIT_TAIL.format(v=0x16)}
.code16
code16:
    mov ${SEL_DATA16}, %ax
    mov %ax, %ds
    mov $msg, %si
    mov $0xe9, %dx
    mov $0xffff0004, %ecx   # a 16-bit address size counts CX only
    rep outsb
    mov %si, %ax
    out %ax, $0x80
    ljmpl ${SEL_CODE32}, $back
msg: .ascii "p16!"
    """, 32, at=at)
    io = Io()
    exit_ = m.vcpu(Mode.PROT32, rip=at).run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(0x16))
    assert io.text == "p16!"
    (batch,) = [a for _, a in io.accesses if a.port == 0xE9]
    assert (batch.count, batch.string) == (4, True)
    msg = at + m.memory.read(at, 0x100).index(b"p16!")
    assert io.value(0x80) == msg + 4


def test_rep_outsb_from_a_compat_mode_process_at_cpl3(machine: Callable[..., Machine]) -> None:
    m = machine()
    # 4 KiB pages for the first 2 MiB, so the GDT's page can be supervisor-only, as in an OS.
    pt = PML4 + 0x3000
    m.memory.write(PML4 + 0x2000, struct.pack("<Q", pt | 7))
    m.memory.write(pt, b"".join(
        struct.pack("<Q", (i << 12) | (3 if i << 12 == GDT_BASE else 7)) for i in range(512)))
    m.load(f"""
.code32
user:
    mov $msg, %esi
    mov $0xe9, %dx
    rep outsb
    mov %esi, %eax
    out %eax, $0x80
    {EXIT_TAIL.format(v=0x32)}
msg: .ascii "compat"
    """, 32, at=CODE + 0x800)
    m.load(f"""
    mov $0xdead000000000006, %rcx   # ECX = 6; the upper half is not a 32-bit count
    push ${SEL_USER_DATA}
    push ${USER_STACK_TOP}
    push $0x2
    push ${SEL_USER_CODE32}
    push ${CODE + 0x800}
    iretq
    """, 64)
    io = Io()
    exit_ = m.vcpu(Mode.LONG64).run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(0x32))
    assert io.text == "compat"
    (batch,) = [a for _, a in io.accesses if a.port == 0xE9]
    assert (batch.count, batch.string) == (6, True)
    assert (0xE9, 3) in io.cpls


def test_handler_changing_rflags_during_rep_insb_is_replayed_once(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    buffer = DATA + 0x300
    m.load(f"""
    mov $0x63, %dx
    mov ${buffer}, %edi
    mov $4, %ecx
    clc
    rep insb
    jc 1f
    {EXIT_TAIL.format(v=0x0E)}
1:  mov %rdi, ({DATA})
    mov %rcx, ({DATA + 8})
    {EXIT_TAIL.format(v=0x0C)}
    """, 64)
    calls: list[PortAccess] = []

    def carry(ctx: VcpuContext, access: PortAccess) -> bytes:
        calls.append(access)
        regs = ctx.get_regs()
        regs.rflags |= 1
        ctx.set_regs(regs)
        return b"wxyz"[:access.count]

    io = Io()
    io.ports[0x63] = carry
    exit_ = m.vcpu(Mode.LONG64).run(io)
    assert (exit_.kind, exit_.status) == (ExitKind.STOPPED, debug_exit_status(0x0C))
    assert [(a.count, a.string) for a in calls] == [(4, True)]
    assert m.memory.read(buffer, 4) == b"wxyz"
    assert struct.unpack("<2Q", m.memory.read(DATA, 16)) == (buffer + 4, 0)


def test_kicks_racing_the_start_of_runs_are_never_lost(
        machine: Callable[..., Machine]) -> None:
    m = machine()
    m.load("""
1:  add $1, %rbx
    jmp 1b
    """, 64)
    vcpu = m.vcpu(Mode.LONG64)
    for _ in range(20):
        thread, result = run_in_thread(vcpu, Io())
        vcpu.kick()
        assert finish(thread, result, vcpu).kind is ExitKind.KICKED
