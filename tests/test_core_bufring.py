"""The buffered ring: producer, consumer, pointer validation, LEGACY vs ATOMIC."""

from __future__ import annotations

import struct

import pytest

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import bufring
from hvmport.core.bufring import Consumer, Producer, Send
from hvmport.core.domain import PageKind
from tests.coretools import enabled_server, make_domain, page

ATOMIC = dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC
LEGACY = dmop.HVM_IOREQSRV_BUFIOREQ_LEGACY


def _ring(mode: int = ATOMIC) -> tuple[Producer, Consumer, bytearray]:
    buf = bytearray(4096)
    return Producer(memoryview(buf), mode), Consumer(memoryview(buf)), buf


def _ptrs(buf: bytearray) -> tuple[int, int]:
    rp, wp = struct.unpack_from("<II", buf)
    return rp, wp


def test_round_trip_including_eight_bytes_in_two_slots() -> None:
    prod, cons, buf = _ring()
    assert prod.send(abi.IOREQ_TYPE_PIO, 0x3F8, 1, 0x41).status is Send.QUEUED
    assert prod.send(abi.IOREQ_TYPE_TIMEOFFSET, 0, 8, 0x1122334455667788).status is Send.QUEUED
    assert _ptrs(buf) == (0, 3)
    got = cons.drain()
    assert got == [bufring.BufferedWrite(abi.IOREQ_TYPE_PIO, 0x3F8, 1, 0x41),
                   bufring.BufferedWrite(abi.IOREQ_TYPE_TIMEOFFSET, 0, 8, 0x1122334455667788)]
    assert _ptrs(buf) == (3, 3)
    assert cons.drain() == []


@pytest.mark.parametrize(("addr", "size", "is_write", "count"), [
    (0x100000, 1, True, 1),  # above 20 bits
    (0x80, 1, False, 1),  # a read
    (0x80, 1, True, 2),  # a repeat
    (0x80, 3, True, 1),  # an odd size
])
def test_unbufferable_requests_go_synchronously(addr: int, size: int, is_write: bool,
                                                count: int) -> None:
    prod, _, buf = _ring()
    res = prod.send(abi.IOREQ_TYPE_PIO, addr, size, 0, is_write=is_write, count=count)
    assert res.status is Send.UNBUFFERABLE
    assert _ptrs(buf) == (0, 0)


def test_full_ring() -> None:
    prod, cons, _ = _ring()
    for i in range(511):
        assert prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, i & 0xFF).status is Send.QUEUED
    assert prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 0).status is Send.FULL
    assert len(cons.drain()) == 511
    # An 8-byte write needs two free slots.
    for _ in range(510):
        prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 0)
    assert prod.send(abi.IOREQ_TYPE_PIO, 0x80, 8, 0).status is Send.FULL
    assert prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 0).status is Send.QUEUED


def test_atomic_mode_keeps_pointers_small() -> None:
    prod, cons, buf = _ring(ATOMIC)
    for i in range(5000):
        prod.send(abi.IOREQ_TYPE_PIO, 0x80, 2, i & 0xFFFF)
        if i % 7 == 0:
            cons.drain()
    cons.drain()
    rp, wp = _ptrs(buf)
    assert rp == wp
    assert rp < 2 * 511


def test_legacy_mode_lets_pointers_run() -> None:
    prod, cons, buf = _ring(LEGACY)
    for _ in range(2000):
        prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 1)
        cons.drain()
    assert _ptrs(buf) == (2000, 2000)


def test_values_survive_canonicalisation_across_the_wrap() -> None:
    prod, cons, _ = _ring(ATOMIC)
    seen: list[int] = []
    for i in range(3000):
        prod.send(abi.IOREQ_TYPE_PIO, 0x80, 4, i)
        if i % 3 == 2:
            seen += [w.data for w in cons.drain()]
    seen += [w.data for w in cons.drain()]
    assert seen == list(range(3000))


def test_device_model_corrupting_write_pointer_is_caught() -> None:
    prod, _, buf = _ring()
    prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 1)
    struct.pack_into("<I", buf, 4, 400)
    res = prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 1)
    assert res.status is Send.CORRUPT and "write_pointer" in res.reason


def test_device_model_corrupting_read_pointer_is_caught() -> None:
    prod, _, buf = _ring(LEGACY)
    prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 1)
    struct.pack_into("<I", buf, 0, 0xFFFF0000)  # "read" far beyond what was written
    res = prod.send(abi.IOREQ_TYPE_PIO, 0x80, 1, 1)
    assert res.status is Send.CORRUPT and "read_pointer" in res.reason


def test_consumer_refuses_nonsense_pointers() -> None:
    _, cons, buf = _ring()
    struct.pack_into("<II", buf, 0, 0, 600)
    with pytest.raises(ValueError, match="out of range"):
        cons.drain()


def test_domain_crashes_when_its_ring_is_corrupted() -> None:
    d, _ = make_domain()
    sid = enabled_server(d)
    status, port = d.send_buffered(sid, abi.IOREQ_TYPE_PIO, 0x80, 1, 5)
    assert status is Send.QUEUED and port == d.servers[sid].buf_port
    struct.pack_into("<I", page(d, sid, PageKind.BUFIOREQ), 4, 77)
    status, port = d.send_buffered(sid, abi.IOREQ_TYPE_PIO, 0x80, 1, 5)
    assert status is Send.CORRUPT and port is None
    assert d.crashed and "write_pointer" in d.crash_info.reason  # type: ignore[union-attr]


def test_timeoffset_broadcast_reaches_buffered_servers() -> None:
    d, _ = make_domain()
    a = enabled_server(d)
    enabled_server(d, dmop.HVM_IOREQSRV_BUFIOREQ_OFF | dmop.HVM_IOREQSRV_DISABLE_VMPORT)
    ports = d.broadcast_timeoffset(-7200)
    assert ports == [d.servers[a].buf_port]
    got = Consumer(page(d, a, PageKind.BUFIOREQ)).drain()
    assert got == [bufring.BufferedWrite(abi.IOREQ_TYPE_TIMEOFFSET, 0, 8,
                                         (-7200) & 0xFFFFFFFFFFFFFFFF)]
    assert d.platform.time_offset_s == -7200
