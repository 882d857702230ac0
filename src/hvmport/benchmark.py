"""`hvmport bench`: the cost of a backdoor call, side by side in one run.

Every scenario runs the same guest bytes: a flat image with a Multiboot (a.out kludge)
header, so hvmport, QEMU and the C floor all boot it. The guest repeats R + 1 times: print
"[" on the debug console, loop N times over one backdoor IN, print "]"; then it writes
isa-debug-exit. The benchmark reads the console through a pipe and times each pair of
markers as they arrive, so start-up and shutdown do not count; cost per call is that time
/ N. The first repetition warms up (first exits, Unicorn's translations, the device model's
first request) and is dropped; each figure is the median of the other R, with min and max.
One process per scenario, so a quick run stays under a minute; only the four device-model
transports on KVM, which are compared with each other, take turns over two or three runs
each. Ratios are taken between medians of the same run. (The Unicorn floor runs in this
process and timestamps the markers in its OUT hook.)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvmport.toolchain import assemble_flat, cache_dir, require_tools

LOAD = 0x100000
GETVERSION = 10
STATUS = 40  # vmmouse ABSPOINTER_STATUS: answered by the device model
#: The register transports of issue 6, each a dm_kvm_<name> scenario.
TRANSPORTS = ("regs-page", "ioreq-union", "gpr64", "three-exchange")
FLOOR_SOURCE = Path(__file__).resolve().parents[2] / "bench" / "floor.c"

LOOP = """
    jmp entry
    .balign 4
mb_header:
    .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    .long mb_header, _start, 0, 0, entry
entry:
    mov $0x10000, %esp
    mov ${reps}, %ebp
3:  mov ${n}, %edi
    mov $0x5b, %al
    out %al, $0xe9
    test %edi, %edi
    jz 2f
1:  mov $0x564d5868, %eax
    mov ${cmd}, %ecx
    mov $0x5658, %dx
    in %dx, %eax
    dec %edi
    jnz 1b
2:  mov $0x5d, %al
    out %al, $0xe9
    dec %ebp
    jnz 3b
    mov $0, %al
    out %al, $0xf4
    cli
    hlt
"""


def loop_image(iterations: int, cmd: int, reps: int = 1) -> bytes:
    """The guest: ``reps`` times "[", ``iterations`` backdoor INs, "]"."""
    if reps < 1:
        raise ValueError("at least one repetition")
    return assemble_flat(LOOP.format(n=iterations, cmd=cmd, reps=reps), 32, LOAD)


def loop_image_entry(image: bytes) -> int:
    header = image.find((0x1BADB002).to_bytes(4, "little"))
    return int.from_bytes(image[header + 28:header + 32], "little")


@dataclass
class Figure:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_json(self, key: str = "us_per_call") -> dict[str, float]:
        return {key: round(self.median, 3), "min": round(min(self.samples), 3),
                "max": round(max(self.samples), 3)}


@dataclass
class Results:
    scenarios: dict[str, Figure] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    writes_per_s: Figure | None = None
    #: Seconds to the Linux guest's shell (bench_linux), by scenario.
    boots: dict[str, Figure] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        pairs = {
            "hv_kvm/floor_c": ("hv_kvm", "floor_c"),
            "dm_kvm_regs-page/qemu_kvm": ("dm_kvm_regs-page", "qemu_kvm"),
            "dm_kvm_three-exchange/dm_kvm_regs-page": ("dm_kvm_three-exchange",
                                                       "dm_kvm_regs-page"),
            "dm_unicorn/floor_unicorn": ("dm_unicorn", "floor_unicorn"),
            "hv_kvm_traced/hv_kvm": ("hv_kvm_traced", "hv_kvm"),
            "dm_kvm_traced/dm_kvm_regs-page": ("dm_kvm_traced", "dm_kvm_regs-page"),
        }
        out = {}
        for name, (a, b) in pairs.items():
            if a in self.scenarios and b in self.scenarios and self.scenarios[b].median > 0:
                out[name] = round(self.scenarios[a].median / self.scenarios[b].median, 3)
        a, b = "linux_boot_unicorn", "qemu_tcg_linux_boot"
        if a in self.boots and b in self.boots and self.boots[b].median > 0:
            out[f"{a}/{b}"] = round(self.boots[a].median / self.boots[b].median, 3)
        return out

    def as_json(self) -> dict[str, object]:
        scen: dict[str, object] = {k: v.as_json() for k, v in self.scenarios.items()}
        if self.writes_per_s is not None:
            scen["bufioreq_writes"] = self.writes_per_s.as_json("writes_per_s")
        for name, fig in self.boots.items():
            scen[name] = fig.as_json("seconds")
        return {"scenarios": scen, "ratios": self.ratios(), "skipped": self.skipped}


# ------------------------------------------------------------------ runners

def _time(cmd: list[str], expect: int = 1) -> list[float]:
    """Seconds between each "[" and the "]" after it on the guest's debug console (the
    command's stdout)."""
    intervals: list[float] = []
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        start = None
        while True:
            byte = proc.stdout.read(1)
            if not byte:
                break
            if byte == b"[":
                start = time.perf_counter()
            elif byte == b"]" and start is not None:
                intervals.append(time.perf_counter() - start)
                start = None
        status = proc.wait(timeout=600)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if status != expect or not intervals:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {status}: {stderr.strip()[-400:]}")
    return intervals


