"""Depthwise-separable conv: a depthwise kxk conv, then a pointwise 1x1 conv with BatchNorm and
activation (timm's ``SeparableConvNormAct``), as one replacement covering both convs."""

from __future__ import annotations

from torch import nn

from ttswap.activations import ACTIVATION_MODULE_TYPES
from ttswap.backends.base import DeviceTensor
from ttswap.layers import make_conv, norm_activation
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

_dw = Module(nn.Conv2d, Input("x"), name="dw")
_bn = Module(nn.BatchNorm2d, Module(nn.Conv2d, _dw, name="pw"), name="bn")


class SeparableConv(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, depthwise: TTModule, pointwise: TTModule):
        super().__init__(ctx.backend, info)
        self.depthwise, self.pointwise = depthwise, pointwise

    def keep_inputs(self) -> None:
        self.depthwise.keep_inputs()

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.pointwise(self.depthwise(x))


@register("separable_conv", Module(ACTIVATION_MODULE_TYPES, _bn, name="act"), _bn)
def build_separable(match: Match, ctx: BuildContext):
    dw, pw = match.module(ctx.gm, "dw"), match.module(ctx.gm, "pw")
    if not (dw.groups > 1 and dw.groups == dw.in_channels):
        raise Unsupported("first conv is not depthwise")
    if pw.kernel_size != (1, 1) or pw.groups != 1:
        raise Unsupported("second conv is not pointwise")
    bn = match.module(ctx.gm, "bn")
    act = match.module(ctx.gm, "act") if "act" in match.named else None
    resolved = ctx.config(match, "separable_conv")
    info = ctx.info(match, "separable_conv", resolved)
    dw_info = ctx.info(match, "separable_conv", resolved)
    dw_info.layer = str(match.named["dw"].target)
    pw_node = match.named["pw"]
    depthwise = make_conv(ctx, dw_info, dw, None, None, ctx.nchw(match.inputs["x"]))
    pointwise = make_conv(ctx, info, pw, bn, norm_activation(bn, act), ctx.nchw(pw_node.args[0]))
    module = SeparableConv(ctx, info, depthwise, pointwise)
    info.notes = list(dict.fromkeys([  # both halves carry the recipe's notes: keep one copy
        f"dw {dw.kernel_size[0]}x{dw.kernel_size[1]}/{dw.stride[0]} + {pointwise.info.notes[0]}",
        *depthwise.info.notes[1:], *pointwise.info.notes[1:]]))
    info.l1_bytes = max(depthwise.info.l1_bytes or 0, pointwise.info.l1_bytes or 0)
    return module
