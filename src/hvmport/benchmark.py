"""`hvmport bench`: the cost of a backdoor call, side by side in one run.

Every scenario runs the same guest bytes: a flat image with a Multiboot (a.out kludge)
header, so hvmport, QEMU and the C floor all boot it. The guest prints "[" on the debug
console, loops N times over one backdoor IN, prints "]" and writes isa-debug-exit. The
benchmark reads the console through a pipe and times the two markers as they arrive, so
start-up and shutdown do not count; cost per call is that time / N. (The Unicorn floor runs
in this process and is timed as N iterations minus 0.) Each figure is the median of several
repetitions, with min and max; ratios are taken between medians of the same run.
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
FLOOR_SOURCE = Path(__file__).resolve().parents[2] / "bench" / "floor.c"

LOOP = """
    jmp entry
    .balign 4
mb_header:
    .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    .long mb_header, _start, 0, 0, entry
entry:
    mov $0x10000, %esp
    mov ${n}, %edi
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
    mov $0, %al
    out %al, $0xf4
    cli
    hlt
"""


def loop_image(iterations: int, cmd: int) -> bytes:
    return assemble_flat(LOOP.format(n=iterations, cmd=cmd), 32, LOAD)


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
            "dm_unicorn/floor_unicorn": ("dm_unicorn", "floor_unicorn"),
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

def _time(cmd: list[str], expect: int = 1) -> float:
    """Seconds between the guest's "[" and "]" on the debug console (the command's stdout)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        start = end = None
        while True:
            byte = proc.stdout.read(1)
            if not byte:
                break
            if byte == b"[":
                start = time.perf_counter()
            elif byte == b"]":
                end = time.perf_counter()
        status = proc.wait(timeout=600)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if status != expect or start is None or end is None:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {status}: {stderr.strip()[-400:]}")
    return end - start


def _per_call(run: Callable[[Path], float], images: tuple[Path, Path], n: int) -> float:
    """µs per call: the marked loop's time over its n iterations."""
    return run(images[0]) / n * 1e6


def _hvmport(backend: str, *extra: str) -> Callable[[Path], float]:
    def run(image: Path) -> float:
        return _time([sys.executable, "-m", "hvmport.cli", "run", "--backend", backend,
                      "--kernel", str(image), "--debugcon", "-", "--serial", "none", *extra])
    return run


def _qemu(accel: str) -> Callable[[Path], float]:
    def run(image: Path) -> float:
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


def _floor_c(entry: int) -> Callable[[Path], float]:
    binary = _floor_binary()

    def run(image: Path) -> float:
        return _time([str(binary), str(image), hex(LOAD), hex(entry)])
    return run


def _floor_unicorn(image: Path) -> float:
    """A bare hooked IN in Unicorn: the software CPU's floor (in this process)."""
    from unicorn.unicorn_const import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32
    from unicorn.unicorn_py3 import Uc
    from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_REG_EIP

    data = image.read_bytes()
    engine: Any = Uc  # the binding is untyped
    uc: Any = engine(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 4 << 20)
    uc.mem_write(LOAD, data)

    def on_in(uc: Any, port: int, size: int, user: object) -> int:
        return 6

    def on_out(uc: Any, port: int, size: int, value: int, user: object) -> None:
        if port == 0xF4:
            uc.emu_stop()

    uc.hook_add(UC_HOOK_INSN, on_in, None, 1, 0, UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, UC_X86_INS_OUT)
    uc.reg_write(UC_X86_REG_EIP, loop_image_entry(data))
    t = time.perf_counter()
    uc.emu_start(loop_image_entry(data), LOAD + len(data))
    return time.perf_counter() - t


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
    n_qemu_tcg = 100000 if quick else 1000000
    res = Results()
    kvm_reason = probe_kvm()
    qemu = shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="hvmport-bench-") as tmp:
        def images(n: int, cmd: int) -> tuple[Path, Path]:
            paths = []
            for count in (n, 0):
                p = Path(tmp, f"loop-{cmd}-{count}.bin")
                p.write_bytes(loop_image(count, cmd))
                paths.append(p)
            return paths[0], paths[1]

        entry = loop_image_entry(loop_image(1, GETVERSION))
        plan: list[tuple[str, Callable[[], float], str | None]] = []
        kvm_v = images(n_kvm, GETVERSION)
        kvm_s = images(n_kvm, STATUS)
        uc_v = images(n_uc, GETVERSION)
        uc_s = images(n_uc, STATUS)
        plan += [
            ("floor_c", lambda: _per_call(_floor_c(entry), kvm_v, n_kvm), kvm_reason),
            ("hv_kvm", lambda: _per_call(_hvmport("kvm", "--no-device-model"), kvm_v, n_kvm),
             kvm_reason),
            ("dm_kvm_regs-page", lambda: _per_call(_hvmport("kvm"), kvm_s, n_kvm), kvm_reason),
            ("floor_unicorn", lambda: (_floor_unicorn(uc_v[0]) - _floor_unicorn(uc_v[1]))
             / n_uc * 1e6, None),
            ("hv_unicorn", lambda: _per_call(_hvmport("unicorn", "--no-device-model"), uc_v,
                                             n_uc), None),
            ("dm_unicorn", lambda: _per_call(_hvmport("unicorn"), uc_s, n_uc), None),
        ]
        no_qemu = None if qemu else "qemu-system-x86_64 not installed"
        plan.append(("qemu_kvm", lambda: _per_call(_qemu("kvm"), kvm_v, n_kvm),
                     no_qemu or kvm_reason))
        tcg = images(n_qemu_tcg, GETVERSION)
        plan.append(("qemu_tcg", lambda: _per_call(_qemu("tcg"), tcg, n_qemu_tcg), no_qemu))
        for name, measure, skip in plan:
            if only is not None and name not in only:
                continue
            if skip is not None:
                res.skipped[name] = skip
                continue
            progress(f"{name} ({reps} repetitions)")
            try:
                res.scenarios[name] = Figure([measure() for _ in range(reps)])
            except RuntimeError as e:  # say what failed, measure the rest
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
