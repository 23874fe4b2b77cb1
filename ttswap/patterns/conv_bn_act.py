"""Conv2d, optionally followed by BatchNorm (folded into the weights) and an activation (fused).

Matches a plain ``Conv2d -> BatchNorm2d -> act`` chain, timm's ``ConvNormAct`` (``conv`` then a
``BatchNormAct2d`` leaf that carries its own activation), and every shorter prefix of those.
"""

from __future__ import annotations

from torch import nn

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, activation_of_call
from ttswap.layers import ConvLayer
from ttswap.patterns.convs import conv_layer, conv_spec, folded_weights, norm_activation
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

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
    activation = norm_activation(bn, ctx.module("act") if "act" in match.named else None)
    if "act_fn" in match.named:
        if activation is not None:
            raise Unsupported("two activations in a row after one conv")
        activation = activation_of_call(match.named["act_fn"])
    spec = conv_spec(conv)
    ctx.nchw(match.inputs["x"])
    return conv_layer(ctx, ctx.info(), spec, folded_weights(conv, bn), activation)
