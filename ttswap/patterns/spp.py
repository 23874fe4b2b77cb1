"""Spatial pyramid pooling (YOLOv4's SPP): stride-1 max-pools of one map at several sizes,
concatenated with the map itself, as one device layer."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Pool2dSpec
from ttswap.layers import pool_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg


class SpatialPyramidPool(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, order: list[Pool2dSpec | None]):
        super().__init__(backend, info)
        self.order = order  # a pool spec per concat input, None for the map itself

    @property
    def l1_bytes(self) -> int:
        return pool_l1(max((s for s in self.order if s), key=lambda s: s.kernel[0]), self.info)  # the widest

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        parts = [x if spec is None else self.backend.max_pool2d(x, spec, self.cfg, self.layer) for spec in self.order]
        return self.backend.concat(parts, self.cfg, self.layer)


def _pool(i: int) -> Module:
    return Module(nn.MaxPool2d, Input("x"), name=f"pool{i}")


_cat = (torch.cat, torch.concat)


@register(
    "spp",
    Call(_cat, [_pool(0), _pool(1), _pool(2), Input("x")], name="cat"),  # Darknet's route order
    Call(_cat, [Input("x"), _pool(0), _pool(1), _pool(2)], name="cat"),
    sized_by="x",
)
def build_spp(match: Match, ctx: LayerContext) -> SpatialPyramidPool:
    cat = match.named["cat"]
    if call_arg(cat, 1, "dim", 0) not in (1, -3):
        raise Unsupported("concat is not along channels")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    spec_of: dict[fx.Node, Pool2dSpec] = {}
    for name in ("pool0", "pool1", "pool2"):
        try:
            spec = Pool2dSpec.from_torch(ctx.module(name))
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        if spec.stride != (1, 1) or spec.output_hw(h, w) != (h, w):
            raise Unsupported(f"{name} is not a size-preserving stride-1 pool")
        spec_of[match.named[name]] = spec
    order = [spec_of.get(arg) for arg in cat.args[0]]  # None: the map itself
    note = "maxpool " + "/".join(f"{s.kernel[0]}" for s in spec_of.values()) + " + concat"
    return SpatialPyramidPool(ctx.backend, ctx.info(note), order)
