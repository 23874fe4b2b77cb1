"""Nearest interpolation to a size that is not one integer factor of the input (10x10 -> 15x15: up
by 3, keep every 2nd pixel; or down, 15 -> 10: up by 2, keep every 3rd), with ops the device already
has: nearest upsampling by an integer U, then a 1x1 max-pool with stride (S_h, S_w) that keeps every
S-th pixel.

torch's nearest reads source pixel floor(i * I / O) for output pixel i. Upsampled by U, pixel j of the
big map is source pixel floor(j / U); keeping j = i * S gives floor(i * S / U), the same pixel when
S / U = I / O. The smallest such U is the least common multiple of O / gcd(I, O) over both axes; U
above ``MAX_FACTOR`` (a map U*U times larger) stays in torch."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.backends.l1 import estimate_upsample_l1
from ttswap.config import Pool2dSpec
from ttswap.layers import pool_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg

MAX_FACTOR = 4


class ResizeNearest(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, factor: int, keep: Pool2dSpec | None):
        super().__init__(backend, info)
        self.factor, self.keep = factor, keep

    @property
    def l1_bytes(self) -> int:
        n, c, h, w = self.info.input_shapes[0]
        up = estimate_upsample_l1(n * h * w, c, self.factor, self.cfg)[0] if self.factor > 1 else 0
        if self.keep is None:
            return up
        big = self.info.replace(input_shapes=((n, c, h * self.factor, w * self.factor),))
        return max(up, pool_l1(self.keep, big))

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        if self.factor > 1:
            x = self.backend.upsample_nearest(x, self.factor, self.cfg, self.layer)
        if self.keep is not None:
            x = self.backend.max_pool2d(x, self.keep, self.cfg, self.layer)
        return x


def resize_plan(h: int, w: int, oh: int, ow: int) -> tuple[int, tuple[int, int]]:
    """(U, (S_h, S_w)): upsample by U, keep every S-th row and column."""
    factor = math.lcm(oh // math.gcd(h, oh), ow // math.gcd(w, ow))
    return factor, (factor * h // oh, factor * w // ow)


@register("resize_nearest", Module(nn.Upsample, Input("x"), name="up"), Call(F.interpolate, Input("x"), name="up"),
          sized_by="x")
def build_resize_nearest(match: Match, ctx: LayerContext) -> ResizeNearest:
    node = match.named["up"]
    if node.op == "call_module":
        mode, scale = ctx.module("up").mode, ctx.module("up").scale_factor
    else:
        mode, scale = call_arg(node, 3, "mode", "nearest"), call_arg(node, 2, "scale_factor")
    if mode != "nearest":
        raise Unsupported(f"resize mode {mode!r}; only nearest runs on device")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    _, _, oh, ow = ctx.nchw(match.root)
    if oh % h == 0 and ow % w == 0 and oh // h == ow // w:
        raise Unsupported("one integer factor: patterns/upsample.py")
    if scale is not None:
        scales = scale if isinstance(scale, (tuple, list)) else (scale, scale)
        # torch then reads floor(i / scale), which is floor(i * I / O) only when O = I * scale exactly
        if any(o != i * s for o, i, s in zip((oh, ow), (h, w), scales)):
            raise Unsupported(f"scale_factor {scale} from {h}x{w} does not give {oh}x{ow} exactly")
    factor, stride = resize_plan(h, w, oh, ow)
    if factor > MAX_FACTOR:
        raise Unsupported(f"{h}x{w} -> {oh}x{ow} needs upsampling by {factor} (at most {MAX_FACTOR}) before keeping "
                          f"every {stride[0]}x{stride[1]}-th pixel")
    keep = Pool2dSpec((1, 1), stride) if stride != (1, 1) else None
    info = ctx.info(f"nearest {h}x{w} -> {oh}x{ow}: upsample x{factor}, keep every {stride[0]}x{stride[1]}")
    return ResizeNearest(ctx.backend, info, factor, keep)
