"""Running one domain in this process: memory, loader, backend, vCPU threads, the end.

The run ends when a vCPU writes isa-debug-exit, when every running vCPU has halted with
interrupts off, on a triple fault or backend error, when the domain crashes, or at the
timeout. It always ends with a status and a one-line reason; nothing the guest does makes
it raise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hvmport import atomic
from hvmport.core.clock import Clock
from hvmport.core.cpuid import hypervisor_leaves
from hvmport.core.domain import Crash, Domain
from hvmport.cpu.base import (
    Backend,
    Exit,
    ExitKind,
    Mode,
    Regs,
    StartState,
    Vcpu,
    Vm,
    VmConfig,
)
from hvmport.cpu.select import select_backend
from hvmport.errors import ConfigError
from hvmport.hv import emulate
from hvmport.hv.control import ControlServer
from hvmport.hv.evtchn import Channel
from hvmport.hv.launch import DeviceModelProcess
from hvmport.hv.lifecycle import Ending, EndRequest, Lifecycle
from hvmport.hv.memory import GuestMemory, check_memory_mib
from hvmport.hv.platform import Platform
from hvmport.hv.shmem import MemfdPages
from hvmport.hv.tracing import RunTrace
from hvmport.hv.wait import DeviceModelWaiter

MAX_VCPUS = 128
#: The toolstack destroyed the domain (even, like the other statuses of a run).
STATUS_DESTROYED = 10


class SystemClock:
    """The real clock, for the in-hypervisor GETTIME commands."""

    def wallclock_us(self) -> int:
        return time.time_ns() // 1000

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


@dataclass(slots=True)
class Image:
    """What to load: a Multiboot ELF, a Linux bzImage or vmlinux (with an optional
    initrd), or a flat binary at an address in a mode."""

    path: Path
    flat_mode: Mode | None = None
    load_addr: int = 0x100000
    cmdline: str = ""
    #: A Linux initrd, or for a Multiboot kernel its one module (xl.cfg's ``ramdisk``).
    ramdisk: Path | None = None


@dataclass(slots=True)
class RunConfig:
    image: Image
    backend: str = "auto"
    memory_mib: int = 64
    vcpus: int = 1
    vmware_port: bool = True
    vmware_hwver: int = 7
    smp_entry: bool = False
    timeout: float | None = None
    console: emulate.ConsoleSink | None = None
    domid: int = 1
    #: Start the device-model process (it serves the VMware port, i8042 and the UART).
    device_model: bool = True
    #: Extra arguments for each device model; one list per process (a second one gets
    #: its own ioreq server, e.g. with --disable-vmport).
    dm_args: list[list[str]] = field(default_factory=lambda: [[]])
    #: How long a vCPU spins on its slot before blocking, and how long it waits at most.
    spin_us: float = 100.0
    dm_timeout: float = 10.0
    #: The program to start as the primary device model instead of hvmport's own.
    dm_program: list[str] | None = None
    #: Where one-line notes go as they happen (which backend was picked, ...).
    note: Callable[[str], None] = field(default=lambda text: None)
    #: Pause, unpause, shutdown and destroy from other threads; also starts it paused.
    lifecycle: Lifecycle | None = None
    #: Where the control socket goes (default: a private temporary directory).
    control_path: str | None = None
    #: Descriptors every device model inherits (named in its arguments, e.g. --serial fd:N).
    dm_pass_fds: tuple[int, ...] = ()
    #: Called with the device models' pids once they are ready.
    on_started: Callable[[list[int]], None] = field(default=lambda pids: None)
    #: Record trace events (docs/tracing.md) of this process and of hvmport's own device
    #: models into this file.
    trace: str | None = None
    #: ``--backend user``: the program (and its arguments) to run under the ptrace
    #: supervisor instead of loading ``image``.
    program: list[str] | None = None
    #: What GETVERSION answers (EAX, ECX), in the hypervisor and the device model.
    vmware_version: int = 6
    vmware_vmx_type: int = 2
    #: The per-domain ring-3 policy of the user backend: its port I/O reaches the
    #: backdoor (on) or is a SIGSEGV as on bare metal (off).
    vmware_port_ring3: bool = True
    #: Unicorn as a full PC CPU (interrupts, exceptions through the guest's IDT, SYSCALL;
    #: hvmport.cpu.uc_fullcpu). None: on for Linux kernels, off for other guests, whose
    #: exceptions then end the run. KVM is always a full CPU.
    full_cpu: bool | None = None


@dataclass(slots=True)
class RunResult:
    status: int
    reason: str
    backend: str
    ending: Ending = Ending.POWEROFF
    #: (route, backdoor command or None) -> accesses: which backdoor calls the hypervisor
    #: answered ("internal") and which went to a device model ("server").
    routes: dict[tuple[str, int | None], int] = field(default_factory=dict)


def validate(config: RunConfig) -> None:
    check_memory_mib(config.memory_mib)
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ConfigError(f"vcpus={config.vcpus}: must be 1..{MAX_VCPUS}")
    if config.vmware_hwver < 0 or config.vmware_hwver > 0xFFFFFFFF:
        raise ConfigError(f"vmware_hwver={config.vmware_hwver} is out of range")
    for name in ("vmware_version", "vmware_vmx_type"):
        if not 0 <= getattr(config, name) <= 0xFFFFFFFF:
            raise ConfigError(f"{name}={getattr(config, name)} is out of range")
    if config.timeout is not None and config.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    if config.program is not None:
        if config.backend != "user":
            raise ConfigError("a program to run needs --backend user")
        if config.vcpus != 1 or config.smp_entry:
            raise ConfigError("--backend user runs one program as one vCPU")
        return
    if config.backend == "user":
        raise ConfigError("--backend user needs a program: hvmport run --backend user "
                          "-- PROGRAM [ARGS...]")
    if config.smp_entry and config.image.flat_mode is None:
        raise ConfigError("--smp-entry needs a flat binary (--mode 16|32|64)")
    if not config.image.path.is_file():
        raise ConfigError(f"{config.image.path}: no such file")
    if config.image.ramdisk is not None and config.image.flat_mode is not None:
        raise ConfigError("a ramdisk needs a Linux or Multiboot kernel, not a flat binary")


def _why_not_kvm_for_linux() -> str:
    """Why ``auto`` does not take KVM for a Linux kernel (it takes KVM for everything else)."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return ("this KVM is PVM-based (kvm_pvm), which cannot run a stock Linux kernel; "
                "hvmport's PC platform for Linux runs on Unicorn")
    return "hvmport's PC platform for Linux kernels (PIT, RTC, full-CPU mode) runs on Unicorn"


