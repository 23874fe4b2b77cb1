"""Conv2d, optionally followed by BatchNorm (folded into the weights) and an activation (fused).

Matches a plain ``Conv2d -> BatchNorm2d -> act`` chain, timm's ``ConvNormAct`` (``conv`` then a
``BatchNormAct2d`` leaf that carries its own activation), and every shorter prefix of those.
"""

from __future__ import annotations

from torch import nn

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES
from ttswap.layers import ConvLayer
from ttswap.patterns.convs import conv_activation, conv_layer, conv_spec, folded_weights
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, register

_conv = Module(nn.Conv2d, Input("x"), name="conv")
_bn = Module(nn.BatchNorm2d, _conv, name="bn")  # timm's BatchNormAct2d is a BatchNorm2d subclass


@register(
    "conv",
    Module(ACTIVATION_MODULE_TYPES, _bn, name="act"),
    Call(ACTIVATION_FUNCTIONS, _bn, name="act_fn"),
    _bn,
    Module(ACTIVATION_MODULE_TYPES, _conv, name="act"),
    Call(ACTIVATION_FUNCTIONS, _conv, name="act_fn"),
    _conv,
)
def build_conv(match: Match, ctx: LayerContext) -> ConvLayer:
    conv = ctx.module("conv")
    bn = ctx.module("bn") if "bn" in match.named else None
    activation = conv_activation(match, ctx)
    spec = conv_spec(conv)
    ctx.nchw(match.inputs["x"])
    return conv_layer(ctx, ctx.info(), spec, folded_weights(conv, bn), activation)
