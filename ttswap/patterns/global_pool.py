"""Global average pooling that feeds something other than a linear head (which ``classifier_head``
takes whole): MobileNetV3's and GhostNet's pool before their 1x1 ``conv_head``, or a bare
``x.mean((2, 3), keepdim=True)``. The result stays on the device as an [N, C, 1, 1] map."""

from __future__ import annotations

from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.layers import eltwise_l1
from ttswap.modules import TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg

SPATIAL_DIMS = ((2, 3), (-2, -1), (3, 2), (-1, -2))


class GlobalAvgPool(TTModule):
    @property
    def l1_bytes(self) -> int:
        return eltwise_l1(self.info, 1)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.mean_hw(x, self.cfg, self.layer)


@register("global_pool", Module(nn.AdaptiveAvgPool2d, Input("x"), name="pool"), Call("mean", Input("x"), name="mean"),
          sized_by="x")
def build_global_pool(match: Match, ctx: LayerContext) -> GlobalAvgPool:
    if "pool" in match.named:
        size = ctx.module("pool").output_size
        if size not in (1, (1, 1), [1, 1]):
            raise Unsupported(f"adaptive average pool to {size}; only global (1x1) pooling runs on device")
    else:
        mean = match.named["mean"]
        dims, keepdim = call_arg(mean, 1, "dim"), call_arg(mean, 2, "keepdim", False)
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)  # x.mean(1) names one dim
        if dims not in SPATIAL_DIMS or not keepdim:
            raise Unsupported(f"mean over {dims} (keepdim={keepdim}) is not a global spatial pool keeping N, C, 1, 1")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    return GlobalAvgPool(ctx.backend, ctx.info(f"mean {h}x{w}"))
