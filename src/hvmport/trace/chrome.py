"""``hvmport trace export --chrome``: the Chrome trace event format, for Perfetto and
chrome://tracing.

The output is the format's JSON object form, ``{"traceEvents": [...], "displayTimeUnit":
"ns"}``. Every process that wrote events (the hypervisor, each device model) is a process
(``pid``, named by ``process_name`` metadata); each vCPU is a thread in it (``tid`` = vCPU
number, ``thread_name`` "vCPU N"), and events that belong to no vCPU (buffered writes,
bookkeeping) go to one more thread, "ring/process". A request's round trip, an answer in the
hypervisor and the device model's work on a request are complete events (``ph: "X"``, with
``ts`` and ``dur`` in microseconds, fractions allowed); everything else is a thread-scoped
instant event (``ph: "i"``, ``s: "t"``). Times are microseconds since the trace started.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hvmport.errors import ConfigError
from hvmport.trace import reader
from hvmport.trace.reader import Event, Trace
from hvmport.trace.summary import TYPE_NAMES, command_name

#: The thread of events that belong to no vCPU.
OTHER_TID = 9999


def _hex(regs: dict[str, int]) -> dict[str, str]:
    return {name: f"{value:#010x}" for name, value in regs.items()}


def _args(e: Event) -> dict[str, Any]:
    """The event's payload, registers and addresses in hex as people read them."""
    out: dict[str, Any] = {}
    for key, value in e.data.items():
        if key in ("t", "ev", "pid"):
            continue
        if key in ("in", "out") and isinstance(value, dict):
            out[key] = _hex(value)
        elif key in ("addr", "data", "port") and isinstance(value, int):
            out[key] = f"{value:#x}"
        elif key == "type" and isinstance(value, int):
            out[key] = TYPE_NAMES.get(value, str(value))
        else:
            out[key] = value
    return out


def _name(e: Event) -> str:
    ev = e.ev
    cmd = e.opt_int("cmd")
    if ev in ("vmport_handled", "vmport_send", "vmport_dm") and cmd is not None:
        return f"{ev.removeprefix('vmport_')} {command_name(cmd)}"
    if ev in ("ioreq_send", "ioreq_complete", "dm_ioreq", "bufioreq_send", "dm_bufioreq"):
        rtype = e.opt_int("type")
        kind = TYPE_NAMES.get(rtype, str(rtype)) if rtype is not None else "?"
        if cmd is not None:
            return f"{ev} {kind} {command_name(cmd)}"
        addr = e.opt_int("addr")
        return f"{ev} {kind}" + (f" {addr:#x}" if addr is not None else "")
    if ev == "vmport_ignored":
        return f"ignored ({e.data.get('why')})"
    return ev


def convert(trace: Trace) -> dict[str, Any]:
    """The whole Chrome trace as a JSON-ready object."""
    t0 = min([trace.header.t, *(e.t for e in trace.events)])
    procs = trace.processes()
    threads: dict[int, set[int]] = {pid: set() for pid in procs}
    body: list[dict[str, Any]] = []
    for e in trace.events:
        vcpu = e.opt_int("vcpu")
        tid = vcpu if vcpu is not None and vcpu >= 0 else OTHER_TID
        threads.setdefault(e.pid, set()).add(tid)
        item: dict[str, Any] = {"name": _name(e), "cat": e.ev.split("_")[0], "pid": e.pid,
                                "tid": tid, "args": _args(e)}
        dur = e.opt_int("dur")
        if e.ev in reader.SPANS and dur is not None and dur >= 0:
            item["ph"] = "X"
            item["ts"] = (e.t - dur - t0) / 1000
            item["dur"] = dur / 1000
        else:
            item["ph"] = "i"
            item["s"] = "t"
            item["ts"] = (e.t - t0) / 1000
        body.append(item)
    meta: list[dict[str, Any]] = []
    for index, (pid, tids) in enumerate(sorted(threads.items())):
        role, domid = procs.get(pid, (None, trace.header.domid))
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"name": f"{role or 'process'} {pid} (domid {domid})"}})
        # The hypervisor first, then device models in the order they appeared.
        meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"sort_index": 0 if pid == trace.header.pid else index + 1}})
        for tid in sorted(tids):
            label = "ring/process" if tid == OTHER_TID else f"vCPU {tid}"
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": label}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"sort_index": tid}})
    return {"traceEvents": meta + body, "displayTimeUnit": "ns",
            "otherData": {"source": os.path.basename(trace.path), "clock": trace.header.clock,
                          "domid": trace.header.domid, "wall": trace.header.wall}}


def write(trace: Trace, out: str | os.PathLike[str]) -> int:
    """Write the Chrome trace to ``out``; returns how many trace events it holds."""
    doc = convert(trace)
    target = os.fspath(out)
    try:
        with open(target, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
    except OSError as e:
        raise ConfigError(f"cannot write Chrome trace: {e.strerror}", path=target) from None
    return len(trace.events)