Runner = Callable[[Path], list[float]]


def _per_call(run: Runner, image: Path, n: int) -> list[float]:
    """µs per call in each repetition but the first (the warm-up)."""
    intervals = run(image)
    kept = intervals[1:] if len(intervals) > 1 else intervals
    return [t / n * 1e6 for t in kept]


def _hvmport(backend: str, *extra: str) -> Runner:
    def run(image: Path) -> list[float]:
        return _time([sys.executable, "-m", "hvmport.cli", "run", "--backend", backend,
                      "--kernel", str(image), "--debugcon", "-", "--serial", "none", *extra])
    return run


def _dm_kvm(transport: str, image: Path, n: int) -> Callable[[], list[float]]:
    """A device-model call on KVM with the device model using ``transport``."""
    run = _hvmport("kvm", f"--dm-arg=--vmport-transport={transport}")
    return lambda: _per_call(run, image, n)


def _user(n: int, cmd: int, reps: int) -> list[float]:
    """µs per call from an unmodified Linux program under the user backend's ptrace
    supervisor (guests/user/probe.c's loop between the same markers), once per run."""
    from hvmport import userprogs

    probe = userprogs.program_path("probe")
    cmdline = [sys.executable, "-m", "hvmport.cli", "run", "--backend", "user",
               "--debugcon", "-", "--serial", "none", "--", str(probe), f"loop:{n}:{cmd}"]
    return [t / n * 1e6 for _ in range(reps) for t in _time(cmdline, expect=0)]


def _qemu(accel: str) -> Runner:
    def run(image: Path) -> list[float]:
        return _time(["qemu-system-x86_64", "-accel", accel, "-machine", "pc,vmport=on",
                      "-m", "64", "-nodefaults", "-display", "none", "-no-reboot",
                      "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                      "-kernel", str(image)])
    return run


def _floor_binary() -> Path:
    require_tools("gcc")
    out = cache_dir() / "bench" / "floor"
    source = FLOOR_SOURCE.read_bytes()
    stamp = out.with_suffix(".src")
    if not out.exists() or not stamp.exists() or stamp.read_bytes() != source:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(out), str(FLOOR_SOURCE)], check=True)
        stamp.write_bytes(source)
    return out


def _floor_c(entry: int) -> Runner:
    binary = _floor_binary()

    def run(image: Path) -> list[float]:
        return _time([str(binary), str(image), hex(LOAD), hex(entry)])
    return run


def _floor_unicorn(image: Path) -> list[float]:
    """A bare hooked IN in Unicorn: the software CPU's floor (in this process)."""
    from unicorn.unicorn_const import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32
    from unicorn.unicorn_py3 import Uc
    from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_REG_EIP

    data = image.read_bytes()
    engine: Any = Uc  # the binding is untyped
    uc: Any = engine(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 4 << 20)
    uc.mem_write(LOAD, data)
    intervals: list[float] = []
    start: list[float] = []

    def on_in(uc: Any, port: int, size: int, user: object) -> int:
        return 6

    def on_out(uc: Any, port: int, size: int, value: int, user: object) -> None:
        if port == 0xE9 and value & 0xFF == 0x5B:
            start[:] = [time.perf_counter()]
        elif port == 0xE9 and value & 0xFF == 0x5D and start:
            intervals.append(time.perf_counter() - start[0])
        elif port == 0xF4:
            uc.emu_stop()

    uc.hook_add(UC_HOOK_INSN, on_in, None, 1, 0, UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, UC_X86_INS_OUT)
    uc.reg_write(UC_X86_REG_EIP, loop_image_entry(data))
    uc.emu_start(loop_image_entry(data), LOAD + len(data))
    return intervals


# ------------------------------------------------------------------ the ring

