"""Base class of the modules that replace matched subgraphs, and the two transfer modules.

A replacement module takes and returns ``DeviceTensor``s: activations stay on the device between
swapped layers. ``Upload`` and ``Download`` are the only places a tensor crosses to or from the host,
and each crossing is counted on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import OpConfig


@dataclass
class LayerInfo:
    """What the report shows for one replacement."""

    layer: str
    rewriter: str
    config: OpConfig | None
    rules: tuple[str, ...] = ()
    l1_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


class TTModule(nn.Module):
    """A replacement backed by the op layer. Subclasses implement ``forward`` on DeviceTensors."""

    def __init__(self, backend: Backend, info: LayerInfo):
        super().__init__()
        self.backend = backend
        self.info = info

    @property
    def layer(self) -> str:
        return self.info.layer

    @property
    def cfg(self) -> OpConfig:
        assert self.info.config is not None
        return self.info.config

    def keep_inputs(self) -> None:
        """Do not free the inputs: another layer reads them later. Composite layers forward this to
        the sub-layer that consumes the input."""
        if self.info.config is not None and self.info.config.deallocate:
            self.info.config = self.info.config.replace(deallocate=False)

    def extra_repr(self) -> str:
        cfg = self.info.config
        return f"layer={self.info.layer!r}" + (f", {cfg.to_dict()}" if cfg else "")


@dataclass
class TransferCounter:
    uploads: int = 0
    downloads: int = 0

    def reset(self) -> None:
        self.uploads = self.downloads = 0


class Upload(nn.Module):
    def __init__(self, backend: Backend, cfg: OpConfig, counter: TransferCounter, name: str):
        super().__init__()
        self.backend, self.cfg, self.counter, self.name = backend, cfg, counter, name

    def forward(self, x: torch.Tensor) -> DeviceTensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"upload of {self.name!r} expects a 4-D NCHW tensor, got {_describe(x)}")
        self.counter.uploads += 1
        return self.backend.upload(x, self.cfg, layer=self.name)


class Download(nn.Module):
    def __init__(self, backend: Backend, counter: TransferCounter, name: str, shape: tuple[int, ...] | None):
        super().__init__()
        self.backend, self.counter, self.name = backend, counter, name
        self.shape = shape  # the traced torch shape of this value, restored after download

    def forward(self, t: DeviceTensor) -> torch.Tensor:
        self.counter.downloads += 1
        out = self.backend.download(t, layer=self.name)
        return out.reshape(self.shape) if self.shape is not None else out


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
