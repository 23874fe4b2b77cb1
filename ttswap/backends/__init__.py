"""Backend selection. Backends are imported lazily: importing ttswap never imports ttnn."""

from __future__ import annotations

import glob
import logging

from ttswap.backends.base import Backend

logger = logging.getLogger("ttswap")

BACKEND_NAMES = ("auto", "emulated", "ttnn")


def tenstorrent_device_present() -> bool:
    """Whether the Tenstorrent kernel driver exposes a device. Never opens one."""
    return bool(glob.glob("/dev/tenstorrent/*"))


def get_backend(name: str = "auto") -> Backend:
    """``"ttnn"`` (the real library: a device, else mock mode), ``"emulated"`` (pure torch), or
    ``"auto"``: ttnn when a Tenstorrent device is present, otherwise emulated."""
    if name == "auto":
        if tenstorrent_device_present():
            name = "ttnn"
        else:
            logger.info("no Tenstorrent device (/dev/tenstorrent/*): using the emulated backend")
            name = "emulated"
    if name == "emulated":
        from ttswap.backends.emulated import EmulatedBackend

        return EmulatedBackend()
    if name == "ttnn":
        try:
            from ttswap.backends.ttnn_backend import TtnnBackend
        except ModuleNotFoundError as error:
            if error.name != "ttnn":
                raise
            raise ImportError("the ttnn backend needs ttnn==0.81.1: pip install 'ttswap[tt]'") from error
        return TtnnBackend()
    raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}")
