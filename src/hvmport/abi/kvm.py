"""The part of the Linux KVM user-space ABI (x86-64) that hvmport's KVM backend uses.

Ioctl numbers are built with the generic Linux ``_IOC`` encoding from their type number and
argument size, so a layout mistake shows up as a wrong size (and ``ENOTTY``) rather than as a
silently wrong magic number. Layouts follow ``<linux/kvm.h>`` and ``<asm/kvm.h>`` (API 12);
``tests/test_cpu_kvm.py`` checks the sizes that the ABI fixes.
"""

from __future__ import annotations

import ctypes

# -- ioctl number encoding (asm-generic/ioctl.h) ---------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _ior(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


def _iowr(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


KVMIO = 0xAE
KVM_API_VERSION = 12

# -- structures --------------------------------------------------------------------------------

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


#: struct kvm_regs field order; ``hvmport.cpu.base.Regs`` has the same order.
REG_NAMES: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, u64) for name in REG_NAMES]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """struct kvm_cpuid2 without its flexible ``entries`` array (see ``cpuid2_type``)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_type(nent: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for ``nent`` entries (the ABI's flexible array)."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * nent)]

    return KvmCpuid2


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmSignalMaskHeader(ctypes.Structure):
    """struct kvm_signal_mask without its flexible ``sigset`` bytes."""

    _fields_ = [("len", u32)]


class KvmSignalMask8(ctypes.Structure):
    """struct kvm_signal_mask carrying the kernel's 8-byte sigset_t (64 signals on x86-64)."""

    _fields_ = [("len", u32), ("sigset", u64)]


#: The kernel's sigset_t is 64 bits on x86-64 (glibc's 1024-bit one is not what KVM takes).
KERNEL_SIGSET_BYTES = 8


# -- struct kvm_run ------------------------------------------------------------------------------
# The vCPU's mmap'ed communication page. Only offsets are given: the hot path reads it with
# struct.unpack_from on a memoryview, which is cheaper than ctypes attribute access.

RUN_REQUEST_INTERRUPT_WINDOW = 0  # u8
RUN_IMMEDIATE_EXIT = 1  # u8
RUN_EXIT_REASON = 8  # u32
RUN_READY_FOR_INTERRUPT_INJECTION = 12  # u8
RUN_IF_FLAG = 13  # u8
RUN_FLAGS = 14  # u16
RUN_CR8 = 16  # u64
RUN_APIC_BASE = 24  # u64
#: The exit-reason union, 256 bytes.
RUN_EXIT_UNION = 32
RUN_EXIT_UNION_SIZE = 256
#: io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset (from the run page start).
RUN_IO = RUN_EXIT_UNION
#: mmio: u64 phys_addr, u8 data[8], u32 len, u8 is_write.
RUN_MMIO_FORMAT = "<Q8sIB"
RUN_IO_FORMAT = "<BBHIQ"
#: fail_entry: u64 hardware_entry_failure_reason, u32 cpu.
RUN_FAIL_ENTRY_FORMAT = "<QI"
#: hw (KVM_EXIT_UNKNOWN): u64 hardware_exit_reason.
RUN_HW_FORMAT = "<Q"
#: internal: u32 suberror, u32 ndata, u64 data[16].
RUN_INTERNAL_FORMAT = "<II"
RUN_INTERNAL_DATA = RUN_EXIT_UNION + 8
RUN_INTERNAL_MAX_DATA = 16
#: system_event: u32 type, u32 ndata, ...
RUN_SYSTEM_EVENT_FORMAT = "<II"
RUN_KVM_VALID_REGS = RUN_EXIT_UNION + RUN_EXIT_UNION_SIZE  # u64
RUN_KVM_DIRTY_REGS = RUN_KVM_VALID_REGS + 8  # u64
#: struct kvm_sync_regs on x86: kvm_regs, kvm_sregs, kvm_vcpu_events, in that order.
RUN_SYNC_REGS = RUN_KVM_DIRTY_REGS + 8
RUN_SYNC_SREGS = RUN_SYNC_REGS + ctypes.sizeof(KvmRegs)
RUN_SYNC_REGS_SIZE = 2048
#: Where the register-less part of kvm_run ends; KVM_GET_VCPU_MMAP_SIZE is at least this.
RUN_MIN_SIZE = RUN_SYNC_REGS + RUN_SYNC_REGS_SIZE

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# -- exit reasons ------------------------------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_REASON_NAMES: dict[int, str] = {
    value: name
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
#: In ``internal.data[0]`` of an emulation failure: insn_size and insn_bytes[15] follow.
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

INTERNAL_ERROR_NAMES: dict[int, str] = {
    KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}

# -- capabilities (KVM_CHECK_EXTENSION) ---------------------------------------------------------

KVM_CAP_IRQCHIP = 0
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136

# -- ioctls ------------------------------------------------------------------------------------

# system (/dev/kvm)
KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(KVMIO, 0x05, ctypes.sizeof(KvmCpuid2Header))

# VM
KVM_CREATE_VCPU = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _iow(KVMIO, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(KVMIO, 0x47)
KVM_CREATE_IRQCHIP = _io(KVMIO, 0x60)


class KvmIrqLevel(ctypes.Structure):
    """struct kvm_irq_level: the GSI (an ISA IRQ for the PIC) and its level."""

    _fields_ = (("irq", ctypes.c_uint32), ("level", ctypes.c_uint32))


KVM_IRQ_LINE = _iow(KVMIO, 0x61, ctypes.sizeof(KvmIrqLevel))
KVM_CREATE_PIT2 = _iow(KVMIO, 0x77, ctypes.sizeof(KvmPitConfig))

# vCPU
KVM_RUN = _io(KVMIO, 0x80)
KVM_GET_REGS = _ior(KVMIO, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(KVMIO, 0x84, ctypes.sizeof(KvmSregs))
KVM_SET_SIGNAL_MASK = _iow(KVMIO, 0x8B, ctypes.sizeof(KvmSignalMaskHeader))
KVM_SET_CPUID2 = _iow(KVMIO, 0x90, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_MP_STATE = _ior(KVMIO, 0x98, ctypes.sizeof(KvmMpState))
KVM_SET_MP_STATE = _iow(KVMIO, 0x99, ctypes.sizeof(KvmMpState))
KVM_GET_TSC_KHZ = _io(KVMIO, 0xA3)

# -- x86 architectural bits the backend sets up --------------------------------------------------

X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_EFER_LME = 1 << 8
X86_EFER_LMA = 1 << 10
X86_RFLAGS_IF = 1 << 9
X86_RFLAGS_DF = 1 << 10
#: CPUID.1:ECX bit 31: "running under a hypervisor".
CPUID_1_ECX_HYPERVISOR = 1 << 31
