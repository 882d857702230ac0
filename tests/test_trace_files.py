"""The trace recorder and reader (docs/tracing.md): what reaches the file, what is lost and
counted when the disk or the buffer cannot keep up, and clear errors for bad files."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from hvmport.errors import ConfigError
from hvmport.trace import reader, recorder
from hvmport.trace.reader import TraceWarning, read
from hvmport.trace.recorder import Tracer, merge, regs32

REGS = regs32(0x564D5868, 1, 10, 0x5658, 0, 0)


def test_events_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    before = time.monotonic_ns()
    with Tracer(path, domid=3, role="hypervisor") as tr:
        tr.vmport_handled(0, 10, REGS, regs32(6, 0x564D5868, 2, 0x5658, 0, 0), dur=1500)
        tr.vmport_send(1, 0, 40, regs32(0x564D5868, 0, 40, 0x5658, 0, 0))
        tr.ioreq_complete(1, 0, 9, 0xFFFF0000, 2500, cmd=40,
                          regs_out=regs32(0xFFFF0000, 0, 40, 0x5658, 0, 0))
    after = time.monotonic_ns()
    trace = read(path)
    assert trace.header.domid == 3 and trace.header.role == "hypervisor"
    assert trace.header.clock == "CLOCK_MONOTONIC" and trace.header.pid == os.getpid()
    assert [e.ev for e in trace.events] == ["vmport_handled", "vmport_send", "ioreq_complete"]
    handled, send, done = trace.events
    assert handled.regs("out")["eax"] == 6 and handled.num("dur") == 1500
    assert send.num("cmd") == 40 and send.regs("in")["ecx"] == 40
    assert done.opt_int("cmd") == 40 and done.regs("out")["eax"] == 0xFFFF0000
    # One clock for every process: CLOCK_MONOTONIC nanoseconds, in order. (The header
    # names the clock time.monotonic_ns() reads on Linux; check that it still does.)
    assert "CLOCK_MONOTONIC" in time.get_clock_info("monotonic").implementation
    times = [e.t for e in trace.events]
    assert before <= times[0] <= times[1] <= times[2] <= after


def test_regs32_keeps_the_32_bit_halves() -> None:
    regs = regs32(0x1_2345_6789, -1, 0, 0xFFFF_FFFF_0000_0001, 7, 8)
    assert regs == (0x23456789, 0xFFFFFFFF, 0, 1, 7, 8)


def test_threads_emit_concurrently_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tr = Tracer(path, domid=1, batch=64, max_buffered=100_000, flush_interval=0.01)

    def vcpu(n: int) -> None:
        for i in range(2000):
            tr.ioreq_send(n, 0, 0, 0x60, 1, 1, 1, i)

    threads = [threading.Thread(target=vcpu, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tr.close()
    trace = read(path)
    assert tr.dropped == 0
    assert len(trace.events) == 8000
    for n in range(4):
        assert [e.num("data") for e in trace.events if e.num("vcpu") == n] == list(range(2000))
    times = [e.t for e in trace.events]
    assert times == sorted(times)


def test_a_full_buffer_drops_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """A vCPU never waits for the disk: past max_buffered, events are dropped and counted,
    and the count ends up in the file."""
    gate = threading.Event()
    real_write = recorder._os_write

    def slow_write(fd: int, data: memoryview) -> int:
        gate.wait(10)
        return real_write(fd, data)

    path = tmp_path / "t.jsonl"
    tr = Tracer(path, domid=1, batch=10, max_buffered=50, flush_interval=0.01)
    monkeypatch.setattr(recorder, "_os_write", slow_write)
    for i in range(500):
        tr.dm_bufioreq(0, 0, 0x80, 1, i)
    dropped = tr.dropped
    assert dropped > 0
    # At most max_buffered wait in memory (one more batch may be stuck in the write).
    assert 0 < tr.buffered <= 50
    gate.set()
    tr.close()
    trace = read(path)
    kept = [e for e in trace.events if e.ev == "dm_bufioreq"]
    notes = [e for e in trace.events if e.ev == reader.DROPPED_EV]
    assert len(notes) == 1 and notes[0].num("count") == dropped == tr.dropped
    assert len(kept) + dropped == 500
    # What was kept is the oldest events, in order: a drop never reorders.
    assert [e.num("data") for e in kept] == list(range(len(kept)))


def test_disk_full_loses_whole_batches_and_says_so(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC: the failed batch is cut back off the file (never a torn line), counted,
    and once the disk has room again the file goes on, readable, with the count."""
    path = tmp_path / "t.jsonl"
    tr = Tracer(path, domid=1, flush_interval=60)
    real_write = recorder._os_write
    full = True

    def write(fd: int, data: memoryview) -> int:
        if full:
            # Half of it lands, then the disk is full: the worst case for the file.
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(recorder, "_os_write", write)
    for i in range(5):
        tr.dm_bufioreq(0, 0, 0x80, 1, i)
    tr.flush()
    assert tr.dropped == 5
    assert tr.error is not None and tr.error.errno == errno.ENOSPC
    read(path)  # still a valid file: the header and nothing torn
    full = False
    for i in range(5, 8):
        tr.dm_bufioreq(0, 0, 0x80, 1, i)
    tr.close()
    trace = read(path)
    assert [e.num("data") for e in trace.events if e.ev == "dm_bufioreq"] == [5, 6, 7]
    note = trace.events[-1]
    assert note.ev == reader.DROPPED_EV and note.num("count") == 5
    assert note.data["error"] == os.strerror(errno.ENOSPC)


