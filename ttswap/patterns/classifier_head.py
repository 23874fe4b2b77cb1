"""Classifier head on device: global average pool, flatten, (dropout, removed for inference), linear.
Matches timm's ``ClassifierHead`` and the plain ``AdaptiveAvgPool2d(1) -> Flatten -> Linear`` or
``x.mean((2, 3)) -> Linear`` forms."""

from __future__ import annotations

import torch
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

_pool = Module(nn.AdaptiveAvgPool2d, Input("x"), name="pool")


class ClassifierHead(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, fc: nn.Linear):
        super().__init__(ctx.backend, info)
        bias = fc.bias.detach() if fc.bias is not None else None
        self.weights = ctx.weight_cache.prepared(
            info.layer, lambda: (fc.weight.detach(), bias),
            lambda w, b: ctx.backend.prepare_linear(w, b, info.config, info.layer))

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.linear(self.backend.mean_hw(x, self.cfg, self.layer), self.weights, self.cfg, self.layer)


@register(
    "classifier_head",
    Module(nn.Linear, Module(nn.Flatten, _pool, name="flatten"), name="fc"),
    Module(nn.Linear, Call((torch.flatten, "flatten"), _pool, name="flatten"), name="fc"),
    Module(nn.Linear, Call("mean", Input("x"), name="mean"), name="fc"),
)
def build_head(match: Match, ctx: BuildContext):
    if "pool" in match.named:
        size = match.module(ctx.gm, "pool").output_size
        if size not in (1, (1, 1), [1, 1]):
            raise Unsupported(f"adaptive pool to {size}; only global (1x1) pooling feeds a device head")
    else:
        mean = match.named["mean"]
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        if tuple(dims or ()) not in ((2, 3), (-2, -1)) or mean.kwargs.get("keepdim", False):
            raise Unsupported(f"mean over {dims} is not a global spatial pool")
    n, c, h, w = ctx.nchw(match.inputs["x"])
    if len(ctx.shape(match.root)) != 2:
        raise Unsupported("flatten must leave [N, C] for the linear layer")
    fc = match.module(ctx.gm, "fc")
    resolved = ctx.config(match, "classifier_head", match.inputs["x"])
    info = ctx.info(match, "classifier_head", resolved)
    info.notes.append(f"mean {h}x{w} -> linear {fc.in_features}->{fc.out_features}")
    from ttswap.backends.l1 import estimate_eltwise_l1

    info.l1_bytes = estimate_eltwise_l1(n * h * w, c, 1, ctx.grid(resolved.config, match.inputs["x"]), resolved.config)[0]
    return ClassifierHead(ctx, info, fc)
