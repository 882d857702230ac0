"""A hostile guest and a hostile device model against the core, driven by hypothesis.

The primary server uses one of the four register transports (regs-page, ioreq-union,
gpr64, three-exchange), drawn per example, so every transport meets the same hostility.

Checked after every step: the host never raises; a crashed domain stays crashed with its
first reason; no access reaches a server that does not claim it; limits hold; the slot
state the hypervisor has seen never moves backwards.
"""

from __future__ import annotations

import contextlib
import errno

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.core import bufring, slots
from hvmport.core import dmop as ops
from hvmport.core.domain import RANGE_LIMITS, IoStatus, PageKind, Route
from hvmport.core.vmport import BackdoorRegs
from tests.coretools import EMULATOR, MAGIC, call, make_domain

VCPUS = 2
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
ports = st.one_of(
    st.sampled_from([0x5657, 0x5658, 0x5658, 0x5658, 0x5659, 0x565A, 0x565B, 0xCF8, 0xCFC,
                     0xCFE, 0x60, 0x64, 0x3F8, 0x3F9, 0x80]),
    st.integers(0, 0xFFFF),
)
rax_values = st.one_of(st.just(MAGIC), u64, st.builds(lambda hi: hi << 32 | MAGIC, u32))
rcx_values = st.one_of(st.sampled_from([1, 10, 17, 23, 30, 39, 40, 41, 45, 46, 68, 0xFFFF000A]),
                       u64)
range_types = st.sampled_from([0, 1, 2, 7, 9, 3, 8, 255])
callers = st.sampled_from([EMULATOR, EMULATOR, EMULATOR, 5])
server_ids = st.one_of(st.integers(0, 1), st.integers(0, 9))
ALLOWED_RC = {0, -errno.EINVAL, -errno.ENOENT, -errno.EPERM, -errno.EEXIST, -errno.ENOSPC,
              -errno.ENOMEM, -errno.EFAULT, -errno.EOPNOTSUPP}


class HostileWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d, self.pages = make_domain(vcpus=VCPUS)
        self.crash_reason: str | None = None
        self.last_state = [abi.STATE_IOREQ_READY] * VCPUS

    # ------------------------------------------------------------- device model: dm_op

    @initialize(gfns=st.booleans(), second=st.booleans(), transport=st.integers(0, 3),
                qemu_type=st.booleans())
    def realistic_servers(self, gfns: bool, second: bool, transport: int,
                          qemu_type: bool) -> None:
        """Start like a real device model would, so that forwarding is exercised."""
        flags = (dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC
                 | transport << dmop.HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT
                 | (dmop.HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE if qemu_type else 0))
        sid = self._server(flags, gfns, [(0x60, 0x64), (0x3F8, 0x3FF), (0xCF8, 0xCFF)])
        pci = call(self.d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_PCI, 0, 0xFF)).rc
        assert pci == 0
        if second:
            self._server(dmop.HVM_IOREQSRV_BUFIOREQ_OFF | dmop.HVM_IOREQSRV_DISABLE_VMPORT,
                         False, [(0x5659, 0x565A), (0x80, 0x80)])

    def _server(self, flags: int, gfns: bool, ranges: list[tuple[int, int]]) -> int:
        r = call(self.d, ops.create_ioreq_server(flags))
        assert r.rc == 0
        sid = dmop.CREATE.unpack_from(r.out, 8)[2]
        if gfns:
            assert call(self.d, ops.get_ioreq_server_info(sid)).rc == 0
        for start, end in ranges:
            assert call(self.d, ops.map_io_range(sid, dmop.XEN_DMOP_IO_RANGE_PORT, start,
                                                 end)).rc == 0
        assert call(self.d, ops.set_ioreq_server_state(sid, True)).rc == 0
        return sid

    def _rc(self, rc: int) -> None:
        assert rc in ALLOWED_RC, rc

    @rule(flags=st.integers(0, 255), caller=callers)
    def create(self, flags: int, caller: int) -> None:
        before = len(self.d.servers)
        r = call(self.d, ops.create_ioreq_server(flags), caller)
        self._rc(r.rc)
        if flags & ~0x3F or (flags & 3) == 3:
            assert r.rc == -errno.EINVAL and len(self.d.servers) == before

    @rule(raw=st.binary(max_size=40), caller=callers)
    def raw_dm_op(self, raw: bytes, caller: int) -> None:
        self._rc(call(self.d, raw, caller).rc)

    @rule(sid=server_ids, rtype=range_types, start=u64, length=st.integers(-2, 300),
          caller=callers, unmap=st.booleans())
    def ranges(self, sid: int, rtype: int, start: int, length: int, caller: int,
               unmap: bool) -> None:
        if rtype in (7, 9) and length % 3 == 0:
            start, length = 1, 0
        end = min(start + length, 2**64 - 1) if length >= 0 else start - 1
        end = max(end, 0)
        enc = ops.unmap_io_range if unmap else ops.map_io_range
        self._rc(call(self.d, enc(sid, rtype, start, end), caller).rc)

    @rule(sid=server_ids, enabled=st.booleans(), caller=callers)
    def set_state(self, sid: int, enabled: bool, caller: int) -> None:
        self._rc(call(self.d, ops.set_ioreq_server_state(sid, enabled), caller).rc)

    @rule(sid=server_ids, caller=callers)
    def destroy(self, sid: int, caller: int) -> None:
        self._rc(call(self.d, ops.destroy_ioreq_server(sid), caller).rc)

    @rule(sid=server_ids, no_gfns=st.booleans(), caller=callers)
    def get_info(self, sid: int, no_gfns: bool, caller: int) -> None:
        self._rc(call(self.d, ops.get_ioreq_server_info(sid, int(no_gfns)), caller).rc)

    @rule(sid=server_ids, frame=st.sampled_from([0, 1, 2, 0x100, 0x101, 0x102, 7]),
          caller=callers)
    def acquire(self, sid: int, frame: int, caller: int) -> None:
        rc, view = self.d.acquire_resource(caller, sid, frame)
        self._rc(rc)
        assert (rc == 0) == (view is not None)

    # ------------------------------------------------------------- device model: pages

    @rule(sid=server_ids, kind=st.sampled_from(list(PageKind)),
          offset=st.one_of(st.integers(0, 63), st.integers(0, 4095)),
          data=st.binary(min_size=1, max_size=16))
    def scribble(self, sid: int, kind: PageKind, offset: int, data: bytes) -> None:
        server = self.d.servers.get(sid)
        if server is None or kind not in server.pages:
            return
        view = server.pages[kind].view
        data = data[:4096 - offset]
        view[offset:offset + len(data)] = data

    @rule(sid=server_ids, vcpu=st.integers(0, VCPUS - 1), state=st.integers(0, 15))
    def set_slot_state(self, sid: int, vcpu: int, state: int) -> None:
        """XSA-262-style: any state, any time, including backwards."""
        server = self.d.servers.get(sid)
        if server is not None and PageKind.IOREQ in server.pages:
            view = server.pages[PageKind.IOREQ].view
            off = slots.slot_offset(vcpu) + abi.IOREQ_STATE_BYTE
            view[off] = (view[off] & 0xF0) | state

    @rule(sid=server_ids, vcpu=st.integers(0, VCPUS - 1),
          offset=st.sampled_from([0, 8, 16, 20, 24, 30, 31]), xor=st.integers(1, 255))
    def rewrite_slot_field(self, sid: int, vcpu: int, offset: int, xor: int) -> None:
        server = self.d.servers.get(sid)
        if server is not None and PageKind.IOREQ in server.pages:
            server.pages[PageKind.IOREQ].view[slots.slot_offset(vcpu) + offset] ^= xor

    @rule(sid=server_ids, vcpu=st.integers(0, VCPUS - 1), data=u64,
          vmregs=st.tuples(u32, u32, u32, u32, u32), wide=st.tuples(u64, u64, u32, u32))
    def honest_answer(self, sid: int, vcpu: int, data: int,
                      vmregs: tuple[int, int, int, int, int],
                      wide: tuple[int, int, int, int]) -> None:
        server = self.d.servers.get(sid)
        if server is None or PageKind.IOREQ not in server.pages:
            return
        view = server.pages[PageKind.IOREQ].view
        req = slots.take(view, vcpu)
        if req is None:
            return
        event(f"answered type {req.type} transport {server.transport}")
        if req.type in (abi.IOREQ_TYPE_VMWARE_PORT, abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT):
            if server.transport == dmop.HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION:
                slots.respond_fields(view, vcpu, *wide[:1], data, *wide[2:])
                return
            if PageKind.VMPORT in server.pages:
                vp = server.pages[PageKind.VMPORT].view
                if server.transport == dmop.HVMPORT_VMPORT_TRANSPORT_GPR64:
                    off = vcpu * abi.VMPORT_GPR64_ENTRY_SIZE
                    vp[off:off + 128] = abi.pack_gpr64((data, *wide[:2], *vmregs, *wide,
                                                        *vmregs[:3]))
                else:
                    off = vcpu * abi.VMWARE_REGS_SIZE
                    vp[off:off + 20] = abi.VmwareRegs(*vmregs).pack()
        elif req.type == abi.IOREQ_TYPE_PIO and 0x5658 <= req.addr <= 0x565B:
            # A three-exchange device model fetches and stores; refusals are errnos.
            rc, raw = self.d.vmport_get_regs(EMULATOR, vcpu)
            self._rc(rc)
            assert (rc == 0) == (len(raw) == 24)
            self._rc(self.d.vmport_set_regs(EMULATOR, vcpu, abi.VmwareRegs(*vmregs).pack()))
        slots.respond(view, vcpu, data)

    @rule(vcpu=st.integers(-1, VCPUS), caller=callers, raw=st.binary(max_size=24))
    def exchange(self, vcpu: int, caller: int, raw: bytes) -> None:
        """The three-exchange calls, at any time, from anyone, with any bytes."""
        rc, got = self.d.vmport_get_regs(caller, vcpu)
        self._rc(rc)
        assert (rc == 0) == (len(got) == 24)
        self._rc(self.d.vmport_set_regs(caller, vcpu, raw))

    @rule(sid=server_ids)
    def drain_ring(self, sid: int) -> None:
        server = self.d.servers.get(sid)
        if server is None or PageKind.BUFIOREQ not in server.pages:
            return
        # ValueError is the device model's own view of a ring it scribbled on.
        with contextlib.suppress(ValueError):
            bufring.Consumer(server.pages[PageKind.BUFIOREQ].view).drain()

    # ------------------------------------------------------------- guest

    @rule(vcpu=st.integers(0, VCPUS - 1), port=ports, size=st.sampled_from([1, 2, 4]),
          is_write=st.booleans(), value=u32, rax=rax_values, rcx=rcx_values,
          rbx=u64, cpl=st.sampled_from([0, 3]))
    def guest_pio(self, vcpu: int, port: int, size: int, is_write: bool, value: int,
                  rax: int, rcx: int, rbx: int, cpl: int) -> None:
        r = BackdoorRegs(rax, rbx, rcx, 0x5658, 0, 0, (rbx,) * 9 if rbx & 1 else ())
        if self.d.pending[vcpu] is not None:
            self._poll(vcpu, r)
            return
        res = self.d.pio(vcpu, port, size, is_write, value, r, cpl)
        if res.status is IoStatus.WAIT:
            assert res.server is not None
            server = self.d.servers[res.server]
            assert server.enabled
            pending = self.d.pending[vcpu]
            assert pending is not None
            if pending.vmport:
                assert server.ranges[dmop.XEN_DMOP_IO_RANGE_VMWARE_PORT].contains_point(1)
                assert server.vmport_enabled
                assert (PageKind.VMPORT in server.pages) == (server.vmport_frames > 0)
                assert port + size <= 0x565C and port >= 0x5658
            elif res.ioreq_type == abi.IOREQ_TYPE_PCI_CONFIG:
                sbdf = (self.d.pci_cf8 >> 8) & 0xFFFF
                assert server.ranges[dmop.XEN_DMOP_IO_RANGE_PCI].contains_point(sbdf)
            else:
                assert res.ioreq_type == abi.IOREQ_TYPE_PIO
                assert server.ranges[dmop.XEN_DMOP_IO_RANGE_PORT].contains(port, port + size - 1)
            self.last_state[vcpu] = abi.STATE_IOREQ_READY
        elif res.status is IoStatus.DONE and not is_write:
            assert res.value is not None and res.value < (1 << (8 * size))
            if res.route in (Route.NULL, Route.IGNORED):
                assert res.value == (1 << (8 * size)) - 1

    @rule(vcpu=st.integers(0, VCPUS - 1), cmd=st.sampled_from([30, 39, 40, 41, 45]),
          port=st.sampled_from([0x5658, 0x5658, 0x5659, 0x565A]), is_write=st.booleans(),
          rbx=u64)
    def guest_backdoor(self, vcpu: int, cmd: int, port: int, is_write: bool,
                       rbx: int) -> None:
        """A call the device model answers, so that every transport carries registers."""
        self.guest_pio(vcpu, port, 4 if port == 0x5658 else 1, is_write, MAGIC, MAGIC, cmd,
                       rbx, 0)

    @precondition(lambda self: any(p is not None for p in self.d.pending))
    @rule(vcpu=st.integers(0, VCPUS - 1))
    def poll(self, vcpu: int) -> None:
        if self.d.pending[vcpu] is not None:
            self._poll(vcpu, BackdoorRegs(MAGIC, 0, 0, 0, 0, 0))

    def _poll(self, vcpu: int, r: BackdoorRegs) -> None:
        pending = self.d.pending[vcpu]
        assert pending is not None
        res = self.d.poll(vcpu, r)
        if res.status is IoStatus.WAIT:
            seen = pending.waiter.prev_state
            assert seen >= self.last_state[vcpu]
            self.last_state[vcpu] = seen
        elif res.status is IoStatus.DONE:
            if res.value is not None:
                # pending.req.size is EDI in an ioreq-union request: use the access's size.
                assert res.value < (1 << (8 * pending.access[1]))
            if res.regs is not None and not pending.vmport:
                raise AssertionError("registers changed by a request that carried none")

    @rule(sid=server_ids, addr=st.integers(0, 0x1FFFFF), size=st.sampled_from([1, 2, 4, 8]),
          data=u64)
    def buffered(self, sid: int, addr: int, size: int, data: int) -> None:
        self.d.send_buffered(sid, abi.IOREQ_TYPE_PIO, addr, size, data)

    # ------------------------------------------------------------- invariants

    @invariant()
    def crash_is_forever(self) -> None:
        if self.crash_reason is not None:
            assert self.d.crash_info is not None and self.d.crash_info.reason == self.crash_reason
        elif self.d.crash_info is not None:
            assert self.d.crash_info.reason
            self.crash_reason = self.d.crash_info.reason

    @invariant()
    def limits_hold(self) -> None:
        assert len(self.d.servers) <= dmop.MAX_NR_IOREQ_SERVERS
        for server in self.d.servers.values():
            for rtype, rs in server.ranges.items():
                assert len(rs) <= RANGE_LIMITS[rtype]
                if rtype in (7, 9):
                    assert rs.ranges() in ([], [(1, 1)])
            if not server.vmport_enabled:
                assert PageKind.VMPORT not in server.pages

    @invariant()
    def enabled_gfn_pages_are_hidden(self) -> None:
        for server in self.d.servers.values():
            for p in server.pages.values():
                if p.gfn is not None:
                    assert self.pages.guest_visible(p.gfn) is not server.enabled


TestHostileWorld = HostileWorld.TestCase
TestHostileWorld.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
