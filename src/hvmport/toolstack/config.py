"""A domain's configuration: xl.cfg settings checked and turned into typed values.

Every option is checked once, here, before anything starts; an error names the file, line
and column of the value at fault (for ``KEY=VALUE`` overrides, ``<command line>`` and the
override's position). Keys this toolstack does not know are reported as warnings, not
silently dropped, and not refused (xl ignores them too: a config written for Xen should
still start).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvmport.errors import ConfigError
from hvmport.toolstack import xlcfg

#: xl's domain-name rules, as libxl enforces them (and '/' would break the run directory).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
MAX_MEMORY_MIB = 16384
MAX_VCPUS = 128
ACTIONS = ("destroy", "restart", "preserve")
#: Actions xl knows that need machinery hvmport does not have (core dumps, soft reset).
_UNSUPPORTED_ACTIONS = ("rename-restart", "coredump-destroy", "coredump-restart", "soft-reset")
BACKENDS = ("auto", "kvm", "unicorn")
NIL_UUID = "00000000-0000-0000-0000-000000000000"
#: What the toolstack reads; anything else in a file gives a warning.
KNOWN_KEYS = frozenset({
    "name", "type", "builder", "memory", "maxmem", "vcpus", "maxvcpus", "kernel", "ramdisk",
    "cmdline", "serial", "on_poweroff", "on_reboot", "on_crash", "vmware_hwver",
    "vmware_port", "nestedhvm", "device_model_args", "cpu_backend", "debugcon", "uuid",
    "guestinfo",
})


@dataclass(frozen=True, slots=True)
class Serial:
    """QEMU ``-serial`` syntax: ``pty``, ``stdio``, ``file:PATH`` or ``none``."""

    kind: str
    path: str | None = None

    def __str__(self) -> str:
        return f"file:{self.path}" if self.kind == "file" else self.kind


@dataclass(frozen=True, slots=True)
class DomainConfig:
    name: str
    kernel: Path
    memory_mib: int = 64
    vcpus: int = 1
    ramdisk: Path | None = None
    cmdline: str = ""
    serial: Serial = Serial("pty")
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    vmware_hwver: int = 0
    vmware_port: bool = False
    device_model_args: tuple[str, ...] = ()
    #: GuestRPC guestinfo values the guest reads with ``info-get guestinfo.KEY``.
    guestinfo: tuple[tuple[str, str], ...] = ()
    cpu_backend: str = "auto"
    #: Where port 0xe9 output goes: "console" (the serial console), "none" or "file:PATH".
    debugcon: str = "console"
    uuid: str = NIL_UUID
    #: Unknown keys, with where they were written (reported as warnings).
    ignored: tuple[str, ...] = ()
    #: The settings as given, for ``hvmport list -l``.
    settings: dict[str, xlcfg.Value] = field(default_factory=dict)

    @property
    def machine_args(self) -> str:
        """The device model's machine options, as libxl builds them for QEMU."""
        return "xenfv" + (",vmport=on" if self.vmware_port else ",vmport=off")


def load(path: str | os.PathLike[str] | None, overrides: Sequence[str] = (),
         *, text: str | None = None) -> DomainConfig:
    """Parse a file (or ``text``), apply ``KEY=VALUE`` overrides as ``xl create`` does, check.

    Relative paths in the file (kernel, ramdisk, serial file) are taken from the directory
    of the file, as a user who keeps a guest next to its config expects.
    """
    if text is not None:
        source = os.fspath(path) if path is not None else "<string>"
        cfg = xlcfg.parse(text, source)
    elif path is not None:
        cfg = xlcfg.parse_file(path)
    else:
        cfg = xlcfg.XlConfig()
    for i, line in enumerate(overrides, start=1):
        if "=" not in line:
            raise ConfigError(f"expected KEY=VALUE, got {line!r}", path="<command line>",
                              line=i, column=1)
        cfg.read(line, "<command line>", first_line=i, bare_words=True)
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    return from_settings(cfg, base)


