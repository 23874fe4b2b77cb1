"""Whether a Tenstorrent device is present: read by backend selection and by the ttnn backend, so it
lives below both."""

from __future__ import annotations

import glob


def tenstorrent_device_present() -> bool:
    """Whether the Tenstorrent kernel driver exposes a device. Never opens one."""
    return bool(glob.glob("/dev/tenstorrent/*"))


__all__ = ["tenstorrent_device_present"]
