"""Everything in the public ABI, in one place, for ``hvmport abi`` and the gcc cross-check."""

from __future__ import annotations

from types import ModuleType

from hvmport.abi import dm_op, ioreq, vmware
from hvmport.abi.layout import BitField, StructLayout

_MODULES: tuple[ModuleType, ...] = (ioreq, dm_op, vmware)
#: Our own derived numbers, kept beside the ABI for convenience but not part of it.
_DERIVED = frozenset({
    "IOREQ_SIZE", "BUF_IOREQ_SIZE", "PAGE_SIZE", "VMWARE_REGS_SIZE", "IOREQ_SLOTS_PER_PAGE",
    "VMPORT_REGS_PER_PAGE", "IOREQ_STATE_BYTE", "IOREQ_DATA_OFFSET", "XEN_DM_OP_SIZE",
    "XEN_DM_OP_UNION_OFFSET", "XEN_DM_OP_UNION_SIZE", "BDOOR_PORT_END",
    "VMWARE_CPUID_MIN_HWVER", "VMWARE_HWVER_DEFAULT_ANSWER", "UNION_PORT_BASE",
})


def layouts() -> list[StructLayout]:
    return [*ioreq.LAYOUTS, *dm_op.LAYOUTS]


def constants() -> dict[str, int]:
    """Every integer constant, by Xen's (or VMware's) name."""
    out: dict[str, int] = {}
    for module in _MODULES:
        for name, value in vars(module).items():
            public = name.isupper() or name.startswith(("XEN", "__HYPERVISOR"))
            if public and name not in _DERIVED and isinstance(value, int) \
                    and not isinstance(value, bool):
                out[name] = value
    return out


def to_json() -> dict[str, object]:
    return {
        "structs": {layout.name: layout.to_json() for layout in layouts()},
        "constants": constants(),
    }


def to_table() -> str:
    lines = []
    for layout in layouts():
        lines.append(f"struct {layout.name}  ({layout.size} bytes)")
        for f in layout.fields:
            if isinstance(f, BitField):
                lines.append(f"  {f.name:<24} bits {f.bit_offset:>5} +{f.bits}")
            else:
                lines.append(f"  {f.name:<24} offset {f.offset:>4}  size {f.size}")
        lines.append("")
    lines.append("constants")
    for name, value in sorted(constants().items()):
        lines.append(f"  {name:<48} {value:>12}  {value:#x}")
    return "\n".join(lines)
