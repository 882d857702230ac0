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
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from hvmport import atomic
from hvmport.abi import dm_op as dmop
from hvmport.abi import ioreq as abi
from hvmport.abi import vmware as vm
from hvmport.dm.client import (
    VMPORT_TRANSPORTS,
    DeviceModel,
    EventChannel,
    vmport_frames,
    vmport_transport_flags,
)
from hvmport.dm.devices.bus import PortBus
from hvmport.dm.devices.guestrpc import GuestRpc
from hvmport.dm.devices.i8042 import I8042
from hvmport.dm.devices.mmio import MmioBus
from hvmport.dm.devices.scratch import MAX_SCRATCH, ScratchRegisters
from hvmport.dm.devices.uart import Uart16550
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.devices.vmport import Vmport, VmportProperties, VmportRegs
from hvmport.dm.ioreq_loop import IoreqLoop
from hvmport.dm.monitor import Monitor, guestinfo_commands
from hvmport.dm.qmp import Json
from hvmport.dm.qmp import event as qmp_event
from hvmport.dm.qmp_server import QmpServer
from hvmport.errors import ConfigError, HvmportError

if TYPE_CHECKING:
    from hvmport.trace.recorder import Tracer

PR_SET_PDEATHSIG = 1
BUFIOREQ = {"off": dmop.HVM_IOREQSRV_BUFIOREQ_OFF,
            "legacy": dmop.HVM_IOREQSRV_BUFIOREQ_LEGACY,
            "atomic": dmop.HVM_IOREQSRV_BUFIOREQ_ATOMIC}
I8042_PORTS = ((0x60, 0x60), (0x64, 0x64))
COM1 = (0x3F8, 0x3FF)
COM1_IRQ = 4
#: Console input is read from the host only while the UART holds fewer bytes than this.
CONSOLE_RX_ROOM = 256


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


