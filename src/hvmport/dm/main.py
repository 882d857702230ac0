"""The device-model process: ``python -m hvmport.dm --control PATH --domid N``.

It does what QEMU does as a Xen device model, in the same order: create an ioreq server
(BUFIOREQ_ATOMIC), map its pages as resource frames, claim its port ranges, enable it, read
each vCPU's event-channel port from its slot and bind it, then serve. The primary device
model serves the VMware port (vmport + vmmouse), the i8042 with a PS/2 keyboard and mouse,
and a 16550 UART at 0x3f8; ``--disable-vmport --ports A-B`` makes a secondary one that owns
only a port range of its own (scratch registers), beside the first.

It ends when the hypervisor goes away (its control socket closes), and asks the kernel to
end it if its parent dies first.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

from hvmport import atomic
from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.dm.client import DeviceModel, EventChannel
from hvmport.dm.devices.bus import PortBus
from hvmport.dm.devices.i8042 import I8042
from hvmport.dm.devices.mmio import MmioBus
from hvmport.dm.devices.scratch import MAX_SCRATCH, ScratchRegisters
from hvmport.dm.devices.uart import Uart16550
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.devices.vmport import Vmport, VmportProperties, VmportRegs
from hvmport.dm.ioreq_loop import IoreqLoop
from hvmport.dm.monitor import Monitor
from hvmport.dm.qmp_server import QmpServer
from hvmport.errors import ConfigError, HvmportError

PR_SET_PDEATHSIG = 1
BUFIOREQ = {"off": dmop.HVM_IOREQSRV_BUFIOREQ_OFF,
            "legacy": dmop.HVM_IOREQSRV_BUFIOREQ_LEGACY,
            "atomic": dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC}
I8042_PORTS = ((0x60, 0x60), (0x64, 0x64))
COM1 = (0x3F8, 0x3FF)
COM1_IRQ = 4


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _range(kind: str, last_allowed: int) -> Callable[[str], tuple[int, int]]:
    """An argparse type for "A-B" (or a single "A"), inclusive, at most 64 KiB long."""
    def parse(text: str) -> tuple[int, int]:
        try:
            first, _, last = text.partition("-")
            start, end = int(first, 0), int(last or first, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind} range: {text!r} (use A-B)") from None
        if not 0 <= start <= end <= last_allowed or end - start >= MAX_SCRATCH:
            raise argparse.ArgumentTypeError(f"bad {kind} range {text!r} (at most 64 KiB)")
        return start, end
    return parse


def _prop(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("on", "true", "yes"):
        return name, 1
    if lowered in ("off", "false", "no"):
        return name, 0
    try:
        return name, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: not a number or on/off: {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvmport-dm", description=__doc__.split("\n\n")[0])
    p.add_argument("--control", required=True, help="the hypervisor's control socket")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--ready-fd", type=int, help="write 'ready' here once serving")
    p.add_argument("--bufioreq", choices=sorted(BUFIOREQ), default="atomic")
    p.add_argument("--disable-vmport", action="store_true",
                   help="a secondary server: HVM_IOREQSRV_DISABLE_VMPORT, no platform devices")
    p.add_argument("--qemu-type", action="store_true",
                   help="receive VMWARE_PORT requests as QEMU's type 3 (hvmport extension)")
    p.add_argument("--ports", type=_range("port", 0xFFFF), action="append", default=[],
                   help="claim this port range with scratch registers (repeatable)")
    p.add_argument("--mmio", type=_range("MMIO", (1 << 64) - 1), action="append", default=[],
                   help="claim this guest-physical range (A-B) with scratch registers")
    p.add_argument("--vmport-prop", type=_prop, action="append", default=[],
                   metavar="NAME=VALUE", help="a QEMU vmport property, e.g. x-cmds-v2=off")
    p.add_argument("--uuid", default="00000000-0000-0000-0000-000000000000",
                   help="machine UUID for GETBIOSUUID")
    p.add_argument("--serial", default="-", metavar="-|none|FILE",
                   help="where the UART's output goes (default: stdout)")
    p.add_argument("--serial-input", default="none", metavar="none|fd:N",
                   help="bytes readable on this inherited descriptor arrive at the UART's "
                   "receiver (an interactive serial console)")
    p.add_argument("--qmp", metavar="PATH", help="serve QMP on this Unix socket")
    p.add_argument("--spin-us", type=float, default=100.0,
                   help="spin on the slots this long after work before blocking")
    return p


class DeviceModelProcess:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.domid: int = args.domid
        self.client = DeviceModel(args.control)
        self.client.restrict(self.domid)
        self.nr_vcpus = self.client.nr_vcpus(self.domid)
        self.bus = PortBus()
        self.mmio = MmioBus()
        self.vmport: Vmport | None = None
        self.vmmouse: Vmmouse | None = None
        self.i8042: I8042 | None = None
        self._irq_levels: dict[int, int] = {}
        self._serial = self._open_serial(args.serial)
        self.uart: Uart16550 | None = None
        self._serial_in = self._input_fd(args.serial_input)

    # ------------------------------------------------------------------ devices

    @staticmethod
    def _open_serial(where: str) -> BinaryIO | None:
        if where == "none":
            return None
        if where == "-":
            return os.fdopen(os.dup(1), "wb", buffering=0)
        return open(where.removeprefix("file:"), "ab", buffering=0)

    @staticmethod
    def _input_fd(where: str) -> int | None:
        if where == "none":
            return None
        if where.startswith("fd:") and where[3:].isdigit():
            # Left blocking (the flag would be shared with the user's terminal): the loop
            # reads only when select says the descriptor is readable.
            return int(where[3:])
        raise ConfigError(f"--serial-input {where!r}: use none or fd:N")

    def _serial_input(self, loop: IoreqLoop) -> bool:
        """Host bytes for the UART's receiver; at end of input, stop watching (the guest
        keeps running)."""
        assert self._serial_in is not None and self.uart is not None
        try:
            data = os.read(self._serial_in, 4096)
        except OSError:
            data = b""
        if not data:
            loop.watch.pop(self._serial_in, None)
            return True
        self.uart.feed(data)
        return True

    def _serial_out(self, data: bytes) -> None:
        if self._serial is not None:
            self._serial.write(data)

    def set_irq(self, line: int, level: int) -> None:
        if self._irq_levels.get(line) != level:
            self._irq_levels[line] = level
            self.client.set_isa_irq_level(self.domid, line, level)

    def build_devices(self, ram_size: int) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        if not self.args.disable_vmport:
            i8042 = I8042(self.set_irq)
            uart = Uart16550(self._serial_out, lambda level: self.set_irq(COM1_IRQ, level))
            for first, last in I8042_PORTS:
                self.bus.register(first, last, i8042, "i8042")
                ranges.append((first, last))
            self.bus.register(*COM1, uart, "uart")
            self.uart = uart
            ranges.append(COM1)
            props = VmportProperties.from_qemu(
                dict(self.args.vmport_prop), ram_size=ram_size,
                uuid=_uuid_bytes(self.args.uuid))
            self.vmport = Vmport(props)
            self.vmmouse = Vmmouse(self.vmport, i8042.fake_aux_movement)
            self.i8042 = i8042
        for first, last in self.args.ports:
            self.bus.register(first, last, ScratchRegisters(first, last), "scratch")
            ranges.append((first, last))
        for first, last in self.args.mmio:
            self.mmio.register(first, last, ScratchRegisters(first, last))
        return ranges

    def vmport_call(self, regs: list[int], is_write: bool, size: int) -> int:
        assert self.vmport is not None
        r = VmportRegs(*regs)
        value = self.vmport.handle(r, is_write, size)
        regs[:] = r.as_tuple()
        return value

    # ------------------------------------------------------------------ setup

    def start(self) -> IoreqLoop:
        c, domid, args = self.client, self.domid, self.args
        flags = BUFIOREQ[args.bufioreq]
        if args.disable_vmport:
            flags |= dmop.HVM_IOREQSRV_DISABLE_VMPORT
        if args.qemu_type:
            flags |= dmop.HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE
        sid = c.create_ioreq_server(domid, flags)
        guest = c.map_guest_memory(domid)
        ranges = self.build_devices(len(guest))
        buf_page = c.map_resource(domid, sid, 0)[0] if flags & 3 else None
        ioreq_page = c.map_resource(domid, sid, 1)[0]
        vmport_page = None
        if not args.disable_vmport:
            vmport_page = c.map_resource(
                domid, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT)[0]
        for first, last in ranges:
            c.map_io_range_to_ioreq_server(domid, sid, dmop.XEN_DMOP_IO_RANGE_PORT, first, last)
        for first, last in self.mmio.ranges():
            c.map_io_range_to_ioreq_server(domid, sid, dmop.XEN_DMOP_IO_RANGE_MEMORY, first,
                                           last)
        c.set_ioreq_server_state(domid, sid, True)
        # vp_eport appears in each slot once the server is enabled (QEMU's order).
        channels: list[EventChannel] = []
        for vcpu in range(self.nr_vcpus):
            off = vcpu * abi.IOREQ_SIZE + 24
            port = int.from_bytes(ioreq_page[off:off + 4], "little")
            channels.append(c.bind_interdomain(domid, port))
        buf_channel = None
        if buf_page is not None:
            info = c.get_ioreq_server_info(domid, sid)
            buf_channel = c.bind_interdomain(domid, info.bufioreq_port)
        vmport_types = (abi.IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT if args.qemu_type
                        else abi.IOREQ_TYPE_VMWARE_PORT,)
        loop = IoreqLoop(
            self.nr_vcpus, ioreq_page, channels, self.bus,
            vmport=self.vmport_call if self.vmport is not None else None,
            memory_devices=self.mmio,
            vmport_page=vmport_page, buf_page=buf_page, buf_channel=buf_channel,
            guest_memory=guest, vmport_types=vmport_types, spin_us=args.spin_us,
            add32=atomic.add32, watch={c.fileno(): self._hypervisor_gone},
        )
        if self._serial_in is not None and self.uart is not None:
            loop.watch[self._serial_in] = functools.partial(self._serial_input, loop)
        if args.qmp:
            self.qmp = QmpServer(args.qmp, Monitor(self.vmmouse, self.i8042).commands())
            loop.watch_providers.append(self.qmp.watch)
        return loop

    def _hypervisor_gone(self) -> bool:
        # The hypervisor never writes unprompted: readable means it closed the socket.
        return False


def _uuid_bytes(text: str) -> bytes:
    hexdigits = text.replace("-", "")
    try:
        raw = bytes.fromhex(hexdigits)
    except ValueError:
        raise ConfigError(f"--uuid {text!r} is not a UUID") from None
    if len(raw) != 16:
        raise ConfigError(f"--uuid {text!r} is not 16 bytes")
    return raw


def main(argv: Sequence[str] | None = None,
         ready: Callable[[], None] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _die_with_parent()
    try:
        dm = DeviceModelProcess(args)
        loop = dm.start()
    except HvmportError as e:
        print(f"hvmport-dm: {e.party} error: {e}", file=sys.stderr)
        return 2
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    if ready is not None:
        ready()
    with contextlib.suppress(KeyboardInterrupt):
        loop.run()
    return 0
