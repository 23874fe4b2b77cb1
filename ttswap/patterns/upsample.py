"""Nearest-neighbour upsampling by an integer factor (YOLOv4's neck)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.backends.l1 import estimate_upsample_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg


class Upsample(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, scale: int):
        super().__init__(backend, info)
        self.scale = scale

    @property
    def l1_bytes(self) -> int:
        n, c, h, w = self.info.input_shapes[0]
        return estimate_upsample_l1(n * h * w, c, self.scale, self.cfg)[0]

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.upsample_nearest(x, self.scale, self.cfg, self.layer)


@register("upsample", Module(nn.Upsample, Input("x"), name="up"), Call(F.interpolate, Input("x"), name="up"),
          sized_by="x")
def build_upsample(match: Match, ctx: LayerContext) -> Upsample:
    node = match.named["up"]
    mode = ctx.module("up").mode if node.op == "call_module" else call_arg(node, 3, "mode", "nearest")
    if mode != "nearest":
        raise Unsupported(f"upsample mode {mode!r}; only nearest runs on device")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    _, _, oh, ow = ctx.nchw(match.root)
    if oh % h or ow % w or oh // h != ow // w:
        raise Unsupported(f"upsample {h}x{w} -> {oh}x{ow} is not one integer factor")
    return Upsample(ctx.backend, ctx.info(f"nearest x{oh // h}"), oh // h)
