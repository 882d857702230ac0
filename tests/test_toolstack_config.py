"""Domain configuration: the xl.cfg options hvmport reads, their defaults and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmport.errors import ConfigError
from hvmport.toolstack import config


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "guest.elf"
    k.write_bytes(b"\x7fELF")
    return k


def load(tmp_path: Path, text: str, *overrides: str) -> config.DomainConfig:
    f = tmp_path / "dom.cfg"
    f.write_text(text)
    return config.load(f, overrides)


def test_defaults_of_a_minimal_config(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, 'name = "a"\nkernel = "guest.elf"\n')
    assert cfg.name == "a"
    assert cfg.kernel == kernel  # relative to the config file's directory
    assert (cfg.memory_mib, cfg.vcpus) == (64, 1)
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("destroy", "restart", "destroy")
    assert cfg.serial == config.Serial("pty")
    assert cfg.vmware_hwver == 0
    assert cfg.vmware_port is False
    assert cfg.machine_args == "xenfv,vmport=off"
    assert cfg.cpu_backend == "auto"


def test_vmware_port_defaults_on_exactly_when_vmware_hwver_is_not_zero(
        tmp_path: Path, kernel: Path) -> None:
    base = 'name = "a"\nkernel = "guest.elf"\n'
    on = load(tmp_path, base + "vmware_hwver = 7\n")
    assert on.vmware_port is True
    assert on.machine_args == "xenfv,vmport=on"
    assert load(tmp_path, base + "vmware_hwver = 7\nvmware_port = 0\n").vmware_port is False
    assert load(tmp_path, base + "vmware_port = 1\n").vmware_port is True


def test_vmware_port_with_nestedhvm_is_refused_with_libxls_words(
        tmp_path: Path, kernel: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, 'name = "a"\nkernel = "guest.elf"\nvmware_port = 1\nnestedhvm = 1\n')
    assert "vmware_port and nestedhvm cannot be enabled simultaneously" in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'dom.cfg'}:3:15:")
    # Without the VMware port, nested HVM is not our concern.
    assert load(tmp_path, 'name = "a"\nkernel = "guest.elf"\nnestedhvm = 1\n').vmware_port is False


@pytest.mark.parametrize(("text", "kind", "path"), [
    ('serial = "pty"', "pty", None), ("serial = ['stdio']", "stdio", None),
    ('serial = "none"', "none", None), ("serial = []", "none", None),
    ('serial = "file:out.txt"', "file", "out.txt"),
])
def test_serial_takes_qemus_syntax(tmp_path: Path, kernel: Path, text: str, kind: str,
                                   path: str | None) -> None:
    cfg = load(tmp_path, f'name = "a"\nkernel = "guest.elf"\n{text}\n')
    assert cfg.serial.kind == kind
    assert cfg.serial.path == (None if path is None else str(tmp_path / path))


@pytest.mark.parametrize("text", ['serial = "vc"', 'serial = "tcp:1:2"', "serial = 1",
                                  'serial = ["pty", "pty"]', 'serial = "file:"'])
def test_serial_refuses_what_it_cannot_do(tmp_path: Path, kernel: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"dom\.cfg:3:"):
        load(tmp_path, f'name = "a"\nkernel = "guest.elf"\n{text}\n')


@pytest.mark.parametrize(("text", "message"), [
    ('memory = 0', "memory=0: must be 1..16384"),
    ('memory = 99999', "must be 1..16384"),
    ('vcpus = 0', "vcpus=0: must be 1..128"),
    ('memory = "lots"', 'expected a number, found string "lots"'),
    ('maxmem = 128', "ballooning"),
    ('on_crash = "coredump-destroy"', "not supported by hvmport"),
    ('on_reboot = "explode"', "not an action"),
    ('type = "pv"', 'type="pv" is not supported'),
    ('builder = "generic"', "not supported"),
    ('cpu_backend = "bochs"', "not one of auto, kvm, unicorn"),
    ('ramdisk = "missing.img"', "no such file"),
    ('device_model_args = [1]', "expected a list of strings"),
    ('name = "has space"', "bad domain name"),
    ('name = "42"', "bad domain name"),
])
def test_bad_values_are_refused_at_their_position(tmp_path: Path, kernel: Path, text: str,
                                                  message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f'kernel = "guest.elf"\nname = "a"\n{text}\n')
    assert message in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'dom.cfg'}:3:"), str(e.value)


def test_a_name_and_a_kernel_are_required(tmp_path: Path, kernel: Path) -> None:
    with pytest.raises(ConfigError, match="needs a name"):
        load(tmp_path, 'kernel = "guest.elf"\n')
    with pytest.raises(ConfigError, match="needs a kernel"):
        load(tmp_path, 'name = "a"\n')


def test_builder_hvm_is_still_accepted(tmp_path: Path, kernel: Path) -> None:
    assert load(tmp_path, 'name = "a"\nbuilder = "hvm"\nkernel = "guest.elf"\n').name == "a"


def test_overrides_apply_as_xl_create_takes_them(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, 'name = "a"\nkernel = "guest.elf"\nmemory = 64\n',
               "memory=128", "name=b", 'cmdline="x y"', "vmware_hwver=0x7")
    assert (cfg.memory_mib, cfg.name, cfg.cmdline, cfg.vmware_hwver) == (128, "b", "x y", 7)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, 'name = "a"\nkernel = "guest.elf"\n', "memory=1", "vcpus=lots")
    assert str(e.value).startswith("<command line>:2:7: vcpus: expected a number")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(tmp_path, 'name = "a"\nkernel = "guest.elf"\n', "memory")


def test_unknown_options_are_warned_about_not_refused(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, 'name = "a"\nkernel = "guest.elf"\nvif = ["bridge=xenbr0"]\n')
    assert cfg.ignored == (f"{tmp_path / 'dom.cfg'}:3:1: unknown option 'vif' ignored",)


def test_guestinfo_values_for_guestrpc(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, 'name = "a"\nkernel = "guest.elf"\n'
               'guestinfo = ["x=from the host", "guestinfo.y=", "z=a=b"]\n')
    assert cfg.guestinfo == (("x", "from the host"), ("y", ""), ("z", "a=b"))
    with pytest.raises(ConfigError, match=r"dom\.cfg:3:.*expected \"KEY=VALUE\""):
        load(tmp_path, 'name = "a"\nkernel = "guest.elf"\nguestinfo = ["novalue"]\n')


def test_the_json_form_round_trips(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, 'name = "a"\nkernel = "guest.elf"\nvmware_hwver = 7\nmemory = 32\n'
               'serial = "file:s.txt"\ndevice_model_args = ["--spin-us", "5"]\n'
               'on_crash = "preserve"\ncmdline = "pointer=2"\nguestinfo = ["k=v w"]\n')
    again = config.from_json(config.to_json(cfg))
    assert config.to_json(again) == config.to_json(cfg)
    assert again.device_model_args == ("--spin-us", "5")