def _machine(text: str) -> dict[str, str]:
    """``xenfv,vmport=on``: a machine type (ignored: there is one) and its options."""
    options: dict[str, str] = {}
    for i, part in enumerate(text.split(",")):
        name, eq, value = part.partition("=")
        if not eq:
            if i == 0:
                continue
            raise argparse.ArgumentTypeError(f"machine option {part!r}: expected NAME=VALUE")
        if name != "vmport" or value not in ("on", "off", "auto"):
            raise argparse.ArgumentTypeError(f"unsupported machine option {part!r} "
                                             "(vmport=on|off|auto)")
        options[name] = value
    return options


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
    p.add_argument("--vmport-transport", choices=list(VMPORT_TRANSPORTS),
                   default="regs-page",
                   help="how backdoor calls carry the guest's registers (hvmport extension; "
                        "default: v14's registers page)")
    p.add_argument("--ports", type=_range("port", 0xFFFF), action="append", default=[],
                   help="claim this port range with scratch registers (repeatable)")
    p.add_argument("--mmio", type=_range("MMIO", (1 << 64) - 1), action="append", default=[],
                   help="claim this guest-physical range (A-B) with scratch registers")
    p.add_argument("--vmport-prop", type=_prop, action="append", default=[],
                   metavar="NAME=VALUE", help="a QEMU vmport property, e.g. x-cmds-v2=off")
    p.add_argument("--uuid", default="00000000-0000-0000-0000-000000000000",
                   help="machine UUID for GETBIOSUUID")
    p.add_argument("--serial", default="-", metavar="-|none|FILE|fd:N",
                   help="where the UART's output goes (default: stdout); fd:N is an "
                   "inherited stream socket that also carries the console's input")
    p.add_argument("--serial-input", default="none", metavar="none|fd:N",
                   help="bytes readable on this inherited descriptor arrive at the UART's "
                   "receiver (an interactive serial console)")
    p.add_argument("--machine", type=_machine, default={},
                   metavar="TYPE[,vmport=on|off]",
                   help="machine options as libxl passes them to QEMU; vmport=off leaves "
                   "the VMware port (and vmmouse) to nobody")
    p.add_argument("--qmp", metavar="PATH", help="serve QMP on this Unix socket")
    p.add_argument("--guestinfo", type=_guestinfo, action="append", default=[],
                   metavar="KEY=VALUE", help="GuestRPC: set guestinfo.KEY (repeatable)")
    p.add_argument("--guestrpc", action=argparse.BooleanOptionalAction, default=True,
                   help="answer GuestRPC (backdoor command 30) (default on)")
    p.add_argument("--guestrpc-hb", action=argparse.BooleanOptionalAction, default=True,
                   help="offer GuestRPC's high-bandwidth port 0x5659 (default on)")
    p.add_argument("--stats-file", metavar="PATH",
                   help="write the GuestRPC counters here as JSON when the device model ends")
    p.add_argument("--spin-us", type=float, default=100.0,
                   help="spin on the slots this long after work before blocking")
    p.add_argument("--trace", metavar="FILE",
                   help="record trace events (docs/tracing.md) into FILE")
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
        self.guestrpc: GuestRpc | None = None
        self._irq_levels: dict[int, int] = {}
        self.uart: Uart16550 | None = None
        self.monitor: Monitor | None = None
        self.qmp: QmpServer | None = None
        #: A console stream socket (--serial fd:N): output and input both go through it.
        self._console: socket.socket | None = None
        self._serial: BinaryIO | None = None
        if args.serial.startswith("fd:"):
            self._console = _console_socket(args.serial)
        else:
            self._serial = self._open_serial(args.serial)
        self.serve_vmport = (not args.disable_vmport
                             and args.machine.get("vmport", "on") != "off")
        self.tracer: Tracer | None = None
        if args.trace:
            from hvmport.trace.recorder import Tracer

            self.tracer = Tracer(args.trace, domid=self.domid, role="device-model")
        # One host input for the UART: the console socket, or --serial-input's descriptor.
        self._input: int | None = None
        if self._console is not None:
            if args.serial_input != "none":
                raise ConfigError("--serial fd:N carries the input already; drop --serial-input")
            self._input = self._console.fileno()
        else:
            self._input = self._input_fd(args.serial_input)

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

    def _serial_out(self, data: bytes) -> None:
        if self._serial is not None:
            self._serial.write(data)
        elif self._console is not None:
            # A serial line with nobody listening loses bytes; the guest never waits.
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self._console.send(data)

    def _input_watch(self) -> dict[int, Callable[[], bool]]:
        # Read host input only while the UART has room, so that nothing typed is lost.
        if (self._input is None or self.uart is None
                or self.uart.rx_pending >= CONSOLE_RX_ROOM):
            return {}
        return {self._input: self._host_input}

    def _host_input(self) -> bool:
        """Host bytes for the UART's receiver; at end of input, stop reading (the guest
        keeps running)."""
        assert self._input is not None and self.uart is not None
        try:
            data = os.read(self._input, CONSOLE_RX_ROOM - self.uart.rx_pending)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            if self._console is not None and self._input == self._console.fileno():
                # The toolstack went away: no console any more, output included.
                self._console.close()
                self._console = None
            self._input = None
            return True
        self.uart.feed(data)
        return True

    def set_irq(self, line: int, level: int) -> None:
        if self._irq_levels.get(line) != level:
            self._irq_levels[line] = level
            self.client.set_isa_irq_level(self.domid, line, level)

    def _reboot(self) -> None:
        self.client.remote_shutdown(self.domid, dmop.SHUTDOWN_reboot)

    def build_devices(self, ram_size: int) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        if not self.args.disable_vmport:
            # The keyboard controller's reset line (Linux's reboot=k): the domain reboots.
            i8042 = I8042(self.set_irq, request_reset=self._reboot)
            uart = Uart16550(self._serial_out, lambda level: self.set_irq(COM1_IRQ, level))
            for first, last in I8042_PORTS:
                self.bus.register(first, last, i8042, "i8042")
                ranges.append((first, last))
            self.bus.register(*COM1, uart, "uart")
            self.uart = uart
            ranges.append(COM1)
            self.uart = uart
            self.i8042 = i8042
        if self.serve_vmport:
            assert self.i8042 is not None
            props = VmportProperties.from_qemu(
                dict(self.args.vmport_prop), ram_size=ram_size,
                uuid=_uuid_bytes(self.args.uuid))
            self.vmport = Vmport(props)
            self.vmmouse = Vmmouse(self.vmport, self.i8042.fake_aux_movement)
            if self.args.guestrpc:
                self.guestrpc = GuestRpc(dict(self.args.guestinfo),
                                         high_bandwidth=self.args.guestrpc_hb)
                self.vmport.register(vm.BDOOR_CMD_MESSAGE, self.guestrpc.message)
                if self.args.guestrpc_hb:
                    # Only string I/O reaches it: IN/OUT on 0x5659 stay the backdoor's.
                    ranges.append((vm.BDOORHB_PORT, vm.BDOORHB_PORT))
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
        if not self.serve_vmport:
            flags |= dmop.HVM_IOREQSRV_DISABLE_VMPORT
        if args.qemu_type:
            flags |= dmop.HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE
        transport = args.vmport_transport
        if self.serve_vmport:
            flags |= vmport_transport_flags(transport)
        sid = c.create_ioreq_server(domid, flags)
        guest = c.map_guest_memory(domid)
        ranges = self.build_devices(c.guest_ram_size)
        buf_page = c.map_resource(domid, sid, 0)[0] if flags & 3 else None
        ioreq_page = c.map_resource(domid, sid, 1)[0]
        vmport_pages = []
        frames = vmport_frames(transport, self.nr_vcpus)
        if self.serve_vmport and frames:
            vmport_pages = c.map_resource(
                domid, sid, dmop.HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT, frames)
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
            vmport_page=vmport_pages[0] if vmport_pages else None,
            more_vmport_pages=vmport_pages[1:],
            transport=VMPORT_TRANSPORTS[transport] if self.serve_vmport else 0,
            exchange=(_Exchange(c, domid) if transport == "three-exchange"
                      and self.serve_vmport else None),
            buf_page=buf_page, buf_channel=buf_channel,
            guest_memory=guest, vmport_types=vmport_types, spin_us=args.spin_us,
            add32=atomic.add32, watch={c.fileno(): self._hypervisor_gone},
            tracer=self.tracer, server_id=sid,
        )
        if self._input is not None:
            loop.watch_providers.append(self._input_watch)
        if self.guestrpc is not None and args.guestrpc_hb:
            loop.string_ports[vm.BDOORHB_PORT] = self.guestrpc.high_bandwidth_call
        if args.qmp:
            self.monitor = Monitor(self.vmmouse, self.i8042, machine=_Machine(c, domid),
                                   emit=self._emit)
            commands = self.monitor.commands()
            if self.guestrpc is not None:
                commands.update(guestinfo_commands(self.guestrpc.guestinfo,
                                                   self.guestrpc_stats))
            self.qmp = QmpServer(args.qmp, commands, after_reply=self.monitor.run_deferred)
            loop.watch_providers.append(self.qmp.watch)
        return loop

    def _emit(self, name: str, data: Json | None) -> None:
        if self.qmp is not None:
            self.qmp.broadcast(qmp_event(name, data))

    def guestrpc_stats(self) -> dict[str, object]:
        rpc = self.guestrpc
        if rpc is None:
            return {}
        s = rpc.stats
        return {"calls": {str(k): v for k, v in sorted(s.calls.items())}, "rpcs": s.rpcs,
                "hb-out": s.hb_out, "hb-in": s.hb_in, "rejected": s.rejected,
                "vmport-commands": {str(k): v for k, v in sorted(
                    self.vmport.commands.items())} if self.vmport is not None else {}}

    def write_stats(self) -> None:
        if self.args.stats_file:
            with open(self.args.stats_file, "w") as f:
                json.dump(self.guestrpc_stats(), f)

    def _hypervisor_gone(self) -> bool:
        # The hypervisor never writes unprompted: readable means it closed the socket,
        # which it does when the domain ends. QMP clients hear of it, as from QEMU.
        if self.monitor is not None:
            self.monitor.domain_gone()
        if self.qmp is not None:
            self.qmp.close()
        return False


