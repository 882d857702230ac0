"""hvmport.cpio: newc archives, checked by GNU cpio (an independent reader)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hvmport import cpio
from hvmport.errors import ConfigError


def gnu_cpio(archive: bytes, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["cpio", "--quiet", *args], input=archive, capture_output=True,
                          cwd=cwd, check=True)
    return proc.stdout.decode()


def sample() -> bytes:
    return cpio.archive([
        cpio.directory("bin"),
        cpio.directory("/dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.file("odd", b"x" * 5),  # data lengths that need padding
        cpio.file("empty", b""),
        cpio.symlink("bin/sh", "tool"),
    ])


def test_gnu_cpio_lists_every_member() -> None:
    listing = gnu_cpio(sample(), "-itv").splitlines()
    assert [ln.split()[-1] if "->" not in ln else ln.split()[-3] for ln in listing] == [
        "bin", "dev", "dev/console", "bin/tool", "odd", "empty", "bin/sh"]
    by_name = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in listing}
    assert by_name["bin"].startswith("drwxr-xr-x")
    assert by_name["dev/console"].startswith("crw-------")
    assert "5," in by_name["dev/console"] and " 1 " in by_name["dev/console"]
    assert by_name["bin/tool"].startswith("-rwxr-xr-x")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("-> tool")


def test_gnu_cpio_extracts_the_contents(tmp_path: Path) -> None:
    archive = cpio.archive([
        cpio.directory("bin"),
        cpio.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.file("odd", b"x" * 5),
        cpio.file("big", bytes(range(256)) * 999),
        cpio.symlink("bin/sh", "tool"),
    ])
    gnu_cpio(archive, "-id", cwd=tmp_path)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "big").read_bytes() == bytes(range(256)) * 999
    assert (tmp_path / "bin/sh").readlink() == Path("tool")


def test_layout_is_newc() -> None:
    data = cpio.archive([cpio.file("a", b"abc")])
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    # header (110) + "a\0" padded to 112, then "abc" padded to 116, then the trailer.
    assert data[110:112] == b"a\0"
    assert data[112:116] == b"abc\0"
    assert data[116:122] == b"070701"
    assert b"TRAILER!!!\0" in data[116:]


@pytest.mark.parametrize(("members", "message"), [
    ([cpio.file("a", b""), cpio.file("/a", b"")], "appears twice"),
    ([cpio.file("", b"")], "bad cpio member name"),
    ([cpio.file("TRAILER!!!", b"")], "bad cpio member name"),
    ([cpio.Member("d", 0o40755, b"x")], "only files and symlinks"),
    ([cpio.Member("x", 0o644)], "no file type"),
    ([cpio.Member("x", 0o100644, uid=1 << 32)], "does not fit"),
])
def test_rejections(members: list[cpio.Member], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cpio.archive(members)
