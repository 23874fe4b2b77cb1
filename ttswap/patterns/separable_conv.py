"""Depthwise-separable conv: a depthwise kxk conv, then a pointwise 1x1 conv with BatchNorm and
activation (timm's ``SeparableConvNormAct``), as one replacement covering both convs."""

from __future__ import annotations

from torch import nn

from ttswap.activations import ACTIVATION_MODULE_TYPES
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.layers import ConvLayer
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.convs import conv_layer, conv_spec, folded_weights, norm_activation
from ttswap.patterns.matcher import Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

_dw = Module(nn.Conv2d, Input("x"), name="dw")
_bn = Module(nn.BatchNorm2d, Module(nn.Conv2d, _dw, name="pw"), name="bn")


class SeparableConv(TTModule):
    """Two conv layers; the report shows each one's config on the nodes it computes."""

    def __init__(self, backend: Backend, info: LayerInfo, depthwise: ConvLayer, pointwise: ConvLayer):
        super().__init__(backend, info)
        self.depthwise, self.pointwise = depthwise, pointwise

    @property
    def l1_bytes(self) -> int:
        return max(self.depthwise.l1_bytes, self.pointwise.l1_bytes)  # one runs after the other

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.pointwise(self.depthwise(x))


@register("separable_conv", Module(ACTIVATION_MODULE_TYPES, _bn, name="act"), _bn)
def build_separable(match: Match, ctx: LayerContext) -> SeparableConv:
    dw, pw, bn = ctx.module("dw"), ctx.module("pw"), ctx.module("bn")
    if not (dw.groups > 1 and dw.groups == dw.in_channels):
        raise Unsupported("first conv is not depthwise")
    if pw.kernel_size != (1, 1) or pw.groups != 1:
        raise Unsupported("second conv is not pointwise")
    activation = norm_activation(bn, ctx.module("act") if "act" in match.named else None)
    dw_spec, pw_spec = conv_spec(dw), conv_spec(pw)
    dw_node = match.named["dw"]
    ctx.nchw(match.inputs["x"])
    depthwise = conv_layer(ctx, ctx.info(layer=str(dw_node.target), nodes=[dw_node]), dw_spec,
                           folded_weights(dw, None), None)
    pointwise = conv_layer(ctx, ctx.info(nodes=match.nodes[1:], inputs=[dw_node]), pw_spec,
                           folded_weights(pw, bn), activation)
    notes = dict.fromkeys([  # both halves carry the recipe's notes: keep one copy
        f"dw {dw_spec.kernel[0]}x{dw_spec.kernel[1]}/{dw_spec.stride[0]} + {pointwise.info.notes[0]}",
        *depthwise.info.notes[1:], *pointwise.info.notes[1:]])
    info = pointwise.info.replace(notes=tuple(notes), nodes=tuple(n.name for n in match.nodes),
                                  input_shapes=depthwise.info.input_shapes)
    return SeparableConv(ctx.backend, info, depthwise, pointwise)
