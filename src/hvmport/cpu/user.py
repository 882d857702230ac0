"""The user-mode CPU backend: an unmodified x86-64 Linux program under a ptrace supervisor.

The program runs natively. What a hypervisor would see of it arrives as signals:

* Port I/O (IN/OUT/INS/OUTS) at IOPL 0 raises #GP, i.e. SIGSEGV with ``SI_KERNEL``. The
  supervisor decodes the instruction at RIP (``portinsn``), hands the access to the same
  ``IoHandler`` KVM and Unicorn guests use (in-hypervisor backdoor, ioreq servers, null
  handler), applies the result to the registers and memory, and steps over it. With the
  domain's ``vmware_port_ring3`` policy off, the signal is delivered as on bare metal.
* CPUID never faults on these hosts (no CPUID faulting), so every CPUID instruction in the
  program's executable file mappings is replaced by UD2 when the mapping appears: at each
  exec, and at each mmap/mprotect asking for PROT_EXEC, which a seccomp filter stops at
  (SECCOMP_RET_TRACE) without tracing any other system call. The SIGILL of a replaced
  site is answered with the domain's CPUID leaves; a UD2 the program wrote itself (Xen's
  ``ud2; .ascii "xen"; cpuid`` probe) still reaches the program's own handler.
* Every other signal is delivered. Forks, vforks and clones are followed (a fork copies
  the set of replaced sites, a thread or vfork shares it); an exec starts afresh.

The program is one vCPU: its threads and processes take turns through one supervisor
thread, so the core sees one vCPU's accesses one at a time, as it requires. The run ends
with the first process's exit status (128 + N when signal N killed it).

The program's memory is not guest-physical memory a device model could map; string I/O
reaches the hypervisor as bytes, like every backend's, and the hypervisor stages it in
guest memory for a ``data_is_ptr`` request (see ``hv/emulate.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hvmport.core.vmport import apply_in
from hvmport.cpu import portinsn, ptrace
from hvmport.cpu.base import (
    Exit,
    ExitKind,
    IoHandler,
    PortAccess,
    Regs,
    StartState,
    VcpuStop,
    VmConfig,
)
from hvmport.cpu.cpuid_sites import CPUID, HostCpuid, file_sites
from hvmport.errors import ConfigError, HostError

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
UD2 = b"\x0f\x0b"
WALL = 0x40000000  # __WALL: clones too
WNOTHREAD = 0x20000000  # __WNOTHREAD: only this thread's children and tracees
#: A REP INS/OUTS is done in pieces of at most this many bytes (the program re-executes
#: the instruction for the rest, as after an interrupt); also the GuestRPC maximum.
MAX_STRING_BYTES = 65536
#: Leaves whose subleaf selects the answer.
_INDEXED = {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1F, 0x8000001D}
_HYPERVISOR_LEAVES = range(0x40000000, 0x50000000)
_EFLAGS_DF = 1 << 10
#: The reason of an Exit that is the program's own end (the CLI prints nothing more).
PROGRAM_END = "program "
OPTIONS = (ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACEFORK
           | ptrace.PTRACE_O_TRACEVFORK | ptrace.PTRACE_O_TRACECLONE
           | ptrace.PTRACE_O_TRACEEXEC | ptrace.PTRACE_O_TRACESECCOMP
           | ptrace.PTRACE_O_EXITKILL)


def probe_ptrace() -> str | None:
    """None if this process may trace a child, else why not (for skips and errors)."""
    try:
        pid = os.fork()
    except OSError as e:
        return f"fork failed: {e.strerror}"
    if pid == 0:  # pragma: no cover - child
        try:
            ptrace.traceme()
            os.kill(os.getpid(), signal.SIGSTOP)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, WALL)
    if os.WIFSTOPPED(status):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, WALL)
        return None
    return "PTRACE_TRACEME is not permitted here (seccomp, LSM or a container's policy)"


def is_program_end(reason: str) -> bool:
    return reason.startswith(PROGRAM_END)


def host_tsc_khz(cpuid: HostCpuid) -> int:
    """The TSC frequency: CPUID 0x15 where it is enumerated, else the base frequency of
    0x16, else what the kernel measured (/proc/cpuinfo's MHz)."""
    max_leaf = cpuid(0, 0)[0]
    if max_leaf >= 0x15:
        den, num, crystal, _ = cpuid(0x15, 0)
        if den and num and crystal:
            return crystal * num // den // 1000
    if max_leaf >= 0x16:
        base_mhz = cpuid(0x16, 0)[0] & 0xFFFF
        if base_mhz:
            return base_mhz * 1000
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 1_000_000


@dataclass(slots=True)
class _Space:
    """One address space: where its CPUID instructions were replaced."""

    patched: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Tracee:
    pid: int
    space: _Space
    #: Its process (thread group) id: the pid of the thread that made the process.
    tgid: int = 0
    #: Stopped at a seccomp event: the next syscall-stop is the mapping call's exit.
    awaiting_exit: bool = False
    #: A new child whose initial SIGSTOP is still to come.
    fresh: bool = False
    mem: ptrace.ProcessMemory | None = None

    def memory(self) -> ptrace.ProcessMemory:
        if self.mem is None:
            self.mem = ptrace.ProcessMemory(self.pid)
        return self.mem

    def drop_memory(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None


class _Fault(Exception):
    """The access cannot be completed; the program gets SIGSEGV as from the CPU."""


class UserBackend:
    name = "user"

    def __init__(self, argv: Sequence[str], *, ring3: bool = True,
                 env: Mapping[str, str] | None = None) -> None:
        if not argv:
            raise ConfigError("--backend user needs a program: hvmport run --backend user "
                              "-- PROGRAM [ARGS...]")
        program = argv[0]
        found = shutil.which(program, path=(env or os.environ).get("PATH")) \
            if "/" not in program else (program if os.access(program, os.X_OK) else None)
        if found is None:
            raise ConfigError(f"{program}: no such program (or not executable)")
        if shutil.which("objdump") is None:
            raise HostError("--backend user needs GNU objdump (binutils) to find the "
                            "program's CPUID instructions; scripts/setup installs it")
        self.argv = list(argv)
        self.executable = found
        self.ring3 = ring3
        self.env = dict(env) if env is not None else None

    def create_vm(self, config: VmConfig) -> UserVm:
        return UserVm(self, config)


class UserVm:
    backend_name = "user"

    def __init__(self, backend: UserBackend, config: VmConfig) -> None:
        if config.vcpus != 1:
            raise ConfigError("--backend user runs one program: it is one vCPU (--vcpus 1)")
        self.backend = backend
        self.config = config
        self.host_cpuid = HostCpuid()
        self._tsc_khz = host_tsc_khz(self.host_cpuid)
        self._vcpu: UserVcpu | None = None

    @property
    def tsc_khz(self) -> int:
        return self._tsc_khz

    def create_vcpu(self, vcpu_id: int, start: StartState) -> UserVcpu:
        if vcpu_id != 0 or self._vcpu is not None:
            raise ConfigError("--backend user has exactly one vCPU")
        self._vcpu = UserVcpu(self)
        return self._vcpu

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """The domain's answer: its table for the hypervisor range and any override, the
        host CPU for the rest, with the hypervisor bit as the domain says."""
        table = self.config.cpuid
        key = (leaf, subleaf if leaf in _INDEXED else 0)
        answer = table.get(key)
        if answer is None:
            # Only the table speaks for the hypervisor range (never the outer KVM's).
            answer = ((0, 0, 0, 0) if leaf in _HYPERVISOR_LEAVES
                      else self.host_cpuid(leaf, subleaf))
        if leaf == 1:
            eax, ebx, ecx, edx = answer
            ecx = ecx | (1 << 31) if self.config.hypervisor_bit else ecx & ~(1 << 31)
            answer = (eax, ebx, ecx & MASK32, edx)
        return answer

    def close(self) -> None:
        if self._vcpu is not None:
            self._vcpu.close()


class _Context:
    """The VcpuContext of one stopped tracee."""

    def __init__(self, regs: ptrace.UserRegs) -> None:
        self.raw = regs

    @property
    def vcpu_id(self) -> int:
        return 0

    def get_regs(self) -> Regs:
        r = self.raw
        return Regs(r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9,
                    r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rip, r.eflags)

    def set_regs(self, regs: Regs) -> None:
        r = self.raw
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
         r.r12, r.r13, r.r14, r.r15, r.rip) = (
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            regs.rip)
        # Only the arithmetic and direction flags are the program's to change here.
        r.eflags = (r.eflags & ~0xCD5) | (regs.rflags & 0xCD5)

    def cpl(self) -> int:
        return 3


class UserVcpu:
    def __init__(self, vm: UserVm) -> None:
        self.vm = vm
        self.leader = 0
        self.tracees: dict[int, _Tracee] = {}
        #: New children that stopped before their parent's fork event named them.
        self._early: set[int] = set()
        #: Stopped tracees left stopped by a kick, resumed by the next run().
        self._parked: list[tuple[int, int]] = []
        self._kicked = threading.Event()
        #: Threads sent a SIGSTOP by kick(): their stop is ours, never the program's.
        self._kick_sent: set[int] = set()
        self._lock = threading.Lock()
        self._ended: Exit | None = None
        #: How many port accesses and CPUID instructions were emulated (for tests).
        self.port_exits = 0
        self.cpuid_exits = 0

    @property
    def vcpu_id(self) -> int:
        return 0

    # ------------------------------------------------------------------ start

    def _start(self) -> None:
        backend = self.vm.backend
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        seccomp = ptrace.Filter(ptrace.exec_mapping_filter())
        env = backend.env if backend.env is not None else dict(os.environ)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, until exec
            try:
                os.close(read_end)
                ptrace.traceme()
                os.kill(os.getpid(), signal.SIGSTOP)
                if os.geteuid() != 0:
                    ptrace.set_no_new_privs()
                seccomp.install()
                os.execve(backend.executable, backend.argv, env)
            except BaseException as e:
                try:
                    os.write(write_end, f"{type(e).__name__}: {e}".encode())
                finally:
                    os._exit(127)
        os.close(write_end)
        try:
            _, status = os.waitpid(pid, WALL | WNOTHREAD)
            if not os.WIFSTOPPED(status):
                why = os.read(read_end, 4096).decode(errors="replace")
                raise HostError(f"cannot supervise {backend.argv[0]}: {why or 'child died'}"
                                + ("; ptrace is not permitted here" if "ptrace" in why
                                   or "Operation not permitted" in why else ""))
            ptrace.setoptions(pid, OPTIONS)
            ptrace.cont(pid, 0)
            self._exec_error = read_end
        except BaseException:
            os.close(read_end)
            with_kill(pid)
            raise
        self.leader = pid
        self.tracees[pid] = _Tracee(pid, _Space(), tgid=pid)

    # ------------------------------------------------------------------ running

    def run(self, handler: IoHandler) -> Exit:
        if self._ended is not None:
            return self._ended
        if not self.leader:
            self._start()
        parked, self._parked = self._parked, []
        for pid, sig in parked:
            self._resume(pid, sig)
        while True:
            if self._kicked.is_set():
                self._kicked.clear()
                return Exit(ExitKind.KICKED)
            try:
                pid, status = os.waitpid(-1, WALL | WNOTHREAD)
            except ChildProcessError:
                self._ended = Exit(ExitKind.ERROR, "lost track of the program's processes")
                return self._ended
            ended = self._event(handler, pid, status)
            if ended is not None:
                self._ended = ended
                return ended

    def _event(self, handler: IoHandler, pid: int, status: int) -> Exit | None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            t = self.tracees.pop(pid, None)
            if t is not None:
                t.drop_memory()
            self._early.discard(pid)
            if pid == self.leader:
                return self._leader_end(status)
            return None
        if not os.WIFSTOPPED(status):
            return None
        sig = os.WSTOPSIG(status)
        event = status >> 16
        t = self.tracees.get(pid)
        if t is None:
            # A new child's first stop, before its parent's event: wait for the event.
            self._early.add(pid)
            return None
        try:
            if sig == signal.SIGTRAP and event:
                self._ptrace_event(t, event)
                return None
            if sig == (signal.SIGTRAP | 0x80):
                self._syscall_stop(t)
                return None
            if t.fresh and sig == signal.SIGSTOP:
                t.fresh = False
                self._resume(pid, 0)
                return None
            return self._signal(handler, t, sig)
        except ProcessLookupError:
            return None  # it died under us; its exit event comes next

    def _leader_end(self, status: int) -> Exit:
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            if code == 127 and self._exec_error >= 0:
                why = os.read(self._exec_error, 4096).decode(errors="replace")
                if why:
                    return Exit(ExitKind.ERROR, f"cannot run {self.vm.backend.argv[0]}: {why}")
            return Exit(ExitKind.STOPPED, f"{PROGRAM_END}exited with status {code}", code)
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        return Exit(ExitKind.STOPPED, f"{PROGRAM_END}killed by {name}", 128 + sig)

    def _ptrace_event(self, t: _Tracee, event: int) -> None:
        if event in (ptrace.PTRACE_EVENT_FORK, ptrace.PTRACE_EVENT_VFORK,
                     ptrace.PTRACE_EVENT_CLONE):
            child = ptrace.geteventmsg(t.pid)
            space = _Space(set(t.space.patched)) if event == ptrace.PTRACE_EVENT_FORK \
                else t.space
            # Clones are taken for threads (pthread_create); forks make processes.
            tgid = t.tgid if event == ptrace.PTRACE_EVENT_CLONE else child
            new = _Tracee(child, space, tgid=tgid, fresh=True)
            self.tracees[child] = new
            if child in self._early:
                self._early.discard(child)
                new.fresh = False
                self._resume(child, 0)
        elif event == ptrace.PTRACE_EVENT_EXEC:
            former = ptrace.geteventmsg(t.pid)
            if former != t.pid:
                old = self.tracees.pop(former, None)
                if old is not None:
                    old.drop_memory()
            t.tgid = t.pid  # the exec left one thread, the process's leader
            if self._exec_error >= 0:
                os.close(self._exec_error)
                self._exec_error = -1
            t.space = _Space()
            t.drop_memory()
            self._patch(t, 0, MASK64)
        elif event == ptrace.PTRACE_EVENT_SECCOMP:
            t.awaiting_exit = True
            ptrace.syscall(t.pid, 0)
            return
        self._resume(t.pid, 0)

    def _syscall_stop(self, t: _Tracee) -> None:
        if t.awaiting_exit:
            t.awaiting_exit = False
            regs = ptrace.getregs(t.pid)
            start = regs.rax if regs.orig_rax == ptrace.SYS_MMAP else regs.rdi
            if start < (1 << 63):  # not an error return
                self._patch(t, start, start + regs.rsi)
        self._resume(t.pid, 0)

    def _patch(self, t: _Tracee, lo: int, hi: int) -> None:
        """Replace the CPUID instructions of executable file mappings within [lo, hi)."""
        try:
            with open(f"/proc/{t.pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        mem = t.memory()
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if end <= lo or start >= hi:
                continue
            offset = int(parts[2], 16)
            for site in file_sites(parts[5]):
                addr = start + site - offset
                if start <= addr and addr + 2 <= end and lo <= addr < hi:
                    try:
                        if mem.read(addr, 2) == CPUID:
                            mem.write(addr, UD2)
                            t.space.patched.add(addr)
                    except OSError:
                        continue

    def _signal(self, handler: IoHandler, t: _Tracee, sig: int) -> Exit | None:
        pid = t.pid
        if sig == signal.SIGSTOP and pid in self._kick_sent:
            self._kick_sent.discard(pid)
            self._resume(pid, 0)  # parked while the kick lasts
            return None
        if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            try:
                ptrace.getsiginfo(pid)
            except OSError as e:
                if e.errno == errno.EINVAL:  # a group-stop, not a signal to deliver
                    self._resume(pid, 0)
                    return None
                raise
        if sig == signal.SIGILL:
            regs = ptrace.getregs(pid)
            if regs.rip in t.space.patched:
                self._cpuid(pid, regs)
                self._resume(pid, 0)
                return None
        elif sig == signal.SIGSEGV and self.vm.backend.ring3:
            _, code = ptrace.getsiginfo(pid)
            if code == ptrace.SI_KERNEL:
                try:
                    done = self._port_io(handler, t)
                except VcpuStop as stop:
                    self._parked.append((pid, 0))
                    return Exit(ExitKind.STOPPED, stop.reason, stop.status)
                except _Fault:
                    done = False
                if done:
                    self._resume(pid, 0)
                    return None
        self._resume(pid, sig)
        return None

    def _cpuid(self, pid: int, regs: ptrace.UserRegs) -> None:
        self.cpuid_exits += 1
        a, b, c, d = self.vm.cpuid(regs.rax & MASK32, regs.rcx & MASK32)
        regs.rax, regs.rbx, regs.rcx, regs.rdx = a & MASK32, b & MASK32, c & MASK32, d & MASK32
        regs.rip = (regs.rip + 2) & MASK64
        ptrace.setregs(pid, regs)

    def _port_io(self, handler: IoHandler, t: _Tracee) -> bool:
        """Emulate the port instruction at RIP; False if it is not one."""
        regs = ptrace.getregs(t.pid)
        mem = t.memory()
        code = b""
        for length in (16, 8, 2, 1):
            try:
                code = mem.read(regs.rip, length)
                break
            except OSError:
                continue
        insn = portinsn.decode(code)
        if insn is None:
            return False
        self.port_exits += 1
        port = insn.imm_port if insn.imm_port is not None else regs.rdx & 0xFFFF
        ctx = _Context(regs)
        size = insn.size
        if not insn.string:
            data = (regs.rax & ((1 << (8 * size)) - 1)).to_bytes(size, "little") \
                if insn.is_write else b""
            result = handler.port_io(ctx, PortAccess(port, size, insn.is_write, 1, False, data))
            regs = ctx.raw
            if not insn.is_write and result is not None:
                regs.rax = apply_in(regs.rax, int.from_bytes(result[:size], "little"), size)
            regs.rip = (regs.rip + insn.length) & MASK64
            ptrace.setregs(t.pid, regs)
            return True
        amask = MASK32 if insn.addr32 else MASK64
        total = (regs.rcx & amask) if insn.rep else 1
        if total == 0:
            regs.rip = (regs.rip + insn.length) & MASK64
            ptrace.setregs(t.pid, regs)
            return True
        count = min(total, MAX_STRING_BYTES // size)
        down = bool(regs.eflags & _EFLAGS_DF)
        if insn.is_write:
            base = {"fs": regs.fs_base, "gs": regs.gs_base}.get(insn.segment, 0)
            data = self._read_elements(mem, (base + (regs.rsi & amask)) & MASK64, size, count,
                                       down)
            handler.port_io(ctx, PortAccess(port, size, True, count, True, data))
            regs = ctx.raw
            regs.rsi = _step(regs.rsi, size * count, down, amask)
        else:
            result = handler.port_io(ctx, PortAccess(port, size, False, count, True))
            regs = ctx.raw
            if result is None or len(result) != size * count:
                raise _Fault()
            self._write_elements(mem, regs.rdi & amask, size, result, down)
            regs.rdi = _step(regs.rdi, size * count, down, amask)
        if insn.rep:
            left = total - count
            regs.rcx = (regs.rcx & ~amask & MASK64) | left
        if not insn.rep or total == count:
            regs.rip = (regs.rip + insn.length) & MASK64
        ptrace.setregs(t.pid, regs)
        return True

    @staticmethod
    def _read_elements(mem: ptrace.ProcessMemory, addr: int, size: int, count: int,
                       down: bool) -> bytes:
        """The elements OUTS sends, in the order it sends them."""
        span = size * count
        try:
            if not down:
                return mem.read(addr, span)
            raw = mem.read(addr - span + size, span)
        except OSError:
            raise _Fault() from None
        return b"".join(raw[i:i + size] for i in range(span - size, -1, -size))

    @staticmethod
    def _write_elements(mem: ptrace.ProcessMemory, addr: int, size: int, data: bytes,
                        down: bool) -> None:
        span = len(data)
        if down:
            data = b"".join(data[i:i + size] for i in range(span - size, -1, -size))
            addr = addr - span + size
        try:
            mem.write(addr, data)
        except OSError:
            raise _Fault() from None

    def _resume(self, pid: int, sig: int) -> None:
        if self._kicked.is_set():
            self._parked.append((pid, sig))
            return
        with contextlib.suppress(ProcessLookupError):  # its exit event follows
            ptrace.cont(pid, sig)

    # ------------------------------------------------------------------ other threads

    def kick(self) -> None:
        """Stop every thread of the program (a paused domain runs nothing) and so wake the
        supervisor's waitpid; run() returns KICKED and the stops stay parked until the next
        run()."""
        with self._lock:
            self._kicked.set()
            for t in list(self.tracees.values()):
                self._kick_sent.add(t.pid)
                try:
                    ptrace.tgkill(t.tgid or t.pid, t.pid, signal.SIGSTOP)
                except OSError:
                    self._kick_sent.discard(t.pid)

    def close(self) -> None:
        with self._lock:
            tracees = list(self.tracees.values())
            self.tracees.clear()
        for t in tracees:
            with_kill(t.pid)
            t.drop_memory()
        if self.leader:
            with contextlib.suppress(ChildProcessError):  # already reaped by run()
                os.waitpid(self.leader, WALL)
            self.leader = 0
        if getattr(self, "_exec_error", -1) >= 0:
            os.close(self._exec_error)
            self._exec_error = -1

    _exec_error = -1


def _step(reg: int, span: int, down: bool, amask: int) -> int:
    moved = (reg - span) if down else (reg + span)
    return (reg & ~amask & MASK64) | (moved & amask)


def with_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
