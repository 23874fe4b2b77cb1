"""AvgPool2d on device (DenseNet's transitions, ResNet-D's downsampling shortcuts), ``ceil_mode``,
``count_include_pad`` and ``divisor_override`` included."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.backends.l1 import estimate_pool_l1
from ttswap.config import Pool2dSpec
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.maxpool import _pair
from ttswap.patterns.registry import BuildContext, Unsupported, register

_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}


class AvgPool(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, spec: Pool2dSpec, count_include_pad: bool,
                 divisor_override: int | None):
        super().__init__(ctx.backend, info)
        self.spec, self.count_include_pad, self.divisor_override = spec, count_include_pad, divisor_override

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.avg_pool2d(x, self.spec, self.cfg, self.layer, self.count_include_pad,
                                       self.divisor_override)


@register("avgpool", Module(nn.AvgPool2d, Input("x"), name="pool"), Call(F.avg_pool2d, Input("x"), name="fn"))
def build_avgpool(match: Match, ctx: BuildContext):
    if "pool" in match.named:
        pool = match.module(ctx.gm, "pool")
        params = {k: getattr(pool, k) for k in _ARGS}
    else:
        node = match.named["fn"]
        params = {**_DEFAULTS, **dict(zip(_ARGS, node.args[1:])), **node.kwargs}
    kernel = _pair(params["kernel_size"])
    stride = _pair(params["stride"]) if params["stride"] not in (None, [], ()) else kernel
    spec = Pool2dSpec(kernel, stride, _pair(params["padding"]), ceil_mode=bool(params["ceil_mode"]))
    n, c, h, w = ctx.nchw(match.inputs["x"])
    if spec.output_hw(h, w) != tuple(ctx.nchw(match.root)[2:]):
        raise Unsupported(f"pool output size {spec.output_hw(h, w)} disagrees with torch's {ctx.nchw(match.root)[2:]}")
    resolved = ctx.config(match, "avgpool", match.inputs["x"])
    info = ctx.info(match, "avgpool", resolved)
    info.notes.append(f"avgpool {kernel[0]}x{kernel[1]}/{stride[0]}" + (" ceil" if spec.ceil_mode else "")
                      + ("" if params["count_include_pad"] else " excluding padding"))
    cfg = resolved.config
    info.l1_bytes = estimate_pool_l1(spec, n, h, w, c, ctx.grid(cfg, match.inputs["x"], sharded=True), cfg)[0]
    return AvgPool(ctx, info, spec, bool(params["count_include_pad"]), params["divisor_override"])
