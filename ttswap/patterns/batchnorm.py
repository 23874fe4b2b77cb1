"""BatchNorm that no conv before it absorbs (pre-activation networks: DenseNet, ResNetV2, RepVGG's
identity branch), with a following activation: on device as a per-channel scale and shift, run as a
depthwise 1x1 conv whose weights are the scales and whose bias is the shift, so the activation fuses
and the numerics are the conv's."""

from __future__ import annotations

import torch
from torch import nn

from ttswap import layers
from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, activation_of_call
from ttswap.config import Conv2dSpec
from ttswap.layers import ConvLayer
from ttswap.patterns.convs import conv_layer, norm_activation
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

_bn = Module(nn.BatchNorm2d, Input("x"), name="bn")  # timm's BatchNormAct2d is a BatchNorm2d subclass


@register("batchnorm", Module(ACTIVATION_MODULE_TYPES, _bn, name="act"),
          Call(ACTIVATION_FUNCTIONS, _bn, name="act_fn"), _bn)
def build_batchnorm(match: Match, ctx: LayerContext) -> ConvLayer:
    bn = ctx.module("bn")
    activation = norm_activation(bn, ctx.module("act") if "act" in match.named else None)
    if "act_fn" in match.named:
        if activation is not None:
            raise Unsupported("two activations in a row after one BatchNorm")
        activation = activation_of_call(match.named["act_fn"])
    c = ctx.nchw(match.inputs["x"])[1]

    def folded() -> tuple[torch.Tensor, torch.Tensor]:
        return layers.fold_batchnorm(torch.ones(c, 1, 1, 1), None, bn)

    info = ctx.info("BatchNorm as a per-channel scale and shift")
    return conv_layer(ctx, info, Conv2dSpec(c, c, (1, 1), groups=c), folded, activation)