def from_settings(cfg: xlcfg.XlConfig, base: Path) -> DomainConfig:
    reader = _Reader(cfg)
    kind = reader.string("type", None)
    builder = reader.string("builder", None)
    if kind is not None and kind != "hvm":
        raise reader.error("type", f'type="{kind}" is not supported: hvmport builds HVM '
                                   'domains only (type="hvm")')
    if builder is not None and builder != "hvm":
        raise reader.error("builder", f'builder="{builder}" is not supported (use type="hvm")')
    name = reader.string("name", None)
    if name is None:
        raise ConfigError("the domain needs a name (name=\"...\")",
                          path=_source(cfg), line=None)
    if _NAME_RE.fullmatch(name) is None or name.isdigit():
        raise reader.error("name", f"bad domain name {name!r}: letters, digits, '.', '_', "
                                   "'+', '-', at most 64, not all digits (it would read as "
                                   "an id)")
    memory = reader.number("memory", 64, 1, MAX_MEMORY_MIB)
    maxmem = reader.number("maxmem", memory, 1, MAX_MEMORY_MIB)
    if maxmem != memory:
        raise reader.error("maxmem", "maxmem different from memory needs ballooning, "
                                     "which hvmport does not do")
    vcpus = reader.number("vcpus", 1, 1, MAX_VCPUS)
    maxvcpus = reader.number("maxvcpus", vcpus, 1, MAX_VCPUS)
    if maxvcpus != vcpus:
        raise reader.error("maxvcpus", "maxvcpus different from vcpus needs vCPU hot-plug, "
                                       "which hvmport does not do")
    kernel = reader.path("kernel", base)
    if kernel is None:
        raise ConfigError('the domain needs a kernel (kernel="FILE": a Multiboot ELF, or a '
                          'Linux bzImage or vmlinux)',
                          path=_source(cfg))
    hwver = reader.number("vmware_hwver", 0, 0, 0xFFFFFFFF)
    vmware_port = bool(reader.number("vmware_port", 1 if hwver else 0, 0, 1))
    nested = bool(reader.number("nestedhvm", 0, 0, 1))
    if vmware_port and nested:
        # libxl's words (ERROR_INVAL), so that users searching for them find the reason.
        where = "vmware_port" if "vmware_port" in cfg else "nestedhvm"
        raise reader.error(where, "vmware_port and nestedhvm cannot be enabled simultaneously")
    return DomainConfig(
        name=name, kernel=kernel, memory_mib=memory, vcpus=vcpus,
        ramdisk=reader.path("ramdisk", base), cmdline=reader.string("cmdline", "") or "",
        serial=_serial(reader, base),
        on_poweroff=reader.action("on_poweroff", "destroy"),
        on_reboot=reader.action("on_reboot", "restart"),
        on_crash=reader.action("on_crash", "destroy"),
        vmware_hwver=hwver, vmware_port=vmware_port,
        device_model_args=tuple(reader.strings("device_model_args")),
        guestinfo=_guestinfo(reader),
        cpu_backend=reader.choice("cpu_backend", "auto", BACKENDS),
        debugcon=_debugcon(reader, base),
        uuid=reader.string("uuid", None) or NIL_UUID,
        ignored=tuple(f"{cfg.setting(k).pos}: unknown option {k!r} ignored"
                      for k in cfg if k not in KNOWN_KEYS),
        settings=dict(cfg),
    )


def _source(cfg: xlcfg.XlConfig) -> str | None:
    for setting in cfg.settings.values():
        if setting.pos.source != "<command line>":
            return setting.pos.source
    return None


def _serial(reader: _Reader, base: Path) -> Serial:
    if "serial" not in reader.cfg:
        return Serial("pty")
    node = reader.cfg.setting("serial").node
    items: Iterable[xlcfg.Node] = node.items if isinstance(node, xlcfg.ListNode) else (node,)
    specs = list(items)
    if len(specs) > 1:
        raise reader.error("serial", "hvmport has one serial port (COM1): give one device")
    if not specs:
        return Serial("none")
    spec = specs[0]
    if not isinstance(spec, xlcfg.Atom) or not isinstance(spec.value, str):
        raise spec.pos.error(f"serial: expected a string, found {xlcfg.describe(spec)}")
    text = spec.value
    if text in ("pty", "stdio", "none"):
        return Serial(text)
    if text.startswith("file:") and len(text) > 5:
        return Serial("file", str(base / text[5:]))
    raise spec.pos.error(f"serial={text!r}: hvmport supports 'pty', 'stdio', 'file:PATH' and "
                         "'none'")


def _guestinfo(reader: _Reader) -> tuple[tuple[str, str], ...]:
    pairs = []
    for text in reader.strings("guestinfo"):
        key, eq, value = text.partition("=")
        key = key.removeprefix("guestinfo.")
        if not eq or not key or any(c.isspace() for c in key):
            raise reader.error("guestinfo", f"{text!r}: expected \"KEY=VALUE\" (a key "
                                            "without spaces)")
        pairs.append((key, value))
    return tuple(pairs)


