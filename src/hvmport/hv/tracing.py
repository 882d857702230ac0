"""A run's trace: the hypervisor's recorder, one file per device model of ours, and the
merge of them all into the user's file when the run ends (they share CLOCK_MONOTONIC)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from hvmport.errors import HvmportError
from hvmport.trace.reader import TraceWarning, read
from hvmport.trace.recorder import Tracer, merge


@dataclass(slots=True)
class RunTrace:
    path: str
    tracer: Tracer
    #: The run's private directory, where the device models' parts are written.
    rundir: str
    note: Callable[[str], None]
    parts: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, path: str, domid: int, rundir: str,
              note: Callable[[str], None]) -> RunTrace:
        """Open the user's file now: a bad path stops the run before it starts."""
        return cls(path, Tracer(path, domid=domid, role="hypervisor"), rundir, note)

    def part(self, index: int) -> str:
        """Where device model ``index`` writes its events."""
        path = os.path.join(self.rundir, f"trace-dm{index}.jsonl")
        self.parts.append(path)
        return path

    def finish(self) -> None:
        """Close, then merge; call once every device model has ended. Never raises: the
        run's own result matters more than its trace, so problems become notes."""
        self.tracer.close()
        if self.tracer.error is not None:
            self.note(f"trace: writing {self.path} failed: {self.tracer.error.strerror}")
        parts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TraceWarning)
            for part in self.parts:
                if not os.path.exists(part):
                    continue  # that device model never started
                try:
                    read(part)
                except HvmportError as e:
                    # One broken part must not cost the others.
                    self.note(f"trace: left out a device model's part: {e}")
                    continue
                parts.append(part)
        for w in caught:
            self.note(f"trace: {w.message}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TraceWarning)  # noted above
                count = merge(self.path, *parts)
        except HvmportError as e:
            self.note(f"trace: {e}; {self.path} holds the hypervisor's events only")
            return
        dropped = self.tracer.dropped
        self.note(f"trace: {count} events in {self.path}"
                  + (f" ({dropped} dropped)" if dropped else ""))
