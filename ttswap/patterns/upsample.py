"""Nearest-neighbour upsampling by an integer factor (YOLOv4's neck)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register


class Upsample(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, scale: int):
        super().__init__(ctx.backend, info)
        self.scale = scale

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.upsample_nearest(x, self.scale, self.cfg, self.layer)


@register("upsample", Module(nn.Upsample, Input("x"), name="up"), Call(F.interpolate, Input("x"), name="up"))
def build_upsample(match: Match, ctx: BuildContext):
    node = match.named["up"]
    mode = match.module(ctx.gm, "up").mode if node.op == "call_module" else node.kwargs.get("mode", "nearest")
    if mode != "nearest":
        raise Unsupported(f"upsample mode {mode!r}; only nearest runs on device")
    n, c, h, w = ctx.nchw(match.inputs["x"])
    _, _, oh, ow = ctx.nchw(match.root)
    if oh % h or ow % w or oh // h != ow // w:
        raise Unsupported(f"upsample {h}x{w} -> {oh}x{ow} is not one integer factor")
    scale = oh // h
    resolved = ctx.config(match, "upsample", match.inputs["x"])
    info = ctx.info(match, "upsample", resolved)
    info.notes.append(f"nearest x{scale}")
    from ttswap.backends.l1 import estimate_upsample_l1

    cfg = resolved.config
    info.l1_bytes = estimate_upsample_l1(n * h * w, c, scale, cfg)[0]
    return Upsample(ctx, info, scale)
