"""`hvmport run --trace` end to end, on KVM and Unicorn: the vmmouse guest's backdoor calls
in the merged trace of the hypervisor and the device model, checked against what the guest
itself printed; then `hvmport trace summary` and `hvmport trace export --chrome` on it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvmport.abi import vmware as vm
from hvmport.trace.reader import Event, Trace, read
from tests.conftest import Run, guest, hvmport_run
from tests.test_run import LINE

GETVERSION = vm.BDOOR_CMD_GETVERSION
STATUS = vm.BDOOR_CMD_ABSPOINTER_STATUS
REGS = ("eax", "ebx", "ecx", "edx", "esi", "edi")


@dataclass
class Traced:
    run: Run
    path: Path
    trace: Trace

    def calls(self) -> list[tuple[str, dict[str, int]]]:
        """The guest's backdoor calls in order: (label, registers it printed after)."""
        out = []
        for line in self.run.lines():
            m = LINE.match(line)
            if m and "eax=" in m.group(3):
                regs = dict(kv.split("=", 1) for kv in m.group(3).split())
                out.append((m.group(2), {r: int(regs[r], 16) for r in REGS}))
        return out

    def of(self, *kinds: str) -> list[Event]:
        return [e for e in self.trace.events if e.ev in kinds]


@pytest.fixture(scope="module")
def traced_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Traced]:
    from tests.conftest import kvm_unusable

    runs = {}
    for b in ("kvm", "unicorn"):
        if b == "kvm" and kvm_unusable():
            continue
        tmp = tmp_path_factory.mktemp(f"trace-{b}")
        path = tmp / "vmmouse.trace"
        run = hvmport_run(tmp, "--backend", b, "--kernel", guest("vmmouse"), "--trace",
                          str(path))
        runs[b] = Traced(run, path, read(path))
    return runs


@pytest.fixture
def traced(traced_runs: dict[str, Traced], backend: str) -> Traced:
    t = traced_runs[backend]
    assert t.run.status == 1, t.run.stderr
    return t


def test_one_file_from_both_processes(traced: Traced) -> None:
    procs = traced.trace.processes()
    roles = sorted(role or "" for role, _ in procs.values())
    assert roles == ["device-model", "hypervisor"]
    assert f"trace: {len(traced.trace.events)} events in {traced.path}" in traced.run.stderr
    times = [e.t for e in traced.trace.events]
    assert times == sorted(times)
    assert not traced.of("trace_dropped")


def test_every_backdoor_call_is_in_the_trace_with_its_registers(traced: Traced) -> None:
    calls = traced.calls()
    hv_calls = traced.of("vmport_handled", "vmport_send", "vmport_ignored")
    assert len(hv_calls) == len(calls) > 20
    dm_answers = iter(traced.of("vmport_dm"))
    completions = iter(e for e in traced.of("ioreq_complete") if e.opt_int("cmd") is not None)
    handled = []
    hv_pid = traced.trace.header.pid
    for (label, printed), e in zip(calls, hv_calls, strict=True):
        assert e.pid == hv_pid
        assert e.num("cmd") == e.regs("in")["ecx"] & 0xFFFF, label
        if e.ev == "vmport_handled":
            handled.append(label)
            assert e.regs("out") == printed, label
            continue
        assert e.ev == "vmport_send", label
        answer, done = next(dm_answers), next(completions)
        # The device model saw what the hypervisor sent, and the guest got its answer.
        assert answer.pid != hv_pid and answer.num("sid") == e.num("sid")
        assert answer.num("cmd") == e.num("cmd") == done.opt_int("cmd"), label
        assert answer.regs("in") == e.regs("in"), label
        assert answer.regs("out") == printed == done.regs("out"), label
        assert e.t < answer.t < done.t
        assert 0 < answer.num("dur") < done.num("dur")
    # GETVERSION is the one command of this guest the hypervisor answers (v14's list).
    assert handled == ["GETVERSION.in4"]
    (version,) = traced.of("vmport_handled")
    assert version.regs("out")["eax"] == 6 and version.regs("out")["ebx"] == 0x564D5868
    statuses = [e for e in traced.of("vmport_dm") if e.num("cmd") == STATUS]
    assert statuses[0].regs("out")["eax"] == 0xFFFF0000  # STATUS while disabled


def test_ioreqs_pair_up_per_server(traced: Traced) -> None:
    sends, dones = traced.of("ioreq_send"), traced.of("ioreq_complete")
    assert len(sends) == len(dones) == len(traced.of("vmport_send"))
    for s, d in zip(sends, dones, strict=True):
        assert (s.num("sid"), s.num("vcpu"), s.num("type")) == (
            d.num("sid"), d.num("vcpu"), d.num("type"))
        assert s.t <= d.t