def test_dev_full_never_raises_into_the_caller() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    tr = Tracer("/dev/full", domid=1)
    tr.dm_bufioreq(0, 0, 0x80, 1, 1)
    tr.close()
    assert tr.error is not None and tr.error.errno == errno.ENOSPC
    assert tr.dropped == 1


def test_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write trace file") as info:
        Tracer(tmp_path / "no" / "such" / "dir.jsonl", domid=1)
    assert info.value.path is not None and info.value.path.endswith("dir.jsonl")


def _file(tmp_path: Path, *lines: str, end: str = "\n") -> Path:
    path = tmp_path / "t.jsonl"
    header = json.dumps({"ev": "trace_start", "version": 1, "clock": "CLOCK_MONOTONIC",
                         "pid": 10, "domid": 1, "wall": 1.5, "t": 100})
    path.write_text("\n".join([header, *lines]) + end)
    return path


@pytest.mark.parametrize(("line", "why"), [
    ('{"t": 5, "ev": "vmport_send"', "bad line: invalid JSON at column"),
    ('[1, 2]', "bad line: not a JSON object"),
    ('{"ev": "vmport_send"}', 'bad line: no integer "t"'),
    ('{"t": 5, "ev": "vmport_send", "vcpu": 0, "sid": 0, "in": {}}',
     'bad line: vmport_send without "cmd"'),
    ('{"t": 5, "ev": "vmport_send", "vcpu": 0, "sid": 0, "cmd": "x", "in": {}}',
     'vmport_send: "cmd" must be an integer'),
    ('{"t": 5, "ev": "vmport_send", "vcpu": 0, "sid": 0, "cmd": 1, "in": {"eax": "1"}}',
     '"in" must be an object of integer registers'),
    ('{"t": true, "ev": "x"}', 'no integer "t"'),
])
def test_corrupt_lines_name_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    good = '{"t": 1, "ev": "trace_dropped", "count": 2}'
    path = _file(tmp_path, good, line, good)
    with pytest.raises(ConfigError) as info:
        read(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert why in str(info.value)


@pytest.mark.parametrize(("header", "why"), [
    ("", "empty"),
    ("garbage\n", "line 1 is not JSON"),
    ('{"ev": "vmport_send"}\n', 'line 1 is not a "trace_start" header'),
    ('{"ev": "trace_start", "version": 99}\n', "unsupported trace version 99"),
    ('{"ev": "trace_start", "version": 1, "pid": "x"}\n', "header needs integer"),
])
def test_not_a_trace_file(tmp_path: Path, header: str, why: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(header)
    with pytest.raises(ConfigError, match=why):
        read(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read trace file: No such file"):
        read(tmp_path / "nothing.jsonl")


def test_torn_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """What a killed process leaves: the events before it are still usable."""
    path = _file(tmp_path, '{"t": 1, "ev": "trace_dropped", "count": 2}',
                 '{"t": 2, "ev": "vmport_se', end="")
    with pytest.warns(TraceWarning, match="truncated last line"):
        trace = read(path)
    assert [e.ev for e in trace.events] == ["trace_dropped"]
    assert len(trace.warnings) == 1


def test_unknown_events_are_kept(tmp_path: Path) -> None:
    """A newer hvmport's event kinds do not make this reader refuse the file."""
    trace = read(_file(tmp_path, '{"t": 1, "ev": "something_new", "x": [1]}'))
    assert trace.events[0].ev == "something_new"


def test_merge_orders_processes_by_the_shared_clock(tmp_path: Path) -> None:
    main, part = tmp_path / "main.jsonl", tmp_path / "dm.jsonl"
    hv = Tracer(main, domid=1, role="hypervisor")
    dm = Tracer(part, domid=1, pid=4242, role="device-model")
    hv.vmport_send(0, 0, 40, REGS)
    dm.vmport_dm(0, 0, 40, REGS, REGS, dur=10)
    hv.ioreq_complete(0, 0, 9, 0, 20, cmd=40)
    dm.close()
    hv.close()
    assert merge(main, part) == 4
    trace = read(main)
    assert [e.ev for e in trace.events] == ["trace_part", "vmport_send", "vmport_dm",
                                            "ioreq_complete"]
    assert [e.pid for e in trace.events] == [4242, os.getpid(), 4242, os.getpid()]
    assert trace.processes() == {os.getpid(): ("hypervisor", 1), 4242: ("device-model", 1)}


def test_merge_refuses_a_bad_part_and_leaves_the_main_file(tmp_path: Path) -> None:
    main, part = tmp_path / "main.jsonl", tmp_path / "dm.jsonl"
    with Tracer(main, domid=1) as hv:
        hv.vmport_send(0, 0, 40, REGS)
    before = main.read_bytes()
    part.write_text("not a trace\n")
    with pytest.raises(ConfigError, match=r"dm\.jsonl:1"):
        merge(main, part)
    assert main.read_bytes() == before


def test_cli_says_what_is_wrong_with_a_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from hvmport.cli import main

    assert main(["trace", "summary", str(tmp_path / "missing.trace")]) == 2
    assert "configuration error" in capsys.readouterr().err
    bad = _file(tmp_path, '{"t": 1, "ev": "vmport_send", "vcpu": 0}')
    assert main(["trace", "summary", str(bad)]) == 2
    assert f'{bad}:2: bad line: vmport_send without "sid"' in capsys.readouterr().err
    good = _file(tmp_path, '{"t": 1, "ev": "trace_dropped", "count": 2}')
    assert main(["trace", "export", str(good), "--chrome",
                 str(tmp_path / "no" / "dir.json")]) == 2
    assert "cannot write Chrome trace" in capsys.readouterr().err
    assert main(["trace", "summary", str(good)]) == 0
    assert "WARNING: 2 events were dropped while recording" in capsys.readouterr().out


def test_run_trace_merges_parts_and_turns_problems_into_notes(tmp_path: Path) -> None:
    from hvmport.hv.tracing import RunTrace

    notes: list[str] = []
    main = tmp_path / "run.trace"
    rt = RunTrace.start(str(main), 1, str(tmp_path), notes.append)
    rt.tracer.vmport_send(0, 0, 40, REGS)
    with Tracer(rt.part(0), domid=1, pid=4242, role="device-model") as dm:
        dm.vmport_dm(0, 0, 40, REGS, REGS, dur=10)
    # A device model killed mid-line: its events before the cut still count.
    killed = Tracer(rt.part(1), domid=1, pid=4343, role="device-model")
    killed.vmport_dm(0, 0, 41, REGS, REGS, dur=10)
    killed.close()
    with open(killed.path, "a") as f:
        f.write('{"t": 1, "ev": "vmport_d')
    rt.part(2)  # never started: no file
    Path(rt.part(3)).write_text("garbage\n")
    rt.finish()
    trace = read(main)
    assert sorted(e.ev for e in trace.events) == [
        "trace_part", "trace_part", "vmport_dm", "vmport_dm", "vmport_send"]
    assert set(trace.processes()) == {os.getpid(), 4242, 4343}
    assert any("skipped a truncated last line" in n for n in notes)
    assert any("left out a device model's part" in n and "trace-dm3" in n for n in notes)
    assert notes[-1] == f"trace: 5 events in {main}"
