"""QEMU's ``vmport`` device: the VMware backdoor as the device model runs it.

Semantics follow qemu-vmport-vmmouse.md §2. Under the Xen-style glue (§5) the caller
builds a :class:`VmportRegs` with EAX = ``ioreq.data`` and EBX..EDI from the shared
registers page, calls :meth:`Vmport.handle`, copies EBX..EDI back to the page and, for an
IN, answers ``data`` with the returned value. EAX is not copied back under that glue, so
``x_read_set_eax`` only matters to callers that own the vCPU's registers directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from hvmport.abi import vmware as vm
from hvmport.errors import ConfigError

MASK32 = 0xFFFFFFFF
#: QEMU's VMPORT_ENTRIES: commands 0..68 have a slot in the handler table.
VMPORT_ENTRIES = 69
#: GETRAMSIZE puts this in EBX; the value is QEMU's, its meaning undocumented.
RAMSIZE_EBX = 0x1177


@dataclass(slots=True)
class VmportRegs:
    """The six 32-bit registers of one backdoor call; handlers change them in place."""

    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    esi: int = 0
    edi: int = 0

    def __post_init__(self) -> None:
        self.truncate()

    def truncate(self) -> None:
        """Keep the low 32 bits: callers may hand in 64-bit register values."""
        self.eax &= MASK32
        self.ebx &= MASK32
        self.ecx &= MASK32
        self.edx &= MASK32
        self.esi &= MASK32
        self.edi &= MASK32

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx, self.esi, self.edi)


#: A command handler: reads/changes the registers, returns the command's EAX result.
Handler = Callable[[VmportRegs], int]


@dataclass(slots=True)
class VmportProperties:
    """QEMU's ``vmport`` properties (hyphens become underscores) plus the machine facts
    its handlers read from the machine and vCPU (uuid, ram_size, tsc_khz, apic_bus_hz,
    x2apic). Defaults are QEMU's current ones (all ``x_*`` on)."""

    vmware_vmx_version: int = vm.VERSION_MAGIC
    vmware_vmx_type: int = vm.VMX_TYPE_SCALABLE_SERVER
    x_read_set_eax: bool = True
    x_signal_unsupported_cmd: bool = True
    x_report_vmx_type: bool = True
    x_cmds_v2: bool = True
    #: The machine UUID (``-uuid``), 16 bytes in wire order.
    uuid: bytes = field(default=bytes(16))
    #: Guest RAM in bytes; GETRAMSIZE truncates it to 32 bits as QEMU does.
    ram_size: int = 0
    #: TSC kHz and APIC bus Hz; None or 0 means unknown (GETHZ then reports failure).
    tsc_khz: int | None = None
    apic_bus_hz: int | None = None
    #: Whether the guest's CPUID advertises x2APIC (GET_VCPU_INFO bit 3).
    x2apic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, bytes | bytearray) or len(self.uuid) != 16:
            raise ConfigError("vmport: uuid must be exactly 16 bytes")
        self.uuid = bytes(self.uuid)
        # Command lines hand flags over as 0/1; a string such as "off" would be truthy.
        for name in ("x_read_set_eax", "x_signal_unsupported_cmd", "x_report_vmx_type",
                     "x_cmds_v2", "x2apic"):
            v = getattr(self, name)
            if not isinstance(v, int) or v not in (0, 1):
                raise ConfigError(f"vmport: {name.replace('_', '-')} must be on/off, not {v!r}")
            setattr(self, name, bool(v))
        for name, optional in (("vmware_vmx_version", False), ("vmware_vmx_type", False),
                               ("ram_size", False), ("tsc_khz", True), ("apic_bus_hz", True)):
            v = getattr(self, name)
            if v is None and optional:
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"vmport: {name} must be an integer, not {v!r}")
        for name in ("vmware_vmx_version", "vmware_vmx_type"):
            v = getattr(self, name)
            if not 0 <= v <= MASK32:
                raise ConfigError(f"vmport: {name.replace('_', '-')} = {v} is not a uint32")
        for name in ("ram_size", "tsc_khz", "apic_bus_hz"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"vmport: {name} must not be negative")

    @classmethod
    def from_qemu(cls, props: Mapping[str, int | bool], **machine: object) -> VmportProperties:
        """Build from QEMU-spelt names (``{"x-cmds-v2": False}``); machine facts by keyword."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in props.items():
            name = key.replace("-", "_")
            if name not in known or key.replace("_", "-") != key:
                raise ConfigError(f"vmport: unknown property {key!r}")
            kwargs[name] = value
        kwargs.update(machine)
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(f"vmport: {exc}") from None

    @classmethod
    def compat_5_0(cls, **kwargs: object) -> VmportProperties:
        """The old behaviour (machine types <= 5.0, so libxl's ``xenfv`` = xenfv-3.1)."""
        base: dict[str, object] = {
            "x_read_set_eax": False, "x_signal_unsupported_cmd": False,
            "x_report_vmx_type": False, "x_cmds_v2": False,
        }
        base.update(kwargs)
        return cls(**base)  # type: ignore[arg-type]


class Vmport:
    """Port 0x5658: magic check, 8-bit command dispatch, QEMU's error path."""

    def __init__(self, props: VmportProperties | None = None) -> None:
        self.props = props if props is not None else VmportProperties()
        self._table: list[Handler | None] = [None] * VMPORT_ENTRIES
        #: Diagnostics instead of QEMU's log lines, so a guest cannot flood a log.
        #: Keys are 8-bit commands, so the dict never exceeds 256 entries.
        self.unknown_commands: dict[int, int] = {}
        self.bad_magic = 0
        #: Calls per 8-bit command that had a handler (diagnostics, QMP).
        self.commands: dict[int, int] = {}
        self.register(vm.BDOOR_CMD_GETVERSION, self._cmd_getversion)
        self.register(vm.BDOOR_CMD_GETMEMSIZE, self._cmd_getramsize)
        if self.props.x_cmds_v2:
            self.register(vm.BDOOR_CMD_GETUUID, self._cmd_getbiosuuid)
            self.register(vm.BDOOR_CMD_GETHZ, self._cmd_gethz)
            self.register(vm.BDOOR_CMD_GET_VCPU_INFO, self._cmd_get_vcpu_info)

    # -- registration -------------------------------------------------------------------

    def register(self, command: int, handler: Handler) -> None:
        """Install ``handler`` for ``command`` (0..68). A second registration is a wiring
        bug (QEMU would silently overwrite), so it is refused; see :meth:`unregister`."""
        if not 0 <= command < VMPORT_ENTRIES:
            raise ConfigError(
                f"vmport: command {command} outside the handler table (0..{VMPORT_ENTRIES - 1})")
        if self._table[command] is not None:
            raise ConfigError(f"vmport: command {command} already has a handler")
        self._table[command] = handler

    def unregister(self, command: int) -> None:
        if 0 <= command < VMPORT_ENTRIES:
            self._table[command] = None

    def registered(self, command: int) -> bool:
        return 0 <= command < VMPORT_ENTRIES and self._table[command] is not None

    # -- the port -----------------------------------------------------------------------

    def handle(self, regs: VmportRegs, is_write: bool, size: int) -> int:
        """Run one access to port 0x5658 and return what an IN of ``size`` bytes reads.

        QEMU widens 1- and 2-byte accesses to one 4-byte call, so the command runs in full
        and only the returned value is narrowed. An OUT runs the same path and always
        stores the result in EAX (QEMU's write path). Any other size touches nothing and
        reads all ones.
        """
        if size not in (1, 2, 4):
            return MASK32
        result = self._read4(regs)
        if is_write:
            regs.eax = result
        return result & ((1 << (8 * size)) - 1)

    def _read4(self, regs: VmportRegs) -> int:
        regs.truncate()  # a caller may have stored wide values since construction
        p = self.props
        result: int
        handler: Handler | None = None
        if regs.eax != vm.BDOOR_MAGIC:
            self.bad_magic += 1
        else:
            # QEMU keeps the command in an unsigned char: ECX bits 8..31 are ignored here.
            cmd = regs.ecx & 0xFF
            handler = self._table[cmd] if cmd < VMPORT_ENTRIES else None
            if handler is None:
                self.unknown_commands[cmd] = self.unknown_commands.get(cmd, 0) + 1
        if handler is not None:
            self.commands[cmd] = self.commands.get(cmd, 0) + 1
            result = handler(regs) & MASK32
            regs.truncate()
        elif p.x_signal_unsupported_cmd:
            result = MASK32
        else:
            # "Unchanged": the guest's own EAX, i.e. the magic for an unknown command.
            result = regs.eax
        if p.x_read_set_eax:
            regs.eax = result
        return result

    # -- built-in commands --------------------------------------------------------------

    def _cmd_getversion(self, regs: VmportRegs) -> int:
        regs.ebx = vm.BDOOR_MAGIC
        if self.props.x_report_vmx_type:
            regs.ecx = self.props.vmware_vmx_type
        return self.props.vmware_vmx_version

    def _cmd_getramsize(self, regs: VmportRegs) -> int:
        regs.ebx = RAMSIZE_EBX
        return self.props.ram_size & MASK32

    def _cmd_getbiosuuid(self, regs: VmportRegs) -> int:
        u = self.props.uuid
        regs.ebx = int.from_bytes(u[4:8], "little")
        regs.ecx = int.from_bytes(u[8:12], "little")
        regs.edx = int.from_bytes(u[12:16], "little")
        return int.from_bytes(u[0:4], "little")

    def _cmd_gethz(self, regs: VmportRegs) -> int:
        p = self.props
        if p.tsc_khz and p.apic_bus_hz:
            hz = p.tsc_khz * 1000
            regs.ecx = p.apic_bus_hz & MASK32
            regs.ebx = (hz >> 32) & MASK32
            return hz & MASK32
        regs.ebx = MASK32
        return regs.eax

    def _cmd_get_vcpu_info(self, regs: VmportRegs) -> int:
        return (1 << vm.BDOOR_CMD_VCPU_LEGACY_X2APIC_OK) if self.props.x2apic else 0
