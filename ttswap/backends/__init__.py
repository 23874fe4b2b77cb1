"""Backend selection. Backends are imported lazily: importing ttswap never imports ttnn."""

from __future__ import annotations

import logging

from ttswap.backends.base import Backend
from ttswap.backends.device import tenstorrent_device_present

logger = logging.getLogger("ttswap")

BACKEND_NAMES = ("auto", "emulated", "ttnn", "golden")


def get_backend(name: str = "auto", mesh: tuple[int, int] | None = None) -> Backend:
    """``"ttnn"`` (the real library: a device, else mock mode), ``"emulated"`` (pure torch),
    ``"golden"`` (the ttnn backend's code with each op computed by ttnn's CPU reference: a value check
    of the ttnn path, no device needed), or ``"auto"``: ttnn when a Tenstorrent device is present,
    otherwise emulated. ``mesh=(rows, cols)`` runs data parallel over that many chips (ttnn's mesh)."""
    if name == "auto":
        if tenstorrent_device_present():
            name = "ttnn"
        else:
            logger.info("no Tenstorrent device (/dev/tenstorrent/*): using the emulated backend")
            name = "emulated"
    if name == "emulated":
        from ttswap.backends.emulated import EmulatedBackend

        return EmulatedBackend(mesh=mesh) if mesh is not None else EmulatedBackend()
    if name in ("ttnn", "golden"):
        try:
            from ttswap.backends.ttnn_backend import TtnnBackend
        except ModuleNotFoundError as error:
            if error.name != "ttnn":
                raise
            raise ImportError(f"the {name} backend needs ttnn==0.81.1: pip install 'ttswap[tt]'") from error
        if name == "golden":
            from ttswap.backends.golden import GoldenBackend

            if mesh not in (None, (1, 1)):
                raise ValueError("the golden backend computes on the CPU, one chip: it takes no mesh")
            return GoldenBackend()
        return TtnnBackend(mesh=mesh) if mesh is not None else TtnnBackend()
    raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}")
