"""Conv2d, optionally followed by BatchNorm (folded into the weights) and an activation (fused).

Matches a plain ``Conv2d -> BatchNorm2d -> act`` chain, timm's ``ConvNormAct`` (``conv`` then a
``BatchNormAct2d`` leaf that carries its own activation), and every shorter prefix of those.
"""

from __future__ import annotations

from torch import nn

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, UnsupportedActivation, activation_of_call
from ttswap.layers import make_conv, norm_activation
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

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
def build_conv(match: Match, ctx: BuildContext):
    conv = match.module(ctx.gm, "conv")
    bn = match.module(ctx.gm, "bn") if "bn" in match.named else None
    act = match.module(ctx.gm, "act") if "act" in match.named else None
    activation = norm_activation(bn, act)
    if "act_fn" in match.named:
        node = match.named["act_fn"]
        if activation is not None:
            raise Unsupported("two activations in a row after one conv")
        try:
            activation = activation_of_call(node.target, node.args, node.kwargs)
        except UnsupportedActivation as exc:
            raise Unsupported(f"activation {exc} has no device implementation") from None
    resolved = ctx.config(match, "conv")
    info = ctx.info(match, "conv", resolved)
    return make_conv(ctx, info, conv, bn, activation, ctx.nchw(match.inputs["x"]))
