"""The ``hvmport`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hvmport import __version__
from hvmport.errors import HvmportError


def _cmd_abi(args: argparse.Namespace) -> int:
    from hvmport.abi import catalog

    if args.json:
        json.dump(catalog.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(catalog.to_table())
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
