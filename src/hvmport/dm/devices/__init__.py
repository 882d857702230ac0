"""Device models run inside the device-model process, as sans-io classes.

No device here does I/O, keeps time or starts threads: the DM process feeds them port
accesses, backdoor calls and host input, and passes callbacks for what they emit (IRQ
levels, serial output, a CPU reset request).
"""

from __future__ import annotations

from hvmport.dm.devices.bus import PortBus, PortDevice, PortRange, all_ones
from hvmport.dm.devices.i8042 import I8042
from hvmport.dm.devices.uart import Uart16550
from hvmport.dm.devices.vmmouse import Vmmouse
from hvmport.dm.devices.vmport import Vmport, VmportProperties, VmportRegs

__all__ = [
    "I8042",
    "PortBus",
    "PortDevice",
    "PortRange",
    "Uart16550",
    "Vmmouse",
    "Vmport",
    "VmportProperties",
    "VmportRegs",
    "all_ones",
]
