"""AvgPool2d on device (DenseNet's transitions, ResNet-D's downsampling shortcuts), ``ceil_mode``,
``count_include_pad`` and ``divisor_override`` included."""

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

# F.avg_pool2d's arguments after the input, in order, with their defaults: also nn.AvgPool2d's
_ARGS = {"kernel_size": None, "stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
         "divisor_override": None}


class AvgPool(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, spec: Pool2dSpec, count_include_pad: bool,
                 divisor_override: int | None):
        super().__init__(backend, info)
        self.spec, self.count_include_pad, self.divisor_override = spec, count_include_pad, divisor_override

    @property
    def l1_bytes(self) -> int:
        return pool_l1(self.spec, self.info)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.avg_pool2d(x, self.spec, self.cfg, self.layer, self.count_include_pad,
                                       self.divisor_override)


@register("avgpool", Module(nn.AvgPool2d, Input("x"), name="pool"), Call(F.avg_pool2d, Input("x"), name="fn"),
          sized_by="x")
def build_avgpool(match: Match, ctx: LayerContext) -> AvgPool:
    if "pool" in match.named:
        pool = ctx.module("pool")
    else:
        fn = match.named["fn"]
        pool = nn.AvgPool2d(**{k: call_arg(fn, i + 1, k, d) for i, (k, d) in enumerate(_ARGS.items())})
    spec = Pool2dSpec.from_torch(pool)
    _, _, h, w = ctx.nchw(match.inputs["x"])
    if spec.output_hw(h, w) != ctx.nchw(match.root)[2:]:
        raise Unsupported(f"pool output size {spec.output_hw(h, w)} disagrees with torch's {ctx.nchw(match.root)[2:]}")
    note = (f"avgpool {spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]}" + (" ceil" if spec.ceil_mode else "")
            + ("" if pool.count_include_pad else " excluding padding"))
    return AvgPool(ctx.backend, ctx.info(note), spec, bool(pool.count_include_pad), pool.divisor_override)