class _DomainCalls:
    """Calls about one domain through the client library."""

    def __init__(self, client: DeviceModel, domid: int) -> None:
        self.client = client
        self.domid = domid


class _Machine(_DomainCalls):
    """QMP's stop/cont/system_powerdown/quit, as requests to the hypervisor."""

    def pause(self) -> None:
        self.client.pause(self.domid)

    def unpause(self) -> None:
        self.client.unpause(self.domid)

    def power_off(self) -> None:
        self.client.remote_shutdown(self.domid, dmop.SHUTDOWN_poweroff)


class _Exchange(_DomainCalls):
    """The three-exchange transport's fetch and store, through the client library."""

    def get(self, vcpu: int) -> tuple[int, abi.VmwareRegs]:
        return self.client.vmport_get_regs(self.domid, vcpu)

    def set(self, vcpu: int, regs: abi.VmwareRegs) -> None:
        self.client.vmport_set_regs(self.domid, vcpu, regs)


def _console_socket(spec: str) -> socket.socket:
    try:
        fd = int(spec[3:])
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--serial {spec}: not an inherited socket ({e})") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"--serial {spec}: not a stream socket")
    sock.setblocking(False)
    return sock


def _guestinfo(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.removeprefix("guestinfo."), value


def _uuid_bytes(text: str) -> bytes:
    hexdigits = text.replace("-", "")
    try:
        raw = bytes.fromhex(hexdigits)
    except ValueError:
        raise ConfigError(f"--uuid {text!r} is not a UUID") from None
    if len(raw) != 16:
        raise ConfigError(f"--uuid {text!r} is not 16 bytes")
    return raw


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None,
         ready: Callable[[], None] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _die_with_parent()
    if args.trace:
        # A SIGTERM (our parent died, or insisted) unwinds through the finally below, so
        # the events still buffered reach the trace file.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
    try:
        with contextlib.suppress(KeyboardInterrupt):
            loop.run()
        dm.write_stats()
    finally:
        if dm.tracer is not None:
            dm.tracer.close()
    return 0