def _is_linux(image: Image) -> bool:
    from hvmport.hv import linuxboot

    if image.flat_mode is not None:
        return False
    with image.path.open("rb") as f:
        return linuxboot.is_linux_image(f.read(0x300))


def _load(config: RunConfig, memory: GuestMemory, linux: bool) -> StartState:
    from hvmport.hv import loader

    image = config.image
    if image.flat_mode is None:
        from hvmport.hv import linuxboot

        if linux:
            return linuxboot.load_linux(image.path, memory, image.cmdline, image.ramdisk)
        return loader.load_multiboot(image.path, memory, image.cmdline, image.ramdisk)
    if image.ramdisk is not None:
        raise ConfigError("a ramdisk needs a Linux or Multiboot kernel, not a flat binary")
    data = image.path.read_bytes()
    return loader.load_flat(data, memory, image.load_addr, image.flat_mode)


@contextlib.contextmanager
def _run_dir() -> Iterator[str]:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = tempfile.mkdtemp(prefix="hvmport-run-", dir=base if os.path.isdir(base) else None)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(config: RunConfig, clock: Clock | None = None) -> RunResult:
    validate(config)
    # What the image is decides the backend (auto), the loader and Unicorn's mode: look once.
    linux = config.program is None and _is_linux(config.image)
    if config.program is not None:
        from hvmport.cpu.user import UserBackend

        backend: Backend = UserBackend(config.program, ring3=config.vmware_port_ring3)
        picked = "user (the program runs natively under a ptrace supervisor)"
    elif config.backend == "auto" and linux:
        backend, _ = select_backend("unicorn")
        picked = f"unicorn (auto: {_why_not_kvm_for_linux()})"
    else:
        backend, picked = select_backend(config.backend)
    config.note(f"backend: {picked}")
    from hvmport.hv import loader

    events: queue.Queue[Event] = queue.Queue()
    lifecycle = config.lifecycle or Lifecycle()
    staging = emulate.STAGING_BYTES * config.vcpus
    with GuestMemory(config.memory_mib, staging=staging) as memory, \
            _run_dir() as rundir, contextlib.ExitStack() as stack:
        tracing = (RunTrace.start(config.trace, config.domid, rundir, config.note)
                   if config.trace else None)
        if tracing is not None:
            # Registered first, so it runs last: once every device model has ended.
            stack.callback(tracing.finish)
        start = (StartState(Mode.LONG64, Regs()) if config.program is not None
                 else _load(config, memory, linux))
        cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        # Without an in-kernel irqchip the hypervisor is the PC platform (PIC, PIT, RTC,
        # reset control); a reset through 0xcf9 ends the run as a reboot.
        platform = Platform(lambda reason, who: lifecycle.shutdown(reason, who))
        full_cpu = config.full_cpu if config.full_cpu is not None else linux
        if full_cpu and backend.name == "unicorn" and config.vcpus > 1:
            # Interrupts go to whichever vCPU looks first; a PC needs an APIC to route them.
            raise ConfigError(f"vcpus={config.vcpus}: Unicorn's full-CPU mode (Linux "
                              "kernels, --full-cpu) runs one vCPU")
        vm = backend.create_vm(VmConfig(
            memory, config.vcpus, cpuid, hypervisor_bit=True,
            interrupts=platform if full_cpu and backend.name == "unicorn" else None))
        stack.callback(vm.close)
        tsc_khz = vm.tsc_khz
        # The leaves need the TSC frequency, which only the VM knows; vCPUs created below
        # read the table then.
        cpuid.update(hypervisor_leaves(config.vmware_hwver, tsc_khz))
        pages = MemfdPages()
        stack.callback(pages.close)
        domain = Domain(config.domid, config.vcpus, pages, clock or SystemClock(),
                        vmware_port=config.vmware_port, vmware_hwver=config.vmware_hwver,
                        tsc_khz=tsc_khz, cas64=atomic.cas64)
        lock = threading.Lock()
        channels: dict[int, Channel] = {}
        stack.callback(_close_channels, channels)
        waiter = DeviceModelWaiter(domain, lock, channels, spin_us=config.spin_us,
                                   deadline_s=config.dm_timeout)
        dms: list[DeviceModelProcess] = []

        def crashed(crash: Crash) -> None:
            waiter.wake_all()
            events.put((-1, Exit(ExitKind.STOPPED, f"domain crashed: {crash.reason}",
                                 emulate.STATUS_DOMAIN_CRASHED)))

        domain.platform = dataclasses.replace(domain.platform, version=config.vmware_version,
                                              vmx_type=config.vmware_vmx_type)
        domain.on_crash = crashed
        stack.callback(setattr, domain, "on_crash", None)  # no cycle outliving the run
        # Interrupt lines go to the in-kernel irqchip where the backend has one, else to
        # the hypervisor's own PIC model.
        kernel_irq = _irq_sink(vm)
        emulator = emulate.Emulator(domain, config.console, waiter, domain_lock=lock,
                                    platform=None if kernel_irq else platform,
                                    tracer=tracing.tracer if tracing is not None else None,
                                    staging=emulate.Staging(memory))
        irq_sink = kernel_irq or emulator.set_irq
        if config.device_model:
            control = ControlServer(config.control_path or os.path.join(rundir, "control"),
                                    domain, lock, memory, pages, channels, irq=irq_sink,
                                    describe_peer=lambda pid: _describe(dms, pid),
                                    lifecycle=lifecycle)
            control.start()
            stack.callback(_stop_all, dms)
            stack.callback(control.close)
            for i, args in enumerate(config.dm_args):
                program = config.dm_program if i == 0 else None
                if tracing is not None and program is None:
                    args = [*args, "--trace", tracing.part(i)]
                dms.append(DeviceModelProcess(control.path, config.domid, args,
                                              program=program, pass_fds=config.dm_pass_fds))
            config.on_started([dm.pid for dm in dms])
        runnable = range(config.vcpus) if config.smp_entry else range(1)
        vcpus = [vm.create_vcpu(i, loader.for_vcpu(start, i, config.vcpus) if config.smp_entry
                                    else start)
                 for i in range(config.vcpus)]
        for v in vcpus:
            stack.callback(v.close)
        status, reason, ending = _drive([vcpus[i] for i in runnable], emulator,
                                        config.timeout, events, lifecycle)
    return RunResult(status, reason, backend.name, ending, dict(emulator.routes))


