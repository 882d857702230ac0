"""QEMU's vmport in the device model (qemu-vmport-vmmouse.md §2, guest-clients.md §1.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmport.abi import vmware as vm
from hvmport.dm.devices.vmport import (
    VMPORT_ENTRIES,
    Vmport,
    VmportProperties,
    VmportRegs,
)
from hvmport.errors import ConfigError

MAGIC = vm.BDOOR_MAGIC
ONES = 0xFFFFFFFF
UUID = bytes(range(0x10, 0x20))


def regs(cmd: int, *, eax: int = MAGIC, ebx: int = 0x1111_1111, edx: int = 0x5658,
         esi: int = 0x5151_5151, edi: int = 0xD1D1_D1D1) -> VmportRegs:
    return VmportRegs(eax, ebx, cmd, edx, esi, edi)


def call(port: Vmport, cmd: int, *, is_write: bool = False, size: int = 4,
         **kw: int) -> tuple[int, VmportRegs]:
    r = regs(cmd, **kw)
    return port.handle(r, is_write, size), r


# -- GETVERSION --------------------------------------------------------------------------

def test_getversion_defaults_match_qemu() -> None:
    value, r = call(Vmport(), vm.BDOOR_CMD_GETVERSION)
    assert value == 6
    assert (r.eax, r.ebx, r.ecx) == (6, MAGIC, 2)
    assert (r.edx, r.esi, r.edi) == (0x5658, 0x5151_5151, 0xD1D1_D1D1)


def test_getversion_properties_and_report_vmx_type_off() -> None:
    p = VmportProperties(vmware_vmx_version=7, vmware_vmx_type=4, x_report_vmx_type=False)
    value, r = call(Vmport(p), vm.BDOOR_CMD_GETVERSION)
    assert value == 7
    assert r.ebx == MAGIC
    assert r.ecx == vm.BDOOR_CMD_GETVERSION  # left alone without x-report-vmx-type


@pytest.mark.parametrize("ecx", [0x0000_000A, 0xABCD_000A, 0x0000_010A, 0xFFFF_FF0A])
def test_command_is_the_low_eight_bits_of_ecx(ecx: int) -> None:
    value, r = call(Vmport(), ecx)
    assert value == 6
    assert r.ebx == MAGIC


# -- error path --------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [
    vm.BDOOR_CMD_GETMHZ, vm.BDOOR_CMD_GETHWVERSION, vm.BDOOR_CMD_GETTIME,
    vm.BDOOR_CMD_MESSAGE, vm.BDOOR_CMD_GETTIMEFULL, vm.BDOOR_CMD_ABSPOINTER_DATA,
    VMPORT_ENTRIES, vm.BDOOR_CMD_ABSPOINTER_RESTRICT, vm.BDOOR_CMD_STEALCLOCK, 0xFF,
])
def test_unknown_command_signals_all_ones(cmd: int) -> None:
    port = Vmport()
    value, r = call(port, cmd)
    assert value == ONES
    assert r.eax == ONES  # x-read-set-eax
    assert (r.ebx, r.ecx, r.edx, r.esi, r.edi) == (0x1111_1111, cmd, 0x5658, 0x5151_5151,
                                                    0xD1D1_D1D1)
    assert port.unknown_commands == {cmd & 0xFF: 1}


def test_stealclock_probe_fails_as_linux_needs() -> None:
    # Linux's "disable" probe: EBX = 0, ESI = 0, EDI = 1; anything but -1 means "supported".
    value, _ = call(Vmport(), vm.BDOOR_CMD_STEALCLOCK, ebx=0, esi=0, edi=1)
    assert value == ONES


def test_unknown_command_with_old_compat_returns_magic_unchanged() -> None:
    port = Vmport(VmportProperties.compat_5_0())
    value, r = call(port, vm.BDOOR_CMD_STEALCLOCK)
    assert value == MAGIC
    assert r.eax == MAGIC


@pytest.mark.parametrize("eax", [0, MAGIC - 1, MAGIC + 1, 0x0000_5868, ONES])
def test_bad_magic(eax: int) -> None:
    port = Vmport()
    value, r = call(port, vm.BDOOR_CMD_GETVERSION, eax=eax)
    assert value == ONES
    assert r.ebx == 0x1111_1111  # the command did not run
    assert port.bad_magic == 1
    old = Vmport(VmportProperties(x_signal_unsupported_cmd=False))
    value, r = call(old, vm.BDOOR_CMD_GETVERSION, eax=eax)
    assert value == eax  # the guest's own EAX
    assert r.ebx == 0x1111_1111


def test_magic_compared_on_32_bits_only() -> None:
    r = VmportRegs(0xDEAD_BEEF_0000_0000 | MAGIC, 0, vm.BDOOR_CMD_GETVERSION, 0, 0, 0)
    assert Vmport().handle(r, False, 4) == 6


def test_read_set_eax_off_leaves_eax() -> None:
    port = Vmport(VmportProperties(x_read_set_eax=False))
    value, r = call(port, vm.BDOOR_CMD_GETVERSION)
    assert value == 6
    assert r.eax == MAGIC
    value, r = call(port, vm.BDOOR_CMD_STEALCLOCK)
    assert value == ONES
    assert r.eax == MAGIC


# -- the other built-in commands ----------------------------------------------------------

def test_getramsize_truncates_to_32_bits() -> None:
    port = Vmport(VmportProperties(ram_size=(4 << 30) + (512 << 20)))
    value, r = call(port, vm.BDOOR_CMD_GETMEMSIZE)
    assert value == 512 << 20
    assert r.ebx == 0x1177
    value, _ = call(Vmport(VmportProperties(ram_size=2 << 30)), vm.BDOOR_CMD_GETMEMSIZE)
    assert value == 0x8000_0000


def test_getbiosuuid_little_endian_dwords() -> None:
    value, r = call(Vmport(VmportProperties(uuid=UUID)), vm.BDOOR_CMD_GETUUID)
    assert value == r.eax == 0x13121110
    assert (r.ebx, r.ecx, r.edx) == (0x17161514, 0x1B1A1918, 0x1F1E1D1C)
    assert (r.esi, r.edi) == (0x5151_5151, 0xD1D1_D1D1)


@pytest.mark.parametrize(("tsc_khz", "eax", "ebx"), [
    (2_500_000, 2_500_000_000, 0),
    (5_000_000, 5_000_000_000 - (1 << 32), 1),  # the 64-bit product, EBX = high word
])
def test_gethz_known(tsc_khz: int, eax: int, ebx: int) -> None:
    port = Vmport(VmportProperties(tsc_khz=tsc_khz, apic_bus_hz=1_000_000_000))
    value, r = call(port, vm.BDOOR_CMD_GETHZ, ebx=ONES)
    assert value == eax
    assert r.ebx == ebx
    assert r.ecx == 1_000_000_000


@pytest.mark.parametrize(("tsc_khz", "bus"), [(None, None), (2_500_000, None),
                                              (None, 100_000_000), (0, 100_000_000)])
def test_gethz_unknown(tsc_khz: int | None, bus: int | None) -> None:
    port = Vmport(VmportProperties(tsc_khz=tsc_khz, apic_bus_hz=bus))
    value, r = call(port, vm.BDOOR_CMD_GETHZ, ebx=0)
    assert r.ebx == ONES  # Linux: "Failed to get TSC freq from the hypervisor"
    assert value == MAGIC  # EAX unchanged
    assert r.ecx == vm.BDOOR_CMD_GETHZ


@pytest.mark.parametrize(("x2apic", "eax"), [(True, 0x8), (False, 0x0)])
def test_get_vcpu_info(x2apic: bool, eax: int) -> None:
    value, _ = call(Vmport(VmportProperties(x2apic=x2apic)), vm.BDOOR_CMD_GET_VCPU_INFO, ebx=0)
    assert value == eax
    assert not value & (1 << vm.BDOOR_CMD_VCPU_RESERVED)


@pytest.mark.parametrize("cmd", [vm.BDOOR_CMD_GETUUID, vm.BDOOR_CMD_GETHZ,
                                 vm.BDOOR_CMD_GET_VCPU_INFO])
def test_cmds_v2_gating(cmd: int) -> None:
    p = VmportProperties(x_cmds_v2=False, tsc_khz=1, apic_bus_hz=1, x2apic=True, uuid=UUID)
    port = Vmport(p)
    assert not port.registered(cmd)
    value, r = call(port, cmd)
    assert value == ONES
    assert r.ebx == 0x1111_1111
    assert Vmport(VmportProperties()).registered(cmd)


def test_xenfv_compat_level_is_the_old_behaviour() -> None:
    port = Vmport(VmportProperties.compat_5_0())
    value, r = call(port, vm.BDOOR_CMD_GETVERSION)
    assert value == 6
    assert r.ecx == vm.BDOOR_CMD_GETVERSION  # no vmx type
    assert r.eax == MAGIC  # no read-set-eax
    assert not port.registered(vm.BDOOR_CMD_GETHZ)
    assert port.registered(vm.BDOOR_CMD_GETMEMSIZE)


# -- sizes and direction -----------------------------------------------------------------

@pytest.mark.parametrize(("size", "mask"), [(1, 0xFF), (2, 0xFFFF), (4, ONES)])
def test_narrow_in_runs_the_full_command(size: int, mask: int) -> None:
    port = Vmport(VmportProperties(uuid=UUID))
    value, r = call(port, vm.BDOOR_CMD_GETUUID, size=size)
    assert value == 0x13121110 & mask
    assert r.eax == 0x13121110
    assert r.edx == 0x1F1E1D1C


@pytest.mark.parametrize("size", [0, 3, 5, 8, -1])
def test_bad_size_touches_nothing(size: int) -> None:
    value, r = call(Vmport(), vm.BDOOR_CMD_GETVERSION, size=size)
    assert value == ONES
    assert r.as_tuple() == regs(vm.BDOOR_CMD_GETVERSION).as_tuple()


def test_out_runs_the_command_and_sets_eax_even_without_read_set_eax() -> None:
    port = Vmport(VmportProperties(x_read_set_eax=False))
    _, r = call(port, vm.BDOOR_CMD_GETVERSION, is_write=True)
    assert r.eax == 6
    assert r.ebx == MAGIC


def test_xen_glue_round_trip() -> None:
    """§5: EAX from ioreq.data, others from the page; EBX..EDI go back, EAX does not."""
    port = Vmport(VmportProperties(ram_size=1 << 30))
    page = {"ebx": 0, "ecx": vm.BDOOR_CMD_GETMEMSIZE, "edx": 0x5658, "esi": 7, "edi": 9}
    r = VmportRegs(eax=MAGIC, **page)
    data = port.handle(r, is_write=False, size=4)
    back = {k: getattr(r, k) for k in page}
    assert data == 1 << 30
    assert back == {"ebx": 0x1177, "ecx": vm.BDOOR_CMD_GETMEMSIZE, "edx": 0x5658, "esi": 7,
                    "edi": 9}


# -- registration -------------------------------------------------------------------------

def test_register_custom_handler() -> None:
    port = Vmport()

    def rpc(r: VmportRegs) -> int:
        r.ecx = 0x0001_0000 | (r.ecx & 0xFFFF)
        r.edx = 0x1234_0000
        return (1 << 40) | 0x42  # wider than 32 bits: must be truncated

    port.register(vm.BDOOR_CMD_MESSAGE, rpc)
    value, r = call(port, vm.BDOOR_CMD_MESSAGE)
    assert value == 0x42
    assert (r.eax, r.ecx, r.edx) == (0x42, 0x0001_001E, 0x1234_0000)
    port.unregister(vm.BDOOR_CMD_MESSAGE)
    assert call(port, vm.BDOOR_CMD_MESSAGE)[0] == ONES


@pytest.mark.parametrize("cmd", [-1, VMPORT_ENTRIES, 91, 255])
def test_register_outside_table(cmd: int) -> None:
    with pytest.raises(ConfigError):
        Vmport().register(cmd, lambda r: 0)


def test_register_duplicate() -> None:
    port = Vmport()
    with pytest.raises(ConfigError, match="already"):
        port.register(vm.BDOOR_CMD_GETVERSION, lambda r: 0)
    port.register(67, lambda r: 1)  # an unused slot
    port.unregister(vm.BDOOR_CMD_GET_VCPU_INFO)
    port.register(vm.BDOOR_CMD_GET_VCPU_INFO, lambda r: 5)
    assert call(port, vm.BDOOR_CMD_GET_VCPU_INFO)[0] == 5


# -- properties ---------------------------------------------------------------------------

def test_properties_from_qemu_names() -> None:
    p = VmportProperties.from_qemu(
        {"vmware-vmx-version": 9, "vmware-vmx-type": 4, "x-cmds-v2": False},
        ram_size=123)
    assert (p.vmware_vmx_version, p.vmware_vmx_type, p.x_cmds_v2, p.ram_size) == (
        9, 4, False, 123)
    assert p.x_read_set_eax and p.x_signal_unsupported_cmd and p.x_report_vmx_type
    # The DM's command line turns on/off into 1/0.
    q = VmportProperties.from_qemu({"x-cmds-v2": 0, "x-read-set-eax": 1})
    assert q.x_cmds_v2 is False
    assert q.x_read_set_eax is True
    assert not Vmport(q).registered(vm.BDOOR_CMD_GETHZ)


@pytest.mark.parametrize("props", [{"no-such": 1}, {"x_cmds_v2": True}])
def test_properties_unknown_name(props: dict[str, int | bool]) -> None:
    with pytest.raises(ConfigError, match="unknown property"):
        VmportProperties.from_qemu(props)


@pytest.mark.parametrize("kw", [
    {"uuid": b"short"}, {"vmware_vmx_version": 1 << 32}, {"vmware_vmx_type": -1},
    {"ram_size": -1}, {"x_cmds_v2": "off"}, {"x_read_set_eax": 2}, {"tsc_khz": "2G"},
    {"vmware_vmx_version": True},
])
def test_properties_validated(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        VmportProperties(**kw)  # type: ignore[arg-type]


# -- hostile guest ------------------------------------------------------------------------

u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=400, deadline=None)
@given(eax=st.one_of(st.just(MAGIC), u64), ebx=u64, ecx=u64, edx=u64, esi=u64, edi=u64,
       is_write=st.booleans(), size=st.integers(-2, 9))
def test_never_raises_and_stays_32_bit(eax: int, ebx: int, ecx: int, edx: int, esi: int,
                                       edi: int, is_write: bool, size: int) -> None:
    port = Vmport(VmportProperties(tsc_khz=(1 << 40), apic_bus_hz=(1 << 40),
                                   ram_size=(1 << 50)))
    r = VmportRegs(eax, ebx, ecx, edx, esi, edi)
    value = port.handle(r, is_write, size)
    assert 0 <= value <= ONES
    assert all(0 <= v <= ONES for v in r.as_tuple())
