"""ResNeSt's split attention (timm's ``SplitAttn``, traced as one leaf) wholly on the device, for radix 2.

What it computes: a grouped conv (BatchNorm folded, activation fused) makes ``radix`` maps of C
channels; their sum is pooled to [N, 1, 1, C], run through fc1 (its BatchNorm folded) and the
activation, then fc2 gives one logit per radix and channel, a softmax over the radix axis turns them
into weights, and the output is the weighted sum of the maps.

For radix 2 the softmax needs no softmax op: softmax(a, b) = (sigmoid(a - b), sigmoid(b - a)), and
a - b is itself linear in fc1's output, so fc2 is replaced by two linears whose weights are the
difference of fc2's rows for the two radixes (and its negation), each with the sigmoid after it. The
maps are two channel slices of the conv's output. Everything is then slices, add, mean, linear,
activations and multiplies the device already has."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ttswap import layers
from ttswap.activations import activation_of_module
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Activation, Conv2dSpec
from ttswap.layers import ConvLayer, eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.convs import conv_layer, conv_spec, folded_weights
from ttswap.patterns.matcher import Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

try:
    from timm.layers.split_attn import SplitAttn
except ImportError:  # pragma: no cover - timm is a dependency
    SplitAttn = None

SIGMOID = Activation("sigmoid")


class SplitAttention(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, conv: ConvLayer, channels: int, fc1: Any,
                 hidden_act: Activation | None, attn: tuple[Any, Any]):
        super().__init__(backend, info)
        self.conv, self.channels, self.fc1, self.hidden_act, self.attn = conv, channels, fc1, hidden_act, attn

    @property
    def l1_bytes(self) -> int:
        n, _, h, w = self.info.output_shape
        return max(self.conv.l1_bytes, eltwise_l1(self.info, 3, (n, self.channels, h, w)))

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        be, cfg, layer, c = self.backend, self.cfg, self.layer, self.channels
        y = self.conv(x)
        maps = [be.slice_channels(y, r * c, (r + 1) * c, cfg, layer) for r in range(2)]
        pooled = be.mean_hw(be.add(maps[0], maps[1], cfg, layer), cfg, layer)
        hidden = be.linear(pooled, self.fc1, cfg, layer)
        if self.hidden_act is not None:
            hidden = be.activation(hidden, self.hidden_act, cfg, layer)
        weighted = [be.multiply(m, be.activation(be.linear(hidden, w, cfg, layer), SIGMOID, cfg, layer), cfg, layer)
                    for m, w in zip(maps, self.attn)]
        return be.add(weighted[0], weighted[1], cfg, layer)


def dense_1x1(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A grouped 1x1 conv's weight as one dense [out, in] matrix (zeros between groups), and its bias."""
    weight = conv.weight.detach().flatten(1)
    if conv.groups > 1:
        out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
        dense = weight.new_zeros(conv.out_channels, conv.in_channels)
        for g in range(conv.groups):
            dense[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = weight[g * out_per:(g + 1) * out_per]
        weight = dense
    return weight, conv.bias.detach() if conv.bias is not None else None


def radix_rows(channels: int, radix: int, cardinality: int, r: int) -> torch.Tensor:
    """fc2's output rows holding radix ``r``'s logit for each of the C output channels, in channel order:
    RadixSoftmax views fc2's output as (cardinality, radix, C / cardinality)."""
    per = channels // cardinality
    j = torch.arange(channels)
    return (j // per) * radix * per + r * per + j % per


def _patterns() -> list:
    return [] if SplitAttn is None else [Module(SplitAttn, Input("x"), name="attn")]


@register("split_attention", *_patterns())
def build_split_attention(match: Match, ctx: LayerContext) -> SplitAttention:
    module = ctx.module("attn")
    radix = module.radix
    if radix != 2:
        raise Unsupported(f"split attention with radix {radix}; the device runs radix 2 (softmax as sigmoids)")
    for name in ("bn0", "bn1"):
        if not isinstance(getattr(module, name), (nn.BatchNorm2d, nn.Identity)):
            raise Unsupported(f"{name} is {type(getattr(module, name)).__name__}; BatchNorm2d or none folds")
    if not isinstance(module.drop, nn.Identity):
        raise Unsupported(f"drop layer {type(module.drop).__name__}")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    channels = module.conv.out_channels // radix
    spec: Conv2dSpec = conv_spec(module.conv)
    bn0 = module.bn0 if isinstance(module.bn0, nn.BatchNorm2d) else None
    act0 = activation_of_module(module.act0)
    info = ctx.info(f"split attention, radix 2 over {channels} channels: softmax as two sigmoids")
    conv = conv_layer(ctx, ctx.info(layer=f"{info.layer}.conv"), spec, folded_weights(module.conv, bn0), act0)

    fc1_w, fc1_b = dense_1x1(module.fc1)
    if isinstance(module.bn1, nn.BatchNorm2d):
        fc1_w, fc1_b = layers.fold_batchnorm(fc1_w, fc1_b, module.bn1)
    fc2_w, fc2_b = dense_1x1(module.fc2)
    if fc2_b is None:
        fc2_b = fc2_w.new_zeros(fc2_w.shape[0])
    rows = [radix_rows(channels, radix, module.rsoftmax.cardinality, r) for r in range(radix)]
    diff_w, diff_b = fc2_w[rows[0]] - fc2_w[rows[1]], fc2_b[rows[0]] - fc2_b[rows[1]]

    def linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        return ctx.weight_cache.prepared(f"{info.layer}.{name}", lambda: (weight, bias),
                                         lambda wt, b: ctx.backend.prepare_linear(wt, b, info.config,
                                                                                  f"{info.layer}.{name}"))

    attn = (linear("attn0", diff_w, diff_b), linear("attn1", -diff_w, -diff_b))
    return SplitAttention(ctx.backend, info, conv, channels, linear("fc1", fc1_w, fc1_b),
                          activation_of_module(module.act1), attn)
