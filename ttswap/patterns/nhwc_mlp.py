"""A pointwise MLP on channels-last maps, as ConvNeXt writes its blocks without ``conv_mlp``:
``permute(0, 2, 3, 1) -> [LayerNorm] -> Linear -> act -> Linear -> permute(0, 3, 1, 2)``, optionally
followed by the layer scale ``x.mul(gamma.reshape(1, -1, 1, 1))``.

A ``Linear`` over the last dim of an NHWC map is a 1x1 conv over its channels, and device activations
are NHWC already, so the permutes cost nothing: the match runs as a LayerNorm over channels, a 1x1 conv
with the activation fused, and a 1x1 conv with the layer scale folded into its weights."""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ttswap.activations import (ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, activation_of_call,
                                activation_of_module)
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Conv2dSpec
from ttswap.layers import ConvLayer
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.convs import conv_layer
from ttswap.patterns.layer_norm import (PERMUTES, ChannelLayerNorm, check_permutes, constant, layer_norm_layer,
                                        norm_parameters)
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register


class NhwcMlp(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, norm: ChannelLayerNorm | None, fc1: ConvLayer,
                 fc2: ConvLayer):
        super().__init__(backend, info)
        self.norm, self.fc1, self.fc2 = norm, fc1, fc2

    @property
    def l1_bytes(self) -> int:
        parts = [self.fc1.l1_bytes, self.fc2.l1_bytes] + ([self.norm.l1_bytes] if self.norm is not None else [])
        return max(parts)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.fc2(self.fc1(x))


def _patterns() -> list:
    to_nhwc = Call(PERMUTES, Input("x"), name="to_nhwc")
    found = []
    for norm in (Module(nn.LayerNorm, to_nhwc, name="ln"), Call(F.layer_norm, to_nhwc, name="ln"), to_nhwc):
        fc1 = Module(nn.Linear, norm, name="fc1")
        for act in (Module(ACTIVATION_MODULE_TYPES, fc1, name="act"), Call(ACTIVATION_FUNCTIONS, fc1, name="act")):
            back = Call(PERMUTES, Module(nn.Linear, act, name="fc2"), name="to_nchw")
            found += [Call(("mul", operator.mul, torch.mul), back, name="scale"), back]
    return found


def _pointwise(linear: nn.Linear, scale: torch.Tensor | None) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The Linear as 1x1 conv weights, with a per-channel scale folded in."""
    def folded() -> tuple[torch.Tensor, torch.Tensor]:
        weight = linear.weight.detach().double()
        bias = linear.bias.detach().double() if linear.bias is not None else weight.new_zeros(weight.shape[0])
        if scale is not None:
            weight, bias = weight * scale.double()[:, None], bias * scale.double()
        return weight[:, :, None, None].float(), bias.float()

    return folded


@register("nhwc_mlp", *_patterns(), sized_by="x")
def build_nhwc_mlp(match: Match, ctx: LayerContext) -> NhwcMlp:
    check_permutes(match)
    _, c, _, _ = ctx.nchw(match.inputs["x"])
    fc1, fc2 = ctx.module("fc1"), ctx.module("fc2")
    if fc1.in_features != c or fc2.in_features != fc1.out_features:
        raise Unsupported(f"Linear {fc1.in_features}->{fc1.out_features}->{fc2.out_features} on {c} channels")
    act_node = match.named["act"]
    activation = activation_of_module(ctx.module("act")) if act_node.op == "call_module" \
        else activation_of_call(act_node)
    scale = None
    if "scale" in match.named:
        node = match.named["scale"]
        scale = constant(ctx.gm, node.args[1] if len(node.args) == 2 else None, "the layer scale")
        if scale.numel() != fc2.out_features:
            raise Unsupported(f"multiply by a {tuple(scale.shape)} constant; only a per-channel scale folds")
        scale = scale.flatten()
    info = ctx.info(f"pointwise MLP {c}->{fc1.out_features}->{fc2.out_features} on NHWC"
                    + (" +LayerNorm" if "ln" in match.named else "") + (" +layer scale" if scale is not None else "")
                    + "; permutes: no device op")
    norm = None
    if "ln" in match.named:
        weight, bias, eps = norm_parameters(match, ctx, c)
        norm = layer_norm_layer(ctx, ctx.info(layer=f"{info.layer}.norm"), weight, bias, eps)
    convs = []
    for name, linear, act, factor in (("fc1", fc1, activation, None), ("fc2", fc2, None, scale)):
        spec = Conv2dSpec(linear.in_features, linear.out_features, (1, 1))
        convs.append(conv_layer(ctx, ctx.info(layer=f"{info.layer}.{name}"), spec, _pointwise(linear, factor), act))
    return NhwcMlp(ctx.backend, info, norm, *convs)
