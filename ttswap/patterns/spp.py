"""Spatial pyramid pooling (YOLOv4's SPP): stride-1 max-pools of one map at several sizes,
concatenated with the map itself, as one device layer."""

from __future__ import annotations

import torch
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.config import Pool2dSpec
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.maxpool import pool_spec
from ttswap.patterns.registry import BuildContext, Unsupported, register


class SpatialPyramidPool(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, order: list[Pool2dSpec | None]):
        super().__init__(ctx.backend, info)
        self.order = order  # a pool spec per concat input, None for the map itself

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
)
def build_spp(match: Match, ctx: BuildContext):
    cat = match.named["cat"]
    if cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0) not in (1, -3):
        raise Unsupported("concat is not along channels")
    specs = {name: pool_spec(match.module(ctx.gm, name)) for name in ("pool0", "pool1", "pool2")}
    n, c, h, w = ctx.nchw(match.inputs["x"])
    for name, spec in specs.items():
        if spec.stride != (1, 1) or spec.output_hw(h, w) != (h, w):
            raise Unsupported(f"{name} is not a size-preserving stride-1 pool")
    order = [None if arg is match.inputs["x"] else specs[next(k for k, v in match.named.items() if v is arg)]
             for arg in cat.args[0]]
    resolved = ctx.config(match, "spp", match.inputs["x"])
    info = ctx.info(match, "spp", resolved)
    info.notes.append("maxpool " + "/".join(f"{s.kernel[0]}" for s in specs.values()) + " + concat")
    from ttswap.backends.l1 import estimate_pool_l1

    biggest = max(specs.values(), key=lambda s: s.kernel[0])
    cfg = resolved.config
    info.l1_bytes = estimate_pool_l1(biggest, n, h, w, c, ctx.grid(cfg, match.inputs["x"], sharded=True), cfg)[0]
    return SpatialPyramidPool(ctx, info, order)
