"""Decoding the port-I/O instruction a user-mode program faulted on.

At IOPL 0 every IN, OUT, INS and OUTS raises #GP in ring 3, which Linux turns into SIGSEGV
at the instruction. The user-mode backend reads the bytes at RIP and decodes exactly those
instructions (64-bit mode): legacy prefixes (operand size 66, address size 67, REP F3/F2,
segment overrides, LOCK), an optional REX, then one of

* E4/E5 ib  in  al/eax, imm8        EC/ED  in  al/eax, dx
* E6/E7 ib  out imm8, al/eax        EE/EF  out dx, al/eax
* 6C/6D     ins  (rep)              6E/6F  outs (rep)

with 66 turning the 32-bit forms into 16-bit ones. Anything else is not ours to emulate.
"""

from __future__ import annotations

from dataclasses import dataclass

_SEGMENTS = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}


@dataclass(slots=True, frozen=True)
class PortInsn:
    length: int
    is_write: bool
    size: int
    #: The port for the imm8 forms, None when it is in DX.
    imm_port: int | None
    string: bool = False
    rep: bool = False
    #: 32-bit addressing (67 prefix): RSI/RDI/RCX are used as ESI/EDI/ECX.
    addr32: bool = False
    #: The segment override of OUTS's source ("fs"/"gs" add a base; others are flat).
    segment: str = "ds"


def decode(code: bytes) -> PortInsn | None:
    """The port instruction at the start of ``code`` (up to 15 bytes), or None."""
    i = 0
    opsize16 = addr32 = rep = False
    segment = "ds"
    while i < len(code) and i < 14:
        b = code[i]
        if b == 0x66:
            opsize16 = True
        elif b == 0x67:
            addr32 = True
        elif b in (0xF3, 0xF2):
            rep = True
        elif b in _SEGMENTS:
            segment = _SEGMENTS[b]
        elif b == 0xF0:
            return None  # LOCK on IN/OUT is #UD, never #GP
        else:
            break
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1  # REX: W does not widen port I/O beyond 32 bits
    if i >= len(code):
        return None
    op = code[i]
    wide = 2 if opsize16 else 4
    if op in (0xE4, 0xE5, 0xE6, 0xE7):
        if i + 1 >= len(code):
            return None
        return PortInsn(i + 2, op >= 0xE6, 1 if op % 2 == 0 else wide, code[i + 1])
    if op in (0xEC, 0xED, 0xEE, 0xEF):
        return PortInsn(i + 1, op >= 0xEE, 1 if op % 2 == 0 else wide, None)
    if op in (0x6C, 0x6D, 0x6E, 0x6F):
        return PortInsn(i + 1, op >= 0x6E, 1 if op % 2 == 0 else wide, None, string=True,
                        rep=rep, addr32=addr32, segment=segment)
    return None
