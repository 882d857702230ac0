"""Tracing of backdoor calls and ioreqs: the recorder, the reader, summaries, exports.

The events follow patch 8/8 of the VMWARE_PORT series (VMPORT_HANDLED, VMPORT_IGNORED,
VMPORT_SEND and the device model's completion) plus the ioreq round trips around them; the
file format and the tools are described in docs/tracing.md.
"""

from __future__ import annotations

from hvmport.trace.reader import Event, Header, Trace, TraceWarning, read
from hvmport.trace.recorder import Tracer, merge, regs32

__all__ = ["Event", "Header", "Trace", "TraceWarning", "Tracer", "merge", "read", "regs32"]