def buffered_writes_per_s(count: int) -> float:
    """Buffered port writes per second, hypervisor to a real device-model process."""
    from hvmport import atomic
    from hvmport.abi import ioreq as abi
    from hvmport.core.bufring import Send
    from hvmport.core.domain import Domain, PageKind
    from hvmport.hv import evtchn
    from hvmport.hv.control import ControlServer
    from hvmport.hv.evtchn import Channel
    from hvmport.hv.launch import DeviceModelProcess
    from hvmport.hv.memory import GuestMemory
    from hvmport.hv.run import SystemClock
    from hvmport.hv.shmem import MemfdPages

    with tempfile.TemporaryDirectory(prefix="hvmport-bench-") as tmp, GuestMemory(8) as mem:
        pages = MemfdPages()
        domain = Domain(1, 1, pages, SystemClock(), vmware_port=True, vmware_hwver=7,
                        tsc_khz=1_000_000, cas64=atomic.cas64)
        channels: dict[int, Channel] = {}
        lock = threading.Lock()
        control = ControlServer(os.path.join(tmp, "control"), domain, lock, mem, pages,
                                channels)
        control.start()
        dm = DeviceModelProcess(control.path, 1, ["--serial", "none"])
        try:
            sid = next(iter(domain.servers))
            ring = domain.servers[sid].pages[PageKind.BUFIOREQ].view
            port = domain.servers[sid].buf_port
            chan = channels[port]
            t = time.perf_counter()
            deadline = time.monotonic() + 60
            sent = 0
            while sent < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the device model stopped draining the buffered ring "
                                       f"after {sent} writes")
                status, _ = domain.send_buffered(sid, abi.IOREQ_TYPE_PIO, 0x80, 1, sent & 0xFF)
                if status is Send.QUEUED:
                    sent += 1
                    if sent % 128 == 0:  # coalesced notifications
                        evtchn.notify(chan.to_dm)
                elif status is Send.FULL:
                    evtchn.notify(chan.to_dm)
                else:
                    raise RuntimeError(f"buffered send failed: {status}")
            evtchn.notify(chan.to_dm)
            while int.from_bytes(ring[0:4], "little") != int.from_bytes(ring[4:8], "little"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the device model stopped draining the buffered ring")
            return count / (time.perf_counter() - t)
        finally:
            control.close()
            dm.stop()
            for c in channels.values():
                c.close()
            pages.close()


# ------------------------------------------------------------------ the run

def run_benchmarks(quick: bool = False, progress: Callable[[str], None] = lambda s: None,
                   only: set[str] | None = None) -> Results:
    from hvmport.cpu.kvm import probe_kvm

    reps = 3 if quick else 5
    n_kvm = 2000 if quick else 10000
    n_uc = 5000 if quick else 20000
    n_qemu_tcg = 1000000 if quick else 5000000
    res = Results()
    kvm_reason = probe_kvm()
    qemu = shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="hvmport-bench-") as tmp:
        def image(n: int, cmd: int, per_run: int = reps) -> Path:
            p = Path(tmp, f"loop-{cmd}-{n}-{per_run}.bin")
            p.write_bytes(loop_image(n, cmd, per_run + 1))
            return p

        entry = loop_image_entry(loop_image(1, GETVERSION))
        kvm_v = image(n_kvm, GETVERSION)
        # The transports are compared with each other, so they take turns: ``rounds`` runs
        # each, interleaved, two measured repetitions per run. Load that comes and goes
        # on a shared machine then spreads over all of them instead of whichever ran last.
        rounds = 2 if quick else 3
        kvm_s2 = image(n_kvm, STATUS, 2)
        uc_v, uc_s = image(n_uc, GETVERSION), image(n_uc, STATUS)
        no_qemu = None if qemu else "qemu-system-x86_64 not installed"
        trace_file = str(Path(tmp, "bench.trace"))
        n_user = 2000 if quick else 10000
        no_user = _user_unusable()
        plan: list[tuple[str, Callable[[], list[float]], str | None]] = [
            ("floor_c", lambda: _per_call(_floor_c(entry), kvm_v, n_kvm), kvm_reason),
            ("hv_kvm", lambda: _per_call(_hvmport("kvm", "--no-device-model"), kvm_v, n_kvm),
             kvm_reason),
            *((f"dm_kvm_{t}", _dm_kvm(t, kvm_s2, n_kvm), kvm_reason) for t in TRANSPORTS),
            ("floor_unicorn", lambda: _per_call(_floor_unicorn, uc_v, n_uc), None),
            ("hv_unicorn", lambda: _per_call(_hvmport("unicorn", "--no-device-model"), uc_v,
                                             n_uc), None),
            ("dm_unicorn", lambda: _per_call(_hvmport("unicorn"), uc_s, n_uc), None),
            # The same KVM runs with --trace: what recording every event costs a call.
            ("hv_kvm_traced", lambda: _per_call(
                _hvmport("kvm", "--no-device-model", "--trace", trace_file), kvm_v, n_kvm),
             kvm_reason),
            ("dm_kvm_traced", lambda: _per_call(_hvmport("kvm", "--trace", trace_file), kvm_s2,
                                                n_kvm), kvm_reason),
            ("hv_user", lambda: _user(n_user, GETVERSION, reps), no_user),
            ("dm_user", lambda: _user(n_user, STATUS, reps), no_user),
            ("qemu_kvm", lambda: _per_call(_qemu("kvm"), kvm_v, n_kvm), no_qemu or kvm_reason),
            ("qemu_tcg", lambda: _per_call(_qemu("tcg"), image(n_qemu_tcg, GETVERSION),
                                           n_qemu_tcg), no_qemu),
        ]
        wanted = []
        for name, measure, skip in plan:
            if only is not None and name not in only:
                continue
            if skip is not None:
                res.skipped[name] = skip
            else:
                wanted.append((name, measure))
        turns = [[(name, measure)] for name, measure in wanted
                 if not name.startswith("dm_kvm_")]
        together = [(name, measure) for name, measure in wanted if name.startswith("dm_kvm_")]
        if together:
            turns.insert(min(2, len(turns)), together * rounds)
        for turn in turns:
            for name, measure in turn:
                if name in res.skipped:
                    continue
                progress(name if len(turn) == 1 else f"{name} (taking turns)")
                try:
                    res.scenarios.setdefault(name, Figure()).samples.extend(measure())
                except RuntimeError as e:  # say what failed, measure the rest
                    res.scenarios.pop(name, None)
                    res.skipped[name] = f"failed: {e}"
        if only is None or "bufioreq_writes" in only:
            progress(f"bufioreq_writes ({reps} repetitions)")
            writes = 20000 if quick else 100000
            try:
                res.writes_per_s = Figure([buffered_writes_per_s(writes)
                                           for _ in range(reps)])
            except RuntimeError as e:
                res.skipped["bufioreq_writes"] = f"failed: {e}"
        _linux_boots(res, quick, progress, only)
    return res


