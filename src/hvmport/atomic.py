"""Atomic operations on shared pages, for the buffered ring's two processes.

The ring protocol (BUFIOREQ_ATOMIC) needs the device model to advance ``read_pointer`` with
an atomic add and the hypervisor to canonicalise both pointers with a 64-bit
compare-and-swap; plain Python stores would lose updates between processes. GCC's
libatomic (Debian package libatomic1, which gcc depends on) provides both as functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

from hvmport.errors import HostError

_SEQ_CST = 5


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise HostError(f"cannot load libatomic ({e}): install Debian package libatomic1") from e
    lib.__atomic_compare_exchange_8.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    lib.__atomic_compare_exchange_8.restype = ctypes.c_bool
    lib.__atomic_fetch_add_4.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
    lib.__atomic_fetch_add_4.restype = ctypes.c_uint32
    return lib


def _address(page: memoryview | bytearray | mmap.mmap, offset: int, width: int) -> int:
    if offset % width or offset < 0 or offset + width > len(page):
        raise ValueError(f"unaligned or out-of-range atomic at {offset}")
    return ctypes.addressof(ctypes.c_char.from_buffer(page, offset))


def cas64(page: memoryview | bytearray, offset: int, expected: int, new: int) -> bool:
    exp = ctypes.c_uint64(expected)
    return bool(_lib().__atomic_compare_exchange_8(
        _address(page, offset, 8), ctypes.byref(exp), new, _SEQ_CST, _SEQ_CST))


def add32(page: memoryview | bytearray, offset: int, delta: int) -> None:
    _lib().__atomic_fetch_add_4(_address(page, offset, 4), delta & 0xFFFFFFFF, _SEQ_CST)
