"""Ending Unicorn's slices cheaply and safely: a block hook in C, built with gcc on first use.

Full-CPU mode must return from ``emu_start`` regularly (to deliver interrupts) and promptly
when asked (a kick, a device model's interrupt line). Two ways that stock Unicorn offers are
unusable: ``emu_start(count=N)`` calls a hook on every instruction (a tight loop ran at 38
instead of 220 MIPS here), and ``uc_emu_stop`` from another thread (also what
``emu_start(timeout=...)`` does) can land inside an instruction and corrupts a kernel (the
spike's wall 4). A Python block hook would cost a microsecond per block.

So the hook is ten lines of C: at the start of every translation block it counts the block
down and looks at a stop flag that any thread may set; when either says so it calls
``uc_emu_stop`` itself, from the vCPU's own thread, before the block has touched memory,
which is the one kind of stop the backend already relies on (turn-taking in multi-vCPU
VMs). It records that it did, so a return from ``emu_start`` that it did not cause is known
to be the guest's HLT. The source is compiled with the system's gcc (which scripts/setup
installs) into the cache directory, keyed by its hash, as the test guests are.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from hvmport import toolchain
from hvmport.errors import HostError

SOURCE = r"""
#include <stdint.h>

struct hvmport_slice {
    int64_t left;               /* blocks left in this slice */
    int32_t stop;               /* set by any thread: end the slice at the next block */
    int32_t fired;              /* set here when this hook ended the slice */
    int (*emu_stop)(void *uc);  /* libunicorn's uc_emu_stop */
};

void hvmport_slice_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct hvmport_slice *s = user_data;
    (void)address;
    (void)size;
    if (--s->left <= 0 || __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
        if (!s->fired) {
            s->fired = 1;
            s->emu_stop(uc);
        }
    }
}
"""


class Slice(ctypes.Structure):
    _fields_ = (
        ("left", ctypes.c_int64),
        ("stop", ctypes.c_int32),
        ("fired", ctypes.c_int32),
        ("emu_stop", ctypes.c_void_p),
    )


_lock = threading.Lock()
_library: Any = None


def hook_address() -> int:
    """The address of ``hvmport_slice_hook`` (built and loaded once per process)."""
    global _library
    with _lock:
        if _library is None:
            _library = ctypes.CDLL(str(_build()))
        address = ctypes.cast(_library.hvmport_slice_hook, ctypes.c_void_p).value
    if not address:  # pragma: no cover - dlsym found the symbol
        raise HostError("the slice hook library has no hvmport_slice_hook")
    return int(address)


def emu_stop_address() -> int:
    """The address of libunicorn's ``uc_emu_stop``, for the hook to call."""
    from unicorn.unicorn_py3 import unicorn as binding

    lib = ctypes.CDLL(binding.uclib._name)  # the library the binding already loaded
    address = ctypes.cast(lib.uc_emu_stop, ctypes.c_void_p).value
    if not address:  # pragma: no cover - exported by every libunicorn 2
        raise HostError("libunicorn exports no uc_emu_stop")
    return int(address)


def _build() -> Path:
    key = hashlib.sha256(SOURCE.encode()).hexdigest()[:20]
    out = toolchain.cache_dir() / "native" / f"slice-{key}.so"
    if out.exists():
        return out
    toolchain.require_tools("gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvmport-cc-") as tmp:
        src = Path(tmp, "slice.c")
        src.write_text(SOURCE)
        lib = Path(tmp, "slice.so")
        proc = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise HostError(f"gcc failed to build the slice hook: {proc.stderr.strip()}")
        partial = out.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(lib.read_bytes())
        partial.replace(out)
    return out
