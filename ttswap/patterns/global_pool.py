"""Global average pooling that feeds something other than a linear head (which ``classifier_head``
takes whole): MobileNetV3's and GhostNet's pool before their 1x1 ``conv_head``, or a bare
``x.mean((2, 3), keepdim=True)``. The result stays on the device as an [N, C, 1, 1] map."""

from __future__ import annotations

from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.backends.l1 import estimate_eltwise_l1
from ttswap.modules import TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

SPATIAL_DIMS = ((2, 3), (-2, -1), (3, 2), (-1, -2))


class GlobalAvgPool(TTModule):
    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.mean_hw(x, self.cfg, self.layer)


@register("global_pool", Module(nn.AdaptiveAvgPool2d, Input("x"), name="pool"), Call("mean", Input("x"), name="mean"))
def build_global_pool(match: Match, ctx: BuildContext):
    if "pool" in match.named:
        size = match.module(ctx.gm, "pool").output_size
        if size not in (1, (1, 1), [1, 1]):
            raise Unsupported(f"adaptive average pool to {size}; only global (1x1) pooling runs on device")
    else:
        mean = match.named["mean"]
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if tuple(dims or ()) not in SPATIAL_DIMS or not keepdim:
            raise Unsupported(f"mean over {dims} (keepdim={keepdim}) is not a global spatial pool keeping N, C, 1, 1")
    n, c, h, w = ctx.nchw(match.inputs["x"])
    resolved = ctx.config(match, "global_pool", match.inputs["x"])
    info = ctx.info(match, "global_pool", resolved)
    info.notes.append(f"mean {h}x{w}")
    cfg = resolved.config
    info.l1_bytes = estimate_eltwise_l1(n * h * w, c, 1, ctx.grid(cfg, match.inputs["x"]), cfg)[0]
    return GlobalAvgPool(ctx.backend, info)
