"""The ``hvmport`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hvmport import __version__
from hvmport.errors import ConfigError, HvmportError


def _cmd_abi(args: argparse.Namespace) -> int:
    from hvmport.abi import catalog

    if args.json:
        json.dump(catalog.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(catalog.to_table())
    return 0


def _int(text: str) -> int:
    """Decimal, 0x-hex or 0o-octal, as users write addresses."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _cmd_run(args: argparse.Namespace) -> int:
    import os
    import shlex
    from pathlib import Path

    from hvmport.cpu.base import Mode
    from hvmport.hv import emulate
    from hvmport.hv.run import Image, RunConfig, run

    program = _program(args)
    if program is not None or (args.kernel is None and args.backend == "user"):
        kernel = Path("/")
    elif args.kernel is None:
        from hvmport import guests

        if args.mode is not None:
            raise ConfigError("--mode needs --kernel")
        kernel = guests.guest_path("demo", "multiboot")
    else:
        kernel = Path(args.kernel)
    mode = None if args.mode is None else Mode(args.mode)
    load_addr = args.load_addr
    if load_addr is None:
        load_addr = 0x10000 if mode is Mode.REAL16 else 0x100000
    console_file = None
    if args.debugcon == "-":
        console = sys.stdout.buffer
    else:
        console_file = open(args.debugcon, "wb")  # noqa: SIM115 - closed below
        console = console_file
    # --console-input: our stdin reaches the guest's UART (the device model reads a copy).
    serial_in = os.dup(sys.stdin.fileno()) if args.console_input else None
    config = RunConfig(
        Image(kernel, mode, load_addr, args.cmdline,
              Path(args.ramdisk) if args.ramdisk else None), backend=args.backend,
        memory_mib=args.memory, vcpus=args.vcpus, vmware_port=args.vmware_port,
        vmware_hwver=args.vmware_hwver, smp_entry=args.smp_entry, timeout=args.timeout,
        console=console, note=lambda text: print(f"hvmport: {text}", file=sys.stderr),
        device_model=args.vmware_port if args.device_model is None else args.device_model,
        dm_args=[["--serial", args.serial, *(["--qmp", args.qmp] if args.qmp else []),
                   *(f"--guestinfo={kv}" for kv in args.guestinfo),
                   *([] if args.guestrpc_hb else ["--no-guestrpc-hb"]),
                   # Only when asked: a --dm-program need not know these options.
                   *([f"--vmport-prop=vmware-vmx-version={args.vmware_version}"]
                     if args.vmware_version != 6 else []),
                   *([f"--vmport-prop=vmware-vmx-type={args.vmware_vmx_type}"]
                     if args.vmware_vmx_type != 2 else []),
                   *([f"--serial-input=fd:{serial_in}"] if serial_in is not None else []),
                   *args.dm_arg]]
        + [["--disable-vmport", "--bufioreq", "off", "--serial", "none", "--ports", ports]
           for ports in args.secondary_dm],
        spin_us=args.spin_us, dm_timeout=args.dm_timeout,
        dm_program=shlex.split(args.dm_program) if args.dm_program else None,
        trace=args.trace,
        program=program, vmware_port_ring3=args.vmware_port_ring3,
        vmware_version=args.vmware_version, vmware_vmx_type=args.vmware_vmx_type,
        full_cpu=args.full_cpu,
        dm_pass_fds=(serial_in,) if serial_in is not None else (),
    )
    try:
        result = run(config)
    finally:
        if console_file is not None:
            console_file.close()
        if serial_in is not None:
            os.close(serial_in)
    is_debug_exit = result.status & 1
    if program is not None:
        from hvmport.cpu.user import is_program_end

        # The program's own exit status is the run's; it said what it had to say.
        is_debug_exit = is_debug_exit or is_program_end(result.reason)
    if result.status != emulate.STATUS_HALTED and not is_debug_exit:
        print(f"hvmport: {result.reason}", file=sys.stderr)
    return result.status