def _irq_sink(vm: Vm) -> Callable[[int, int], None] | None:
    if not getattr(vm, "irqchip", False):
        return None
    sink: Callable[[int, int], None] | None = getattr(vm, "set_irq_line", None)
    return sink


def _close_channels(channels: dict[int, Channel]) -> None:
    for chan in channels.values():
        chan.close()


def _stop_all(dms: list[DeviceModelProcess]) -> None:
    for dm in dms:
        dm.stop()


def _describe(dms: list[DeviceModelProcess], pid: int) -> str:
    for dm in dms:
        if dm.pid == pid:
            return dm.describe_exit()
    return f"device model (pid {pid})"


Event = tuple[int, Exit | BaseException | EndRequest]


def _drive(vcpus: list[Vcpu], emulator: emulate.Emulator, timeout: float | None,
           exits: queue.Queue[Event], lifecycle: Lifecycle) -> tuple[int, str, Ending]:

    def body(v: Vcpu) -> None:
        try:
            while lifecycle.wait_while_paused():
                ex = v.run(emulator)
                # Only a pause or the end of the run kicks a vCPU; a pause parks it above.
                if ex.kind is not ExitKind.KICKED:
                    exits.put((v.vcpu_id, ex))
                    return
        except BaseException as e:  # a host bug: report it, never hang the run
            exits.put((v.vcpu_id, e))

    def kick_all() -> None:
        for v in vcpus:
            v.kick()

    threads = [threading.Thread(target=body, args=(v,), name=f"vcpu{v.vcpu_id}", daemon=True)
               for v in vcpus]
    # Attached before the vCPUs start: the previous run (a restart) left it "ending".
    lifecycle.attach(kick_all, lambda request: exits.put((-1, request)))
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    halted = 0
    outcome: tuple[int, str, Ending] | None = None
    error: BaseException | None = None
    while outcome is None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            vcpu_id, ex = exits.get(timeout=wait)
        except queue.Empty:
            outcome = (emulate.STATUS_TIMEOUT, f"timeout after {timeout:g} s", Ending.TIMEOUT)
            break
        if isinstance(ex, EndRequest):
            outcome = (_END_STATUS[ex.ending], ex.reason, ex.ending)
        elif isinstance(ex, BaseException):
            error = ex
            outcome = (emulate.STATUS_HOST_ERROR, f"vCPU {vcpu_id}: host error: {ex!r}",
                       Ending.HOST_ERROR)
        elif ex.kind is ExitKind.HALTED:
            halted += 1
            if halted == len(vcpus):
                outcome = (emulate.STATUS_HALTED, ex.reason or "guest halted", Ending.POWEROFF)
        else:
            outcome = _classify(vcpu_id, ex)
    lifecycle.finishing()
    kick_all()
    for t in threads:
        t.join(timeout=10)
    lifecycle.detach()
    if error is not None:
        raise error
    return outcome


