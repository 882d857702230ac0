"""guests.py: every guest builds, loads with our loaders, and the build cache behaves."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvmport import guests
from hvmport.cpu.base import Mode
from hvmport.errors import ConfigError, HostError
from hvmport.hv import loader
from hvmport.hv.memory import GuestMemory

ALL = [(name, variant) for name in guests.available() for variant in guests.variants(name)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty cache (toolchain.cache_dir() follows XDG_CACHE_HOME)."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "hvmport" / "guests"


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A private copy of guests/ that a test may edit."""
    copy = tmp_path / "src"
    shutil.copytree(guests.guests_dir(), copy)
    return copy


def test_guest_list() -> None:
    assert guests.available() == ["battery", "cpl3", "demo", "echo", "fullcpu", "guestrpc",
                                  "rep_string", "smp", "vmmouse"]
    assert guests.variants("vmmouse") == ("multiboot", "flat32")
    assert guests.variants("battery") == ("multiboot", "flat16", "flat32", "flat64")
    assert guests.variants("cpl3") == ("multiboot", "flat32")
    assert guests.variants("smp") == ("flat32", "flat64")
    assert guests.flat_address("flat16") == 0x10000
    assert guests.flat_address("flat32") == 0x100000
    assert guests.flat_mode("flat16") is Mode.REAL16
    assert guests.flat_mode("flat64") is Mode.LONG64
    assert guests.flat_mode("multiboot") is Mode.PROT32


def test_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown guest 'nope'; available: battery, cpl3"):
        guests.guest_path("nope")
    with pytest.raises(ConfigError, match="guest 'smp' has no 'multiboot' variant; it has: "
                                          "flat32, flat64"):
        guests.guest_path("smp", "multiboot")
    with pytest.raises(ConfigError, match="unknown guest variant 'flat8'"):
        guests.flat_mode("flat8")
    with pytest.raises(ConfigError, match="is an ELF kernel, not a flat image"):
        guests.flat_address("multiboot")


def test_guests_dir_is_the_source_tree() -> None:
    d = guests.guests_dir()
    assert (d / "lib.S").is_file()
    assert d.parent == Path(guests.__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "variant"), ALL)
def test_every_guest_builds_and_loads(name: str, variant: str) -> None:
    path = guests.guest_path(name, variant)
    data = path.read_bytes()
    assert len(data) > 64
    with GuestMemory(16) as mem:
        if variant == "multiboot":
            assert data[:4] == b"\x7fELF" and data[4] == 1  # ELF32, as Multiboot v1 needs
            state = loader.load_multiboot(path, mem)
            assert state.mode is Mode.PROT32
        else:
            state = loader.load_flat(data, mem, guests.flat_address(variant),
                                     guests.flat_mode(variant))
            assert mem.read(guests.flat_address(variant), len(data)) == data
            assert state.mode is guests.flat_mode(variant)


def test_flat_images_start_at_their_entry() -> None:
    """The entry code goes first: a flat image's first instruction is its entry point."""
    # Real mode: `cli` then `mov %cs,%ax` (the flat16 prologue); 32/64-bit: `cld`.
    assert guests.guest_path("battery", "flat16").read_bytes()[:3] == b"\xfa\x8c\xc8"
    assert guests.guest_path("battery", "flat32").read_bytes()[:1] == b"\xfc"
    assert guests.guest_path("battery", "flat64").read_bytes()[:1] == b"\xfc"


def test_multiboot_battery_carries_its_64_bit_piece() -> None:
    data = guests.guest_path("battery", "multiboot").read_bytes()
    phoff, = struct.unpack_from("<I", data, 28)
    phnum, = struct.unpack_from("<H", data, 44)
    loads = [struct.unpack_from("<IIIIII", data, phoff + 32 * i) for i in range(phnum)]
    paddrs = sorted(p[3] for p in loads if p[0] == 1)
    assert paddrs == [0x100000, guests.EMBED64_BASE]
    # And the 64-bit piece begins with the flat 64-bit entry (cld; jmp main).
    piece = next(p for p in loads if p[3] == guests.EMBED64_BASE)
    assert data[piece[1]] == 0xFC


