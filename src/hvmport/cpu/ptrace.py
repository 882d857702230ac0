"""ptrace(2), seccomp and process memory through ctypes: what the user-mode backend needs.

Only x86-64 Linux. Every call that fails raises ``OSError`` with the errno, so the
supervisor decides what a failure means (a tracee that vanished is not a host error).
"""

from __future__ import annotations

import ctypes
import os
import struct

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_SECCOMP = 7

#: si_code of a fault the CPU raised (#GP from IN/OUT at IOPL 0, #UD), not a kill().
SI_KERNEL = 0x80

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_TRACE = 0x7FF00000
AUDIT_ARCH_X86_64 = 0xC000003E
PROT_EXEC = 0x4
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_PKEY_MPROTECT = 329

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                        ctypes.c_ulong)

_REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
              "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
              "fs_base", "gs_base", "ds", "es", "fs", "gs")


class UserRegs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REG_NAMES]


def _check(rc: int) -> int:
    if rc == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return rc


def traceme() -> None:
    _check(_libc.ptrace(PTRACE_TRACEME, 0, None, None))


def setoptions(pid: int, options: int) -> None:
    _check(_libc.ptrace(PTRACE_SETOPTIONS, pid, None, ctypes.c_void_p(options)))


def cont(pid: int, sig: int = 0) -> None:
    _check(_libc.ptrace(PTRACE_CONT, pid, None, ctypes.c_void_p(sig)))


def syscall(pid: int, sig: int = 0) -> None:
    _check(_libc.ptrace(PTRACE_SYSCALL, pid, None, ctypes.c_void_p(sig)))


def geteventmsg(pid: int) -> int:
    msg = ctypes.c_ulong(0)
    _check(_libc.ptrace(PTRACE_GETEVENTMSG, pid, None, ctypes.byref(msg)))
    return msg.value


def getsiginfo(pid: int) -> tuple[int, int]:
    """(si_signo, si_code) of the signal the tracee is stopped for."""
    buf = ctypes.create_string_buffer(128)
    _check(_libc.ptrace(PTRACE_GETSIGINFO, pid, None, buf))
    signo, _errno, code = struct.unpack_from("<iii", buf.raw)
    return signo, code


def getregs(pid: int) -> UserRegs:
    regs = UserRegs()
    _check(_libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(regs)))
    return regs


def setregs(pid: int, regs: UserRegs) -> None:
    _check(_libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(regs)))


SYS_TGKILL = 234
_libc.syscall.restype = ctypes.c_long


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread (kill() would let any thread of the process take it)."""
    _check(_libc.syscall(ctypes.c_long(SYS_TGKILL), ctypes.c_long(tgid), ctypes.c_long(tid),
                         ctypes.c_long(sig)))


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0))


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


_LD_ABS_W = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06


def exec_mapping_filter() -> bytes:
    """A seccomp filter that stops the tracee (SECCOMP_RET_TRACE) at mmap, mprotect and
    pkey_mprotect asking for PROT_EXEC, and lets every other system call through: the
    supervisor learns of new executable code without tracing every system call."""
    prog = [
        _insn(_LD_ABS_W, 0, 0, 4),                      # 0: arch
        _insn(_JEQ_K, 0, 7, AUDIT_ARCH_X86_64),         # 1: other ABI -> allow (9)
        _insn(_LD_ABS_W, 0, 0, 0),                      # 2: nr
        _insn(_JEQ_K, 3, 0, SYS_MMAP),                  # 3: -> 7
        _insn(_JEQ_K, 2, 0, SYS_MPROTECT),              # 4: -> 7
        _insn(_JEQ_K, 1, 0, SYS_PKEY_MPROTECT),         # 5: -> 7
        _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),         # 6
        _insn(_LD_ABS_W, 0, 0, 16 + 8 * 2),             # 7: args[2] (prot), low word
        _insn(_JSET_K, 1, 0, PROT_EXEC),                # 8: exec -> 10
        _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),         # 9
        _insn(_RET_K, 0, 0, SECCOMP_RET_TRACE),         # 10
    ]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Filter:
    """A classic-BPF seccomp program, built before a fork so that the child, which may
    share the parent's locks in an unknown state, only makes the system call."""

    def __init__(self, program: bytes) -> None:
        self._buf = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.addressof(self._buf))

    def install(self) -> None:
        """Install it on the calling thread (and its descendants)."""
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._fprog),
                           0, 0))


def install_filter(program: bytes) -> None:
    Filter(program).install()


class ProcessMemory:
    """A tracee's memory through /proc/PID/mem: reads and writes that honour neither page
    protections nor copy-on-write sharing (a write to read-only code gets a private copy,
    which is how breakpoints are placed)."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def read(self, addr: int, length: int) -> bytes:
        data = os.pread(self.fd, length, addr)
        if len(data) != length:
            raise OSError(5, f"short read at {addr:#x}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        done = os.pwrite(self.fd, data, addr)
        if done != len(data):
            raise OSError(5, f"short write at {addr:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
