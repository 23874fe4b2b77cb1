"""Base class of the modules that replace matched subgraphs, and the two transfer modules.

A replacement module takes and returns ``DeviceTensor``s: activations stay on the device between
swapped layers. ``Upload`` and ``Download`` are the only places a tensor crosses to or from the host,
and each crossing is counted on the backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import OpConfig


@dataclass(frozen=True)
class LayerInfo:
    """What one replacement runs with, decided in full before the module is built (recipe, then policy:
    kept inputs, the bfloat8_b guard), and what the report shows for it."""

    layer: str
    rewriter: str
    config: OpConfig | None
    rules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()  # the traced nodes this layer computes, in graph order, its output last
    input_shapes: tuple[tuple[int, ...], ...] = ()  # the traced shape of each input, in forward order
    output_shape: tuple[int, ...] = ()

    def replace(self, **changes: Any) -> "LayerInfo":
        return dataclasses.replace(self, **changes)


class TTModule(nn.Module):
    """A replacement backed by the op layer. Subclasses implement ``forward`` on DeviceTensors and,
    when they can estimate it, ``l1_bytes``."""

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

    @property
    def l1_bytes(self) -> int | None:
        """Peak L1 bytes per core this layer's ops need (an estimate); None when not estimated."""
        return None

    def part_for(self, node: str) -> "TTModule":
        """The layer that computes traced node ``node``: a composite's part that claims it, else itself."""
        for module in self.modules():
            if module is not self and isinstance(module, TTModule) and node in module.info.nodes:
                return module.part_for(node)
        return self

    def reconfigure(self, config: OpConfig) -> None:
        """Run with ``config`` from now on. For the tuner, which tries numerics on conversions of its own;
        a converted model's report describes the configs its layers were built with."""
        self.info = self.info.replace(config=config)

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
        # integers would be quantized to bfloat16 as if they were activations: refuse them as torch's conv does
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise TypeError(f"upload of {self.name!r} expects a floating-point 4-D NCHW tensor, got {_describe(x)}")
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
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