def _debugcon(reader: _Reader, base: Path) -> str:
    text = reader.string("debugcon", "console") or "console"
    if text in ("console", "none"):
        return text
    if text.startswith("file:") and len(text) > 5:
        return "file:" + str(base / text[5:])
    raise reader.error("debugcon", f"debugcon={text!r}: use 'console', 'none' or 'file:PATH'")


class _Reader:
    """Typed access to settings, with errors at the value's position."""

    def __init__(self, cfg: xlcfg.XlConfig) -> None:
        self.cfg = cfg

    def error(self, key: str, message: str) -> ConfigError:
        node = self.cfg.setting(key).node
        return node.pos.error(f"{key}: {message}")

    def _atom(self, key: str, kind: type) -> xlcfg.Atom | None:
        if key not in self.cfg:
            return None
        node = self.cfg.setting(key).node
        if not isinstance(node, xlcfg.Atom) or not isinstance(node.value, kind):
            want = "a number" if kind is int else "a string"
            raise node.pos.error(f"{key}: expected {want}, found {xlcfg.describe(node)}")
        return node

    def string(self, key: str, default: str | None) -> str | None:
        atom = self._atom(key, str)
        if atom is None:
            return default
        assert isinstance(atom.value, str)
        if "\x00" in atom.value:
            raise atom.pos.error(f"{key}: NUL in a string")
        return atom.value

    def number(self, key: str, default: int, low: int, high: int) -> int:
        if key not in self.cfg:
            return default
        node = self.cfg.setting(key).node
        value: int | None = None
        if isinstance(node, xlcfg.Atom):
            if isinstance(node.value, int):
                value = node.value
            else:
                # Overrides on the command line are bare words: memory=128 is the word "128".
                value = xlcfg.number_from_text(node.value)
        if value is None:
            raise node.pos.error(f"{key}: expected a number, found {xlcfg.describe(node)}")
        if not low <= value <= high:
            raise node.pos.error(f"{key}={value}: must be {low}..{high}")
        return value

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.string(key, default) or default
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def action(self, key: str, default: str) -> str:
        value = self.string(key, default) or default
        if value in _UNSUPPORTED_ACTIONS:
            raise self.error(key, f"{value!r} is not supported by hvmport "
                                  f"(use {', '.join(ACTIONS)})")
        if value not in ACTIONS:
            raise self.error(key, f"{value!r} is not an action ({', '.join(ACTIONS)})")
        return value

    def path(self, key: str, base: Path) -> Path | None:
        value = self.string(key, None)
        if value is None:
            return None
        if not value:
            raise self.error(key, "empty path")
        path = base / os.path.expanduser(value)
        if not path.is_file():
            raise self.error(key, f"{path}: no such file")
        return path

    def strings(self, key: str) -> list[str]:
        if key not in self.cfg:
            return []
        node = self.cfg.setting(key).node
        items = node.items if isinstance(node, xlcfg.ListNode) else (node,)
        out = []
        for item in items:
            if not isinstance(item, xlcfg.Atom) or not isinstance(item.value, str):
                raise item.pos.error(f"{key}: expected a list of strings, found "
                                     f"{xlcfg.describe(item)}")
            out.append(item.value)
        return out


def to_json(cfg: DomainConfig) -> dict[str, Any]:
    """The checked configuration, for the domain's monitor process and ``list -l``."""
    return {
        "name": cfg.name, "kernel": str(cfg.kernel), "memory": cfg.memory_mib,
        "vcpus": cfg.vcpus, "ramdisk": None if cfg.ramdisk is None else str(cfg.ramdisk),
        "cmdline": cfg.cmdline, "serial": str(cfg.serial), "on_poweroff": cfg.on_poweroff,
        "on_reboot": cfg.on_reboot, "on_crash": cfg.on_crash,
        "vmware_hwver": cfg.vmware_hwver, "vmware_port": cfg.vmware_port,
        "device_model_args": list(cfg.device_model_args), "cpu_backend": cfg.cpu_backend,
        "guestinfo": [f"{k}={v}" for k, v in cfg.guestinfo],
        "debugcon": cfg.debugcon, "uuid": cfg.uuid,
    }


def from_json(raw: dict[str, Any]) -> DomainConfig:
    """The inverse of :func:`to_json`, re-checked as if it were a file."""
    settings = {k: v for k, v in raw.items() if v is not None}
    settings["vmware_port"] = int(bool(settings.get("vmware_port")))
    settings["serial"] = [settings["serial"]] if settings.get("serial") != "none" else []
    text = xlcfg.render(settings)
    return load("<domain.json>", text=text)