def _linux_boots(res: Results, quick: bool, progress: Callable[[str], None],
                 only: set[str] | None) -> None:
    from hvmport import bench_linux

    names = {"linux_boot_unicorn", "qemu_tcg_linux_boot"}
    if only is not None and not names & only:
        return
    plan, skip_all = bench_linux.scenarios()
    if skip_all is not None:
        res.skipped.update({n: skip_all for n in names if only is None or n in only})
        return
    reps = 1 if quick else 3
    for name, measure, skip in plan:
        if only is not None and name not in only:
            continue
        if skip is not None:
            res.skipped[name] = skip
            continue
        progress(f"{name} ({reps} repetitions)")
        try:
            res.boots[name] = Figure([measure() for _ in range(reps)])
        except RuntimeError as e:
            res.skipped[name] = f"failed: {e}"


def table(res: Results) -> str:
    lines = [f"{'scenario':<22} {'µs/call':>10} {'min':>10} {'max':>10}"]
    for name, fig in res.scenarios.items():
        lines.append(f"{name:<22} {fig.median:>10.2f} {min(fig.samples):>10.2f} "
                     f"{max(fig.samples):>10.2f}")
    if res.writes_per_s is not None:
        w = res.writes_per_s
        lines.append(f"{'bufioreq_writes':<22} {w.median:>10.0f} {min(w.samples):>10.0f} "
                     f"{max(w.samples):>10.0f}  writes/s")
    for name, fig in res.boots.items():
        lines.append(f"{name:<22} {fig.median:>10.2f} {min(fig.samples):>10.2f} "
                     f"{max(fig.samples):>10.2f}  s to the shell")
    for name, why in res.skipped.items():
        lines.append(f"{name:<22} {'skipped':>10}  ({why})")
    lines.append("")
    for name, value in res.ratios().items():
        lines.append(f"{name:<28} {value:>6.2f}")
    return "\n".join(lines)


def plot(res: Results, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from hvmport.errors import HostError

        raise HostError("--plot needs matplotlib (pip install matplotlib)") from e
    names = list(res.scenarios)
    medians = [res.scenarios[n].median for n in names]
    lows = [m - min(res.scenarios[n].samples) for n, m in zip(names, medians, strict=True)]
    highs = [max(res.scenarios[n].samples) - m for n, m in zip(names, medians, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, medians, xerr=[lows, highs], color="#4a7ab5")
    ax.set_xlabel("µs per backdoor call (median, min-max)")
    ax.set_title("hvmport bench")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _user_unusable() -> str | None:
    from hvmport.cpu.user import probe_ptrace

    return probe_ptrace()
