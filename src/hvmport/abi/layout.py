"""Declarative struct layouts, so the ABI can be printed, checked against gcc and tested.

Layouts are written down explicitly (offsets and sizes), not computed from Python types:
the point is to state Xen's byte layout as a fact that a C compiler can confirm.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    offset: int
    size: int
    #: Number of elements for arrays (the size is that of the whole array).
    count: int = 1


@dataclass(frozen=True, slots=True)
class BitField:
    name: str
    #: Counted in bits from the start of the struct.
    bit_offset: int
    bits: int


@dataclass(frozen=True, slots=True)
class StructLayout:
    name: str
    size: int
    fields: tuple[Field | BitField, ...]

    def field(self, name: str) -> Field | BitField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def check(self) -> None:
        """Fields lie inside the struct and do not overlap (members of a union may)."""
        spans: list[tuple[int, int, str]] = []
        for f in self.fields:
            if isinstance(f, BitField):
                lo, hi = f.bit_offset, f.bit_offset + f.bits
            else:
                lo, hi = f.offset * 8, (f.offset + f.size) * 8
            if hi > self.size * 8:
                raise AssertionError(f"{self.name}.{f.name} runs past the struct")
            spans.append((lo, hi, f.name))
        if self.name == "xen_dm_op":
            return
        spans.sort()
        for (_, a_hi, a), (b_lo, _, b) in itertools.pairwise(spans):
            if b_lo < a_hi:
                raise AssertionError(f"{self.name}: {a} overlaps {b}")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in self.fields:
            if isinstance(f, BitField):
                out[f.name] = {"bit_offset": f.bit_offset, "bits": f.bits}
            else:
                out[f.name] = {"offset": f.offset, "size": f.size}
        return {"size": self.size, "fields": out}
