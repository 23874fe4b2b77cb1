"""BatchNorm that no conv before it absorbs (pre-activation networks: DenseNet, ResNetV2, RepVGG's
identity branch), with a following activation: on device as a per-channel scale and shift, run as a
depthwise 1x1 conv whose weights are the scales and whose bias is the shift, so the activation fuses
and the numerics are the conv's."""

from __future__ import annotations

import torch
from torch import nn

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, UnsupportedActivation, activation_of_call
from ttswap.config import Conv2dSpec
from ttswap.layers import ConvLayer, fold_batchnorm, norm_activation
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

_bn = Module(nn.BatchNorm2d, Input("x"), name="bn")  # timm's BatchNormAct2d is a BatchNorm2d subclass


@register("batchnorm", Module(ACTIVATION_MODULE_TYPES, _bn, name="act"), Call(ACTIVATION_FUNCTIONS, _bn, name="act_fn"),
          _bn)
def build_batchnorm(match: Match, ctx: BuildContext):
    bn = match.module(ctx.gm, "bn")
    activation = norm_activation(bn, match.module(ctx.gm, "act") if "act" in match.named else None)
    if "act_fn" in match.named:
        node = match.named["act_fn"]
        if activation is not None:
            raise Unsupported("two activations in a row after one BatchNorm")
        try:
            activation = activation_of_call(node.target, node.args, node.kwargs)
        except UnsupportedActivation as exc:
            raise Unsupported(f"activation {exc} has no device implementation") from None
    n, c, h, w = ctx.nchw(match.inputs["x"])
    spec = Conv2dSpec(c, c, (1, 1), groups=c)

    def folded() -> tuple[torch.Tensor, torch.Tensor]:
        return fold_batchnorm(torch.ones(c, 1, 1, 1), None, bn)

    resolved = ctx.config(match, "batchnorm")
    info = ctx.info(match, "batchnorm", resolved)
    layer = ConvLayer(ctx, info, spec, folded, activation, (n, h, w))
    info.notes.insert(1, "BatchNorm as a per-channel scale and shift")
    return layer