def test_cache_reuses_a_build(cache: Path) -> None:
    first = guests.guest_path("demo", "flat32")
    assert first.is_relative_to(cache)
    stamp = first.stat().st_mtime_ns
    again = guests.guest_path("demo", "flat32")
    assert again == first
    assert again.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in cache.iterdir()] == [first.parent.name]  # no temporary leftovers
    assert not (first.parent / ".obj").exists()


def test_edit_rebuilds(cache: Path, sources: Path) -> None:
    before = guests.guest_path("demo", "flat32", source_dir=sources)
    text = (sources / "demo.S").read_text()
    (sources / "demo.S").write_text(text.replace("demo done\\n", "demo finished\\n"))
    after = guests.guest_path("demo", "flat32", source_dir=sources)
    assert after.parent != before.parent
    assert b"demo finished" in after.read_bytes()
    assert b"demo done" in before.read_bytes()  # the old build is left intact
    # Linker scripts count too.
    (sources / "flat.ld").write_text((sources / "flat.ld").read_text() + "\n/* edit */\n")
    assert guests.guest_path("demo", "flat32", source_dir=sources).parent != after.parent


def test_builds_are_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    a = guests.build_all()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    b = guests.build_all()
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len(names) == len(ALL)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_force_rebuild_replaces_the_tree(cache: Path) -> None:
    first = guests.build_all()
    stamp = (first / "demo.flat32.bin").stat().st_mtime_ns
    again = guests.build_all(force=True)
    assert again == first
    assert (again / "demo.flat32.bin").stat().st_mtime_ns != stamp
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_concurrent_builds(cache: Path) -> None:
    """Several processes building into one empty cache all succeed with the same tree."""
    script = "from hvmport import guests; print(guests.build_all())"
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    dirs = {out.strip() for out, _ in results}
    assert len(dirs) == 1
    built = Path(dirs.pop())
    assert [p.name for p in cache.iterdir()] == [built.name]  # temporaries cleaned up
    assert sorted(p.name for p in built.iterdir()) == sorted(
        guests.guest_path(n, v).name for n, v in ALL)


def test_missing_tools(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(HostError, match="missing as, ld: install GNU binutils"):
        guests.guest_path("demo")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_tool_identity_is_part_of_the_key(cache: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Other (or no) binutils give another key: a build never outlives the tools it came
    from, so removing them means a clear error rather than a stale image."""
    built = guests.guest_path("demo")
    key = guests.source_key(guests.guests_dir())
    monkeypatch.setenv("PATH", str(tmp_path))
    assert guests.source_key(guests.guests_dir()) != key
    with pytest.raises(HostError, match="missing as, ld"):
        guests.guest_path("demo")
    assert built.is_file()


def test_missing_sources(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"guest sources not found at .*: no lib\.S"):
        guests.build_all(source_dir=tmp_path / "nowhere")


def test_assembler_error_is_reported(cache: Path, sources: Path) -> None:
    (sources / "demo.S").write_text((sources / "demo.S").read_text() + "\n    bogus %eax\n")
    with pytest.raises(HostError,
                       match=r"(?s)as failed: .*demo\.S:\d+: Error: no such instruction: .bogus"):
        guests.build_all(source_dir=sources)
    assert [p.name for p in cache.iterdir()] == []  # the failed build left nothing behind


@pytest.fixture
def fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """guests.py as if installed outside a source tree (no guests/ beside src/)."""
    fake = tmp_path / "site" / "a" / "hvmport" / "guests.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(guests, "__file__", str(fake))
    yield fake


def test_not_installed_from_source(fake_tree: Path) -> None:
    with pytest.raises(HostError, match="installed editable from its source tree"):
        guests.guests_dir()
