"""MaxPool2d on device, ceil_mode included (VoVNet's downsampling pools use it)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Pool2dSpec
from ttswap.layers import pool_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg

# F.max_pool2d's arguments after the input, in order, with their defaults (nn.MaxPool2d orders them otherwise)
_ARGS = {"kernel_size": None, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}


class MaxPool(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, spec: Pool2dSpec):
        super().__init__(backend, info)
        self.spec = spec

    @property
    def l1_bytes(self) -> int:
        return pool_l1(self.spec, self.info)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.max_pool2d(x, self.spec, self.cfg, self.layer)


@register("maxpool", Module(nn.MaxPool2d, Input("x"), name="pool"), Call(F.max_pool2d, Input("x"), name="fn"),
          sized_by="x")
def build_maxpool(match: Match, ctx: LayerContext) -> MaxPool:
    if "pool" in match.named:
        pool = ctx.module("pool")
    else:
        fn = match.named["fn"]
        pool = nn.MaxPool2d(**{k: call_arg(fn, i + 1, k, d) for i, (k, d) in enumerate(_ARGS.items())})
    try:
        spec = Pool2dSpec.from_torch(pool)
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    _, _, h, w = ctx.nchw(match.inputs["x"])
    if spec.output_hw(h, w) != ctx.nchw(match.root)[2:]:
        raise Unsupported(f"pool output size {spec.output_hw(h, w)} disagrees with torch's {ctx.nchw(match.root)[2:]}")
    note = f"maxpool {spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]}" + (" ceil" if spec.ceil_mode else "")
    return MaxPool(ctx.backend, ctx.info(note), spec)
