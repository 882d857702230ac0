"""Writing cpio archives in the "newc" format (SVR4 without CRC), what Linux's initramfs reads.

Each member is a 110-byte ASCII header (magic ``070701`` and thirteen 8-digit hex fields),
its NUL-terminated name padded to a multiple of 4 bytes counted from the header's start,
then its data padded to a multiple of 4; a member named ``TRAILER!!!`` ends the archive.
Device nodes and ownership are written as given, so an archive built by an unprivileged
user can still hold ``/dev/console``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from hvmport.errors import ConfigError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
_FIELD_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Member:
    """One archive member. ``mode`` includes the file-type bits (``stat.S_IFREG | 0o755``).
    A symlink's ``data`` is its target; a device node's ``rdev`` is (major, minor)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def directory(name: str, perm: int = 0o755) -> Member:
    return Member(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Member:
    return Member(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Member:
    return Member(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Member:
    return Member(name, stat.S_IFCHR | perm, rdev=(major, minor))


def archive(members: list[Member]) -> bytes:
    """The newc archive of ``members`` in order, with inode numbers 1, 2, ... and the
    trailer. Names are relative (a leading '/' is dropped, as the kernel expects)."""
    out = bytearray()
    seen: set[str] = set()
    for ino, m in enumerate(members, start=1):
        name = m.name.lstrip("/")
        if not name or name == TRAILER or "\0" in name:
            raise ConfigError(f"bad cpio member name {m.name!r}")
        if name in seen:
            raise ConfigError(f"cpio member {name!r} appears twice")
        seen.add(name)
        kind = stat.S_IFMT(m.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                        stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise ConfigError(f"cpio member {name!r}: mode {m.mode:#o} has no file type")
        if m.data and kind not in (stat.S_IFREG, stat.S_IFLNK):
            raise ConfigError(f"cpio member {name!r}: only files and symlinks carry data")
        nlink = 2 if kind == stat.S_IFDIR else 1
        _append(out, ino, m, name, nlink)
    _append(out, 0, Member(TRAILER, 0), TRAILER, 1)
    return bytes(out)


def _append(out: bytearray, ino: int, m: Member, name: str, nlink: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, m.mode, m.uid, m.gid, nlink, m.mtime, len(m.data), 0, 0, m.rdev[0],
              m.rdev[1], len(encoded), 0)
    for value in fields:
        if not 0 <= value <= _FIELD_MAX:
            raise ConfigError(f"cpio member {name!r}: field value {value} does not fit in "
                              f"32 bits")
    out += MAGIC + b"".join(b"%08X" % v for v in fields)
    out += encoded
    out += bytes(-len(out) % 4)
    out += m.data
    out += bytes(-len(out) % 4)
