"""MaxPool2d on device, ceil_mode included (VoVNet's downsampling pools use it)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.config import Pool2dSpec
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pool_spec(pool: nn.MaxPool2d) -> Pool2dSpec:
    if pool.return_indices:
        raise Unsupported("return_indices=True")
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return Pool2dSpec(_pair(pool.kernel_size), _pair(stride), _pair(pool.padding), _pair(pool.dilation),
                      bool(pool.ceil_mode))


class MaxPool(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, spec: Pool2dSpec):
        super().__init__(ctx.backend, info)
        self.spec = spec

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.max_pool2d(x, self.spec, self.cfg, self.layer)


def make_pool(ctx: BuildContext, match: Match, spec: Pool2dSpec, op: str = "maxpool") -> MaxPool:
    n, c, h, w = ctx.nchw(match.inputs["x"])
    if spec.output_hw(h, w) != tuple(ctx.nchw(match.root)[2:]):
        raise Unsupported(f"pool output size {spec.output_hw(h, w)} disagrees with torch's {ctx.nchw(match.root)[2:]}")
    resolved = ctx.config(match, op, match.inputs["x"])
    info = ctx.info(match, op, resolved)
    info.notes.append(f"maxpool {spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]}" + (" ceil" if spec.ceil_mode else ""))
    from ttswap.backends.l1 import estimate_pool_l1

    cfg = resolved.config
    info.l1_bytes = estimate_pool_l1(spec, n, h, w, c, ctx.grid(cfg, match.inputs["x"], sharded=True), cfg)[0]
    return MaxPool(ctx, info, spec)


@register("maxpool", Module(nn.MaxPool2d, Input("x"), name="pool"), Call(F.max_pool2d, Input("x"), name="fn"))
def build_maxpool(match: Match, ctx: BuildContext):
    if "pool" in match.named:
        spec = pool_spec(match.module(ctx.gm, "pool"))
    else:
        node = match.named["fn"]
        params = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"), node.args[1:]))
        params.update(node.kwargs)
        spec = pool_spec(nn.MaxPool2d(**params))
    return make_pool(ctx, match, spec)
