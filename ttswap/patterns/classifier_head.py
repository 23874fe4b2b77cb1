"""Classifier head on device: global average pool, flatten, (dropout, removed for inference), linear.
Matches timm's ``ClassifierHead`` and the plain ``AdaptiveAvgPool2d(1) -> Flatten -> Linear`` or
``x.mean((2, 3)) -> Linear`` forms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.layers import eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg

_pool = Module(nn.AdaptiveAvgPool2d, Input("x"), name="pool")


class ClassifierHead(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, weights: Any):
        super().__init__(backend, info)
        self.weights = weights

    @property
    def l1_bytes(self) -> int:
        return eltwise_l1(self.info, 1)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.linear(self.backend.mean_hw(x, self.cfg, self.layer), self.weights, self.cfg, self.layer)


@register(
    "classifier_head",
    Module(nn.Linear, Module(nn.Flatten, _pool, name="flatten"), name="fc"),
    Module(nn.Linear, Call((torch.flatten, "flatten"), _pool, name="flatten"), name="fc"),
    Module(nn.Linear, Call("mean", Input("x"), name="mean"), name="fc"),
    sized_by="x",
)
def build_head(match: Match, ctx: LayerContext) -> ClassifierHead:
    if "pool" in match.named:
        size = ctx.module("pool").output_size
        if size not in (1, (1, 1), [1, 1]):
            raise Unsupported(f"adaptive pool to {size}; only global (1x1) pooling feeds a device head")
    else:
        mean = match.named["mean"]
        dims = call_arg(mean, 1, "dim")
        if tuple(dims or ()) not in ((2, 3), (-2, -1)) or call_arg(mean, 2, "keepdim", False):
            raise Unsupported(f"mean over {dims} is not a global spatial pool")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    if len(ctx.shape(match.root)) != 2:
        raise Unsupported("flatten must leave [N, C] for the linear layer")
    fc = ctx.module("fc")
    info = ctx.info(f"mean {h}x{w} -> linear {fc.in_features}->{fc.out_features}")
    bias = fc.bias.detach() if fc.bias is not None else None
    weights = ctx.weight_cache.prepared(info.layer, lambda: (fc.weight.detach(), bias),
                                        lambda w, b: ctx.backend.prepare_linear(w, b, info.config, info.layer))
    return ClassifierHead(ctx.backend, info, weights)