_END_STATUS = {
    Ending.POWEROFF: emulate.STATUS_HALTED,
    Ending.REBOOT: emulate.STATUS_HALTED,
    Ending.CRASH: emulate.STATUS_DOMAIN_CRASHED,
    Ending.DESTROY: STATUS_DESTROYED,
    Ending.TIMEOUT: emulate.STATUS_TIMEOUT,
    Ending.HOST_ERROR: emulate.STATUS_HOST_ERROR,
}


def _classify(vcpu_id: int, ex: Exit) -> tuple[int, str, Ending]:
    if ex.kind is ExitKind.STOPPED:
        # isa-debug-exit (odd statuses) is the test guests' power switch.
        ending = Ending.POWEROFF if ex.status & 1 or ex.status == 0 else Ending.CRASH
        if ex.status == emulate.STATUS_TIMEOUT:
            ending = Ending.TIMEOUT
        return ex.status, ex.reason or f"stopped with status {ex.status}", ending
    if ex.kind is ExitKind.SHUTDOWN:
        return (emulate.STATUS_GUEST_FAULT, f"vCPU {vcpu_id}: {ex.reason or 'triple fault'}",
                Ending.CRASH)
    return (emulate.STATUS_GUEST_FAULT, f"vCPU {vcpu_id}: {ex.reason or 'backend error'}",
            Ending.CRASH)
