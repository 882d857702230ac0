"""The host-side pointer conventions every pointing device here accepts.

They are QEMU's legacy input layer's: buttons as a bitmask, absolute positions scaled to
0..0x7FFF whatever the display size, relative motion with y growing downwards.
"""

from __future__ import annotations

BUTTON_LEFT = 0x01
BUTTON_RIGHT = 0x02
BUTTON_MIDDLE = 0x04
BUTTONS_ALL = BUTTON_LEFT | BUTTON_RIGHT | BUTTON_MIDDLE

#: Absolute host coordinates run 0..ABS_MAX on both axes.
ABS_MAX = 0x7FFF