def _hvmport(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvmport.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_summary_counts(traced: Traced) -> None:
    calls = traced.calls()
    n_status = sum(1 for label, _ in calls if label.startswith("STATUS."))
    n_forwarded = len(calls) - 1
    proc = _hvmport("trace", "summary", str(traced.path), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {(c["cmd"], c["route"]): c for c in doc["commands"]}
    assert rows[(GETVERSION, "hypervisor")]["count"] == 1
    assert rows[(STATUS, "round trip")]["count"] == n_status
    assert rows[(STATUS, "device model")]["count"] == n_status
    row = rows[(STATUS, "round trip")]
    assert 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"] <= row["max_us"]
    (server,) = doc["servers"]
    assert server["sync"] == server["dm_served"] == n_forwarded
    assert server["types"] == {"VMWARE_PORT": n_forwarded}
    assert {p["role"] for p in doc["processes"]} == {"hypervisor", "device-model"}

    text = _hvmport("trace", "summary", str(traced.path))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    status_rows = [ln.split() for ln in lines if ln.startswith("ABSPOINTER_STATUS (40)")]
    assert [(r[2], r[3], r[4]) for r in status_rows] == [
        ("round", "trip", str(n_status)), ("device", "model", str(n_status))]
    assert any(ln.startswith("GETVERSION (10)") and ln.split()[3] == "1" for ln in lines)


def test_chrome_export(traced: Traced, tmp_path: Path) -> None:
    out = tmp_path / "vmmouse.json"
    proc = _hvmport("trace", "export", str(traced.path), "--chrome", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    evs = doc["traceEvents"]
    hv_pid = traced.trace.header.pid
    (dm_pid,) = {e.pid for e in traced.trace.events} - {hv_pid}
    names = {e["pid"]: e["args"]["name"] for e in evs if e["name"] == "process_name"}
    assert names[hv_pid].startswith("hypervisor") and names[dm_pid].startswith("device-model")
    complete = [e for e in evs if e["ph"] == "X"]
    by = {(e["pid"], e["name"]) for e in complete}
    assert (hv_pid, "handled GETVERSION (10)") in by
    assert (hv_pid, "ioreq_complete VMWARE_PORT ABSPOINTER_STATUS (40)") in by
    assert (dm_pid, "dm ABSPOINTER_STATUS (40)") in by
    assert len(complete) == len(traced.of("vmport_handled", "ioreq_complete", "vmport_dm"))
    assert all(e["dur"] >= 0 and e["ts"] >= 0 and e["tid"] == 0 for e in complete)
    # The device model's answer lies inside the round trip the vCPU waited for.
    rt = next(e for e in complete if e["pid"] == hv_pid and "ABSPOINTER_STATUS" in e["name"])
    dm = next(e for e in complete if e["pid"] == dm_pid and "ABSPOINTER_STATUS" in e["name"])
    assert rt["ts"] <= dm["ts"] and dm["ts"] + dm["dur"] <= rt["ts"] + rt["dur"]
    sends = [e for e in evs if e["ph"] == "i" and e["name"].startswith("send ")]
    assert len(sends) == len(traced.of("vmport_send"))
    assert sends[0]["args"]["in"]["eax"] == "0x564d5868"


def test_unwritable_trace_file_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    run = hvmport_run(tmp_path, "--backend", "unicorn", "--kernel", guest("vmmouse"),
                      "--trace", str(tmp_path / "no" / "such" / "dir.trace"))
    assert run.status == 2
    assert "configuration error" in run.stderr and "cannot write trace file" in run.stderr
    assert run.console == ""


#: The commands v14's hypervisor answers itself.
HV_COMMANDS = {"GETMHZ", "GETVERSION", "GETHWVERSION", "GETTIME", "GETHZ", "GETTIMEFULL"}


def _battery_calls(run: Run) -> list[tuple[str, dict[str, int]]]:
    """Every backdoor call of the battery, in order, with the low halves it printed (the
    '~ ' line has the real values where the plain line masks varying ones)."""
    calls: list[tuple[str, dict[str, int]]] = []
    for line in run.lines(raw=True):
        raw = line.startswith("~ ")
        m = LINE.match(line[2:] if raw else line)
        if not m or "=" not in m.group(3):
            continue
        regs = {("e" + k[1:]): int(v[-8:], 16) for k, v in
                (kv.split("=", 1) for kv in m.group(3).split()) if "*" not in v[-8:]}
        label = f"{m.group(1)} {m.group(2)}"
        if raw:
            assert calls[-1][0] == label
            calls[-1] = (label, regs)
        else:
            calls.append((label, regs))
    return calls


def _expected(label: str) -> tuple[str, int] | None:
    """What the hypervisor should record for a battery label: (event, port), or None for
    an access that is not a backdoor access at all (plain port I/O)."""
    name = label.split()[1]
    op, _, at = name.rpartition(".")[2].partition("@")
    port, size = (int(at, 16) if at else 0x5658), int(op[-1])
    if not (port >= 0x5658 and port + size <= 0x565C):
        return None
    if name.startswith("magic."):
        return "vmport_ignored magic", port
    if port != 0x5658:
        return "vmport_ignored port", port
    if name.split(".")[0] in HV_COMMANDS:
        return "vmport_handled", port
    return "vmport_send", port


def test_battery_trace_handled_ignored_and_sent(backend: str, tmp_path: Path) -> None:
    """All three routes of patch 8/8 in 16-, 32- and 64-bit code: wrong magic and the
    narrow accesses to the other three ports are IGNORED, v14's commands HANDLED with the
    registers the guest then printed, the rest SENT and answered by the device model."""
    path = tmp_path / "battery.trace"
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("battery"),
                      "--trace", str(path))
    assert run.status == 1, run.stderr
    trace = read(path)
    calls = _battery_calls(run)
    hv = [e for e in trace.events
          if e.ev in ("vmport_handled", "vmport_send", "vmport_ignored")]
    want = [(label, _expected(label)) for label, _ in calls]
    got = [(e.ev + (f" {e.data['why']}" if e.ev == "vmport_ignored" else ""), e.num("port")
            if e.ev == "vmport_ignored" else 0x5658) for e in hv]
    assert got == [w for _, w in want if w is not None]
    assert {w[0] for _, w in want if w is not None} == {
        "vmport_handled", "vmport_send", "vmport_ignored magic", "vmport_ignored port"}
    answers = iter(e for e in trace.events if e.ev == "vmport_dm")
    traced_calls = iter(e for e in hv)
    for label, printed in calls:
        if _expected(label) is None:
            continue
        e = next(traced_calls)
        out = e.regs("out") if e.ev == "vmport_handled" else (
            next(answers).regs("out") if e.ev == "vmport_send" else None)
        if out is not None:
            assert {k: out[k] for k in printed} == printed, label
    assert next(answers, None) is None


def test_two_vcpus_two_tracks(backend: str, tmp_path: Path) -> None:
    """smp.S: each vCPU makes 64 rounds of GETVERSION (hypervisor) and command 0x7777
    (device model); every event names its vCPU, the DM's answers go to the right vCPU's
    slot, and the Chrome export has a track per vCPU in both processes."""
    from hvmport import guests

    path = tmp_path / "smp.trace"
    run = hvmport_run(tmp_path, "--backend", backend, "--kernel", guest("smp", "flat32"),
                      "--mode", "32", "--load-addr", hex(guests.flat_address("flat32")),
                      "--vcpus", "2", "--smp-entry", "--trace", str(path))
    assert run.status == 1, (run.console, run.stderr)
    trace = read(path)
    for vcpu in (0, 1):
        mine = [e for e in trace.events if e.opt_int("vcpu") == vcpu]
        handled = [e for e in mine if e.ev == "vmport_handled"]
        sent = [e for e in mine if e.ev == "vmport_send"]
        answered = [e for e in mine if e.ev == "vmport_dm"]
        assert len(handled) == len(sent) == len(answered) == 64
        assert {e.num("cmd") for e in handled} == {GETVERSION}
        assert {e.num("cmd") for e in sent} == {0x7777}
        # The device model saw each vCPU's own registers (smp.S derives them from its id).
        assert [e.regs("in") for e in sent] == [e.regs("in") for e in answered]
    assert {e.regs("in")["esi"] for e in trace.events if e.ev == "vmport_send"
            and e.num("vcpu") == 0}.isdisjoint(
        {e.regs("in")["esi"] for e in trace.events if e.ev == "vmport_send"
         and e.num("vcpu") == 1})
    out = tmp_path / "smp.json"
    assert _hvmport("trace", "export", str(path), "--chrome", str(out)).returncode == 0
    evs = json.loads(out.read_text())["traceEvents"]
    tracks = {(e["pid"], e["args"]["name"]) for e in evs if e["name"] == "thread_name"}
    pids = {e.pid for e in trace.events}
    assert len(pids) == 2
    # Besides the vCPUs, only the device model's start (trace_part) is on no vCPU's track.
    assert {t for t in tracks if t[1] != "ring/process"} == {
        (pid, f"vCPU {v}") for pid in pids for v in (0, 1)}
    summary = json.loads(_hvmport("trace", "summary", str(path), "--json").stdout)
    rows = {(c["cmd"], c["route"]): c["count"] for c in summary["commands"]}
    assert rows == {(GETVERSION, "hypervisor"): 128, (0x7777, "round trip"): 128,
                    (0x7777, "device model"): 128}