def _key_value(text: str) -> str:
    key, eq, _ = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _program(args: argparse.Namespace) -> list[str] | None:
    """The program after ``--`` for ``--backend user``."""
    program: list[str] = list(args.program or [])
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        return None
    if args.backend != "user":
        raise ConfigError("a program after -- runs only with --backend user")
    if args.kernel is not None:
        raise ConfigError("--backend user runs a program, not --kernel")
    return program


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hvmport import benchmark

    def progress(text: str) -> None:
        if not args.json:
            print(f"hvmport bench: {text}", file=sys.stderr, flush=True)

    only = set(args.only.split(",")) if args.only else None
    res = benchmark.run_benchmarks(quick=args.quick, progress=progress, only=only)
    if args.json:
        json.dump(res.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(benchmark.table(res))
    if args.plot:
        benchmark.plot(res, Path(args.plot))
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from hvmport.toolstack import xl

    words: list[str] = list(args.words)
    cfg = None
    if words and "=" not in words[0]:
        cfg = words.pop(0)
    if cfg is None and not words:
        raise ConfigError("create needs a config file (and/or KEY=VALUE settings)")
    return xl.create(cfg, words, paused=args.paused, foreground=args.foreground,
                     console=args.console, trace=args.trace)


def _cmd_list(args: argparse.Namespace) -> int:
    from hvmport.toolstack import xl

    return xl.list_domains(args.domains, long=args.long)


def _cmd_domain(args: argparse.Namespace) -> int:
    from hvmport.toolstack import xl

    verbs = {"destroy": xl.destroy, "pause": xl.pause, "unpause": xl.unpause,
             "console": xl.console_attach}
    return verbs[args.command](args.domain)


def _add_toolstack(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    create = sub.add_parser(
        "create", help="create a domain from an xl.cfg file (returns once it runs)",
        description="Create a domain from an xl.cfg file, like xl create. KEY=VALUE words "
        "after the file override or add settings. The domain runs in the background (its "
        "monitor process stays) unless -F; see docs/xl-cfg.md for the options.")
    create.add_argument("words", nargs="*", metavar="CFG [KEY=VALUE ...]")
    create.add_argument("-c", dest="console", action="store_true",
                        help="attach to the console once the domain runs")
    create.add_argument("-p", dest="paused", action="store_true",
                        help="leave the domain paused (hvmport unpause starts it)")
    create.add_argument("-F", dest="foreground", action="store_true",
                        help="stay in the foreground until the domain ends; exit with its "
                        "status")
    create.add_argument("--trace", metavar="FILE",
                        help="record the domain's I/O trace to FILE")
    create.set_defaults(func=_cmd_create)
    lst = sub.add_parser("list", help="list domains (Name ID Mem VCPUs State Time(s))",
                         description="List the domains: state letters r(unning) b(locked) "
                         "p(aused) s(hutdown) c(rashed) d(ying), as xl list.")
    lst.add_argument("-l", dest="long", action="store_true",
                     help="JSON, with each domain's sockets (qmp, console) and config")
    lst.add_argument("domains", nargs="*", metavar="DOMAIN")
    lst.set_defaults(func=_cmd_list)
    for verb, text in (("destroy", "end a domain at once; nothing is left behind"),
                       ("pause", "stop a domain's vCPUs"),
                       ("unpause", "let a paused domain's vCPUs run"),
                       ("console", "attach to a domain's serial console (Ctrl-] detaches)")):
        p = sub.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("domain", metavar="DOMAIN", help="domain name or id")
        p.set_defaults(func=_cmd_domain)


def _cmd_trace_summary(args: argparse.Namespace) -> int:
    from hvmport.trace import reader, summary

    result = summary.summarize(reader.read(args.file))
    if args.json:
        json.dump(result.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.table())
    return 0


def _cmd_trace_export(args: argparse.Namespace) -> int:
    from hvmport.trace import chrome, reader

    count = chrome.write(reader.read(args.file), args.chrome)
    print(f"hvmport: {count} trace events written to {args.chrome}", file=sys.stderr)
    return 0


def _add_trace_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trace = sub.add_parser("trace", help="summarise or export a trace file (run --trace)",
                           description="Read a trace file written by `hvmport run --trace "
                           "FILE` (format: docs/tracing.md).")
    verbs = trace.add_subparsers(dest="trace_command", metavar="VERB")
    verbs.required = True
    summ = verbs.add_parser("summary", help="counts and latency percentiles per command and "
                            "per server", description="Counts and latency percentiles "
                            "(p50/p90/p99/max) per backdoor command and per ioreq server.")
    summ.add_argument("file", metavar="FILE")
    summ.add_argument("--json", action="store_true", help="machine-readable output")
    summ.set_defaults(func=_cmd_trace_summary)
    export = verbs.add_parser("export", help="write a timeline for Perfetto / chrome://tracing",
                              description="Convert a trace to the Chrome trace event format "
                              "(JSON), which Perfetto and chrome://tracing open.")
    export.add_argument("file", metavar="FILE")
    export.add_argument("--chrome", required=True, metavar="OUT.json",
                        help="where to write the Chrome trace")
    export.set_defaults(func=_cmd_trace_export)


def _cmd_guest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hvmport import linuxguest

    progress = linuxguest.Progress(sys.stderr, quiet=args.json)
    guest = linuxguest.build(Path(args.cache) if args.cache else None, progress)
    if args.json:
        json.dump(guest.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"kernel   {guest.vmlinux}  ({guest.kernel_package} {guest.kernel_version})")
        print(f"bzImage  {guest.bzimage}")
        print(f"initrd   {guest.initrd}  (busybox-static {guest.busybox_version})")
        print(f"cmdline  {guest.cmdline}")
        print(f"run it:  hvmport run --backend unicorn --memory 256 --kernel {guest.vmlinux} "
              f"--ramdisk {guest.initrd} --cmdline '{guest.cmdline}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvmport",
        description="Xen-style ioreq servers with IOREQ_TYPE_VMWARE_PORT on KVM or Unicorn.",
    )
    parser.add_argument("--version", action="version", version=f"hvmport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    abi = sub.add_parser("abi", help="print the public ABI (structs, fields, constants)",
                         description="Print Xen's public ABI as hvmport implements it.")
    abi.add_argument("--json", action="store_true",
                     help="machine-readable: {structs: {NAME: {size, fields}}, constants}")
    abi.set_defaults(func=_cmd_abi)

    run = sub.add_parser(
        "run", help="run a guest (default: the built-in backdoor demo)",
        description="Run a Multiboot ELF kernel or a flat binary on KVM or Unicorn, with the "
        "VMware backdoor answered by the hypervisor. Exits with the guest's isa-debug-exit "
        "status ((value << 1) | 1), 0 when it halts, 4 on a guest fault, 6 when the domain "
        "crashed, 124 on timeout. With --backend user it runs an unmodified Linux program "
        "(after --) instead, and exits with the program's status.")
    run.add_argument("--kernel", metavar="FILE",
                     help="Multiboot v1 ELF kernel, Linux bzImage or vmlinux, or a flat "
                     "binary with --mode")
    run.add_argument("--mode", type=int, choices=(16, 32, 64),
                     help="load --kernel as a flat binary starting in this CPU mode")
    run.add_argument("--load-addr", type=_int, metavar="ADDR",
                     help="physical load (and entry) address of a flat binary "
                     "(default 0x10000 in 16-bit mode, else 0x100000)")
    run.add_argument("--cmdline", default="", help="Multiboot or Linux command line")
    run.add_argument("--ramdisk", metavar="FILE",
                     help="initrd for a Linux --kernel (bzImage or vmlinux), or the one module "
                     "of a Multiboot kernel")
    run.add_argument("--backend", default="auto", choices=("auto", "kvm", "unicorn", "user"),
                     help="CPU backend; auto picks KVM when /dev/kvm answers (default auto); "
                     "user runs an unmodified x86-64 Linux program (after --) natively under "
                     "a ptrace supervisor that traps its port I/O and CPUID")
    run.add_argument("--memory", type=int, default=64, metavar="MiB",
                     help="guest RAM in MiB (default 64)")
    run.add_argument("--vcpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--smp-entry", action="store_true",
                     help="start every vCPU at the flat binary's entry with its id in ESI")
    run.add_argument("--vmware-port", action=argparse.BooleanOptionalAction, default=True,
                     help="VMware backdoor on port 0x5658 (default on)")
    run.add_argument("--vmware-hwver", type=int, default=7, metavar="N",
                     help="VMware hardware version; >= 7 shows the VMware CPUID leaves "
                     "(default 7)")
    run.add_argument("--debugcon", default="-", metavar="FILE|-",
                     help="where the debug console (port 0xe9) goes (default - : stdout)")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="end the run after this long (status 124)")
    run.add_argument("--device-model", action=argparse.BooleanOptionalAction, default=None,
                     help="start the device-model process (default: on when the VMware "
                     "port is on)")
    run.add_argument("--serial", default="-", metavar="FILE|-|none",
                     help="where the guest's UART (0x3f8) output goes (default - : stdout)")
    run.add_argument("--dm-arg", action="append", default=[], metavar="ARG",
                     help="pass ARG to the device model (e.g. --dm-arg=--vmport-prop="
                     "x-cmds-v2=off)")
    run.add_argument("--secondary-dm", action="append", default=[], metavar="A-B",
                     help="start a second device model with HVM_IOREQSRV_DISABLE_VMPORT "
                     "owning ports A-B (repeatable)")
    run.add_argument("--dm-program", metavar="COMMAND",
                     help="run COMMAND (split like a shell would) as the device model instead "
                     "of hvmport's own; it is given --control PATH --domid N --ready-fd FD")
    run.add_argument("--qmp", metavar="PATH",
                     help="serve QMP (pointer input, queries) on this Unix socket")
    run.add_argument("--dm-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="a device model that takes longer to answer crashes the domain "
                     "(default 10)")
    run.add_argument("--spin-us", type=float, default=100.0, metavar="US",
                     help="spin on a forwarded request this long before blocking (default 100)")
    run.add_argument("--trace", metavar="FILE",
                     help="record the backdoor's and the ioreq servers' events, with the "
                     "device models', into FILE (see `hvmport trace`)")
    run.add_argument("--guestinfo", action="append", default=[], metavar="KEY=VALUE",
                     type=_key_value,
                     help="GuestRPC: the guest's 'info-get guestinfo.KEY' answers VALUE "
                     "(repeatable); read what the guest set with QMP hvmport-guestinfo-get")
    run.add_argument("--vmware-version", type=_int, default=6, metavar="N",
                     help="what GETVERSION answers in EAX (default 6; VMware's tools refuse "
                     "any other)")
    run.add_argument("--vmware-vmx-type", type=_int, default=2, metavar="N",
                     help="the product type GETVERSION answers in ECX (default 2, ESX "
                     "Server; 4 is Workstation)")
    run.add_argument("--guestrpc-hb", action=argparse.BooleanOptionalAction, default=True,
                     help="offer GuestRPC's high-bandwidth port 0x5659 (default on)")
    run.add_argument("--vmware-port-ring3", action=argparse.BooleanOptionalAction,
                     default=True,
                     help="--backend user: the program's port I/O reaches the backdoor; off, "
                     "it gets SIGSEGV as on bare metal (default on)")
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]",
                     help="with --backend user: the program to run and its arguments")
    run.add_argument("--console-input", action="store_true",
                     help="send what arrives on stdin to the guest's UART (0x3f8): an "
                     "interactive serial console")
    run.add_argument("--full-cpu", action=argparse.BooleanOptionalAction, default=None,
                     help="Unicorn as a full PC CPU: interrupts, exceptions through the "
                     "guest's IDT, SYSCALL (default: on for Linux kernels)")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser(
        "bench", help="measure the cost of a backdoor call, side by side",
        description="Runs the same guest loop (one backdoor IN per iteration) under a C KVM "
        "loop (the floor), hvmport on KVM and Unicorn (answered by the hypervisor and by "
        "the device model), and QEMU with vmport=on (KVM and TCG), plus buffered writes "
        "through the ring. Each figure is the median of several repetitions; cost per call "
        "is (time with N iterations - time with 0) / N.")
    bench.add_argument("--quick", action="store_true", help="fewer iterations (under a minute)")
    bench.add_argument("--json", action="store_true",
                       help='print {"scenarios": {NAME: {"us_per_call", "min", "max"}}, '
                       '"ratios": {NAME: VALUE}}')
    bench.add_argument("--plot", metavar="OUT.png", help="also draw the figures (matplotlib)")
    bench.add_argument("--only", metavar="NAMES", help="comma-separated scenario names")
    bench.set_defaults(func=_cmd_bench)
    _add_toolstack(sub)
    _add_trace_parser(sub)

    guest = sub.add_parser("guest", help="build a test guest (linux: Debian kernel + busybox)",
                           description="Build a test guest from distribution packages, cached.")
    guest.add_argument("what", choices=("linux",),
                       help="linux: Debian's stock kernel and a busybox-static initramfs "
                       "with hvmport's /init, via apt-get download")
    guest.add_argument("--cache", metavar="DIR",
                       help="where built guests live (default ~/.cache/hvmport/linux)")
    guest.add_argument("--json", action="store_true",
                       help='print {"bzimage", "vmlinux", "initrd", "cmdline", ...}')
    guest.set_defaults(func=_cmd_guest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except HvmportError as e:
        print(f"hvmport: {e.party} error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
