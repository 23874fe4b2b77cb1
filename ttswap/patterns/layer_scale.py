"""Layer scale (ConvNeXt's ``x.mul(gamma.reshape(1, -1, 1, 1))`` after its block's last 1x1 conv), folded
into that conv's weights and bias: a per-channel constant times a conv is the conv with its output
channels scaled, so the multiply costs nothing on the device and rounds nothing. (``gamma.reshape`` is
folded to one graph constant when tracing: ``ttswap.simplify``.)"""

from __future__ import annotations

import operator

import torch
from torch import nn

from ttswap.layers import ConvLayer
from ttswap.patterns.convs import conv_layer, conv_spec
from ttswap.patterns.layer_norm import constant
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register


@register("conv", Call(("mul", operator.mul, torch.mul), Module(nn.Conv2d, Input("x"), name="conv"), name="scale"))
def build_layer_scale(match: Match, ctx: LayerContext) -> ConvLayer:
    node = match.named["scale"]
    if len(node.args) != 2 or node.kwargs:
        raise Unsupported("multiply with more than two operands")
    conv = ctx.module("conv")
    spec = conv_spec(conv)
    scale = constant(ctx.gm, node.args[1], "the layer scale")
    if scale.numel() != spec.out_channels or scale.dim() not in (1, 3, 4) or (
            scale.dim() > 1 and tuple(scale.shape[-2:]) != (1, 1)):
        raise Unsupported(f"multiply by a {tuple(scale.shape)} constant; only a per-channel scale folds into the conv")
    ctx.nchw(match.inputs["x"])
    gamma = scale.detach().flatten().double()

    def folded() -> tuple[torch.Tensor, torch.Tensor]:
        weight = conv.weight.detach().double() * gamma.reshape(-1, 1, 1, 1)
        bias = conv.bias.detach().double() * gamma if conv.bias is not None else torch.zeros_like(gamma)
        return weight.float(), bias.float()

    return conv_layer(ctx, ctx.info("layer scale folded into the weights"), spec, folded, None)
