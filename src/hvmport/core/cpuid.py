"""The hypervisor CPUID leaves a domain shows (series patch 2/8, vmware-port.md §4.1)."""

from __future__ import annotations

import struct

from hvmport.abi import vmware as vm

CpuidEntry = tuple[int, int, int, int]

HYPERVISOR_BASE = 0x40000000
VMWARE_MAX_LEAF = 0x40000010
#: LAPIC bus (timer) frequency in kHz, from Xen's APIC_BUS_CYCLE_NS = 10.
BUS_KHZ = 100_000


def _signature(text: bytes) -> tuple[int, int, int]:
    b, c, d = struct.unpack("<III", text)
    return b, c, d


def has_vmware_cpuid(vmware_hwver: int) -> bool:
    return vmware_hwver >= vm.VMWARE_CPUID_MIN_HWVER


def hypervisor_leaves(vmware_hwver: int, tsc_khz: int) -> dict[tuple[int, int], CpuidEntry]:
    """Leaves 0x40000000..0x40000010 as (leaf, subleaf) -> (eax, ebx, ecx, edx).

    With vmware_hwver >= 7 they say "VMwareVMware" and give the TSC and bus frequencies in
    kHz, with ECX = 0 in 0x40000010 (no VMCALL/VMMCALL backdoor: guests use the port).
    Otherwise every leaf of the range is zero, so no hypervisor signature is shown at all.
    """
    if tsc_khz < 0 or tsc_khz > 0xFFFFFFFF:
        raise ValueError(f"tsc_khz {tsc_khz} does not fit CPUID's 32-bit EAX")
    leaves: dict[tuple[int, int], CpuidEntry] = {
        (leaf, 0): (0, 0, 0, 0) for leaf in range(HYPERVISOR_BASE, VMWARE_MAX_LEAF + 1)
    }
    if has_vmware_cpuid(vmware_hwver):
        leaves[(HYPERVISOR_BASE, 0)] = (VMWARE_MAX_LEAF, *_signature(b"VMwareVMware"))
        leaves[(VMWARE_MAX_LEAF, 0)] = (tsc_khz, BUS_KHZ, 0, 0)
    return leaves
