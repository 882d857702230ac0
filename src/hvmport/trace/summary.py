"""``hvmport trace summary``: counts and latency percentiles per command and per server.

What is measured (all from the trace's own ``dur`` fields, nanoseconds of CLOCK_MONOTONIC):

* ``hypervisor``: a command the hypervisor answered (``vmport_handled``), from the
  vCPU's exit reaching the I/O handler to the answer;
* ``round trip``: a command forwarded to a device model, as the vCPU waited for it
  (``ioreq_complete`` of a VMWARE_PORT request: slot posted, device model notified,
  answer seen);
* ``device model``: the device model's own time on it (``vmport_dm``);
* per server, every synchronous ioreq's round trip, and the buffered writes.

Percentiles are nearest-rank: p50 of 3 samples is the second smallest.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from hvmport.abi import ioreq as abi
from hvmport.abi import vmware as vm
from hvmport.trace import reader
from hvmport.trace.reader import Trace

PERCENTILES = (50, 90, 99)

#: The backdoor commands by number, for people; the mouse's as X.org's driver names them.
COMMAND_NAMES: dict[int, str] = {
    getattr(vm, name): name.removeprefix("BDOOR_CMD_")
    for name in dir(vm) if name.startswith("BDOOR_CMD_") and name != "BDOOR_CMD_MAX"
    and not name.startswith("BDOOR_CMD_VCPU_")
}
TYPE_NAMES = {
    abi.IOREQ_TYPE_PIO: "PIO", abi.IOREQ_TYPE_COPY: "COPY",
    abi.IOREQ_TYPE_PCI_CONFIG: "PCI_CONFIG",
    abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT: "VMWARE_PORT(3)",
    abi.IOREQ_TYPE_TIMEOFFSET: "TIMEOFFSET", abi.IOREQ_TYPE_INVALIDATE: "INVALIDATE",
    abi.IOREQ_TYPE_VMWARE_PORT: "VMWARE_PORT",
}
#: Row order of the routes in the command table.
ROUTES = ("hypervisor", "round trip", "device model")


def command_name(cmd: int) -> str:
    return f"{COMMAND_NAMES.get(cmd, 'cmd')} ({cmd})"


def percentile(sorted_ns: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1]


@dataclass
class Latency:
    """A count, and the latencies of those that have one."""

    count: int = 0
    samples: list[int] = field(default_factory=list)

    def add(self, dur: int | None) -> None:
        self.count += 1
        if dur is not None:
            self.samples.append(dur)

    def stats_us(self) -> dict[str, float | None]:
        s = sorted(self.samples)
        out: dict[str, float | None] = {}
        for p in PERCENTILES:
            out[f"p{p}_us"] = percentile(s, p) / 1000 if s else None
        out["max_us"] = s[-1] / 1000 if s else None
        return out


@dataclass
class ServerStats:
    sync: Latency = field(default_factory=Latency)
    by_type: Counter[int] = field(default_factory=Counter)
    buffered: int = 0
    buffered_not_queued: int = 0
    dm_served: int = 0
    dm_buffered: int = 0


@dataclass
class Summary:
    path: str
    events: int
    span_ns: int
    commands: dict[tuple[int, str], Latency]
    servers: dict[int, ServerStats]
    ignored: Counter[str]
    dropped: int
    processes: dict[int, tuple[str | None, int]]

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "events": self.events,
            "span_us": self.span_ns / 1000,
            "processes": [{"pid": pid, "role": role, "domid": domid}
                          for pid, (role, domid) in sorted(self.processes.items())],
            "commands": [
                {"cmd": cmd, "name": COMMAND_NAMES.get(cmd), "route": route,
                 "count": lat.count, **lat.stats_us()}
                for (cmd, route), lat in self._command_rows()],
            "servers": [
                {"sid": sid, "sync": s.sync.count, **s.sync.stats_us(),
                 "types": {TYPE_NAMES.get(t, str(t)): n for t, n in sorted(s.by_type.items())},
                 "buffered": s.buffered, "buffered_not_queued": s.buffered_not_queued,
                 "dm_served": s.dm_served, "dm_buffered": s.dm_buffered}
                for sid, s in sorted(self.servers.items())],
            "ignored": dict(sorted(self.ignored.items())),
            "dropped": self.dropped,
        }

    def _command_rows(self) -> list[tuple[tuple[int, str], Latency]]:
        return sorted(self.commands.items(), key=lambda kv: (kv[0][0], ROUTES.index(kv[0][1])))

    def table(self) -> str:
        def us(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        procs = ", ".join(f"{role or '?'} {pid}" for pid, (role, _) in
                          sorted(self.processes.items()))
        lines = [f"{self.path}: {self.events} events over {self.span_ns / 1e6:.1f} ms "
                 f"({procs})"]
        if self.dropped:
            lines.append(f"WARNING: {self.dropped} events were dropped while recording")
        head = f"{'p50 µs':>9} {'p90 µs':>9} {'p99 µs':>9} {'max µs':>9}"
        lines += ["", f"{'command':<28} {'route':<13} {'count':>7} {head}"]
        for (cmd, route), lat in self._command_rows():
            st = lat.stats_us()
            lines.append(f"{command_name(cmd):<28} {route:<13} {lat.count:>7} "
                         + " ".join(f"{us(st[k]):>9}" for k in
                                    ("p50_us", "p90_us", "p99_us", "max_us")))
        if not self.commands:
            lines.append("(no backdoor commands)")
        lines += ["", f"{'server':<8} {'sync':>7} {head} {'buf sent':>9} {'buf done':>9}  "
                  "types"]
        for sid, s in sorted(self.servers.items()):
            st = s.sync.stats_us()
            types = ", ".join(f"{TYPE_NAMES.get(t, str(t))} {n}"
                              for t, n in sorted(s.by_type.items()))
            lines.append(f"{sid:<8} {s.sync.count:>7} "
                         + " ".join(f"{us(st[k]):>9}" for k in
                                    ("p50_us", "p90_us", "p99_us", "max_us"))
                         + f" {s.buffered:>9} {s.dm_buffered:>9}  {types or '-'}")
        if not self.servers:
            lines.append("(no ioreq server traffic)")
        if self.ignored:
            lines += ["", "ignored backdoor accesses: "
                      + ", ".join(f"{why} {n}" for why, n in sorted(self.ignored.items()))]
        return "\n".join(lines)


def summarize(trace: Trace) -> Summary:
    commands: dict[tuple[int, str], Latency] = defaultdict(Latency)
    servers: dict[int, ServerStats] = defaultdict(ServerStats)
    ignored: Counter[str] = Counter()
    dropped = 0
    for e in trace.events:
        ev = e.ev
        if ev == "vmport_handled":
            commands[(e.num("cmd"), "hypervisor")].add(e.num("dur"))
        elif ev == "ioreq_complete":
            sid = e.num("sid")
            servers[sid].sync.add(e.num("dur"))
            servers[sid].by_type[e.num("type")] += 1
            cmd = e.opt_int("cmd")
            if cmd is not None:
                commands[(cmd, "round trip")].add(e.num("dur"))
        elif ev == "vmport_dm":
            commands[(e.num("cmd"), "device model")].add(e.num("dur"))
            servers[e.num("sid")].dm_served += 1
        elif ev == "dm_ioreq":
            servers[e.num("sid")].dm_served += 1
        elif ev == "bufioreq_send":
            s = servers[e.num("sid")]
            if e.data["status"] == "queued":
                s.buffered += 1
            else:
                s.buffered_not_queued += 1
        elif ev == "dm_bufioreq":
            servers[e.num("sid")].dm_buffered += 1
        elif ev == "vmport_ignored":
            ignored[str(e.data["why"])] += 1
        elif ev == reader.DROPPED_EV:
            dropped += e.num("count")
    times = [e.t for e in trace.events]
    span = max(times) - min(times) if times else 0
    return Summary(trace.path, len(trace.events), span, dict(commands), dict(servers),
                   ignored, dropped, trace.processes())
