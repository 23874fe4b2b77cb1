"""LayerNorm over channels on the device: timm's ``LayerNorm2d`` (ConvNeXt's stem, downsamples, head and
its blocks with ``conv_mlp``), which traces to ``permute(0, 2, 3, 1) -> F.layer_norm -> permute(0, 3, 1,
2)``, and the same written with an ``nn.LayerNorm`` module. Device activations are NHWC already
([1, 1, N*H*W, C]), so both permutes cost nothing: the match is one ``layer_norm`` over each pixel's
channels.

ttnn 0.81.1's ``layer_norm`` refuses height-sharded inputs and wants a program config per shape for
block-sharded ones, so on ttnn it reads its input from L1 interleaved (a reshard on the device) and
writes L1 interleaved; gamma and beta are bfloat16 tiles."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.backends.l1 import estimate_eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
PERMUTES = ("permute", torch.permute)


class ChannelLayerNorm(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, weights: Any, eps: float):
        super().__init__(backend, info)
        self.weights, self.eps = weights, eps

    @property
    def l1_bytes(self) -> int:
        n, c, h, w = self.info.input_shapes[0]
        return estimate_eltwise_l1(n * h * w, c, 1, None, self.cfg)[0]  # runs interleaved

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.layer_norm(x, self.weights, self.eps, self.cfg, self.layer)


def permutation(node: fx.Node) -> tuple[int, ...]:
    """The dims of a traced ``x.permute(...)`` or ``torch.permute(x, dims)``."""
    dims = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(d % 4 if isinstance(d, int) else d for d in dims)


def check_permutes(match: Match) -> None:
    found = permutation(match.named["to_nhwc"]), permutation(match.named["to_nchw"])
    if found != (TO_NHWC, TO_NCHW):
        raise Unsupported(f"permutes {found[0]} then {found[1]}; the device's NHWC is NCHW permuted by {TO_NHWC}")


def constant(gm: fx.GraphModule, node: object, what: str) -> torch.Tensor | None:
    """A graph constant (parameter or buffer) passed as ``what``; None for None."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise Unsupported(f"{what} is computed in the graph, not a parameter")
    return functools.reduce(getattr, node.target.split("."), gm).detach()


def norm_parameters(match: Match, ctx: LayerContext, channels: int) -> tuple[torch.Tensor | None,
                                                                              torch.Tensor | None, float]:
    """(weight, bias, eps) of the matched LayerNorm, which must normalise over the channels alone."""
    node = match.named["ln"]
    if node.op == "call_module":
        ln = ctx.module("ln")
        shape, eps = tuple(ln.normalized_shape), ln.eps
        weight = ln.weight.detach() if ln.weight is not None else None
        bias = ln.bias.detach() if ln.bias is not None else None
    else:
        shape = call_arg(node, 1, "normalized_shape")
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        weight = constant(ctx.gm, call_arg(node, 2, "weight"), "LayerNorm weight")
        bias = constant(ctx.gm, call_arg(node, 3, "bias"), "LayerNorm bias")
        eps = call_arg(node, 4, "eps", 1e-5)
    if shape != (channels,):
        raise Unsupported(f"LayerNorm over {shape}; the device normalises over the {channels} channels only")
    return weight, bias, float(eps)


def layer_norm_layer(ctx: LayerContext, info: LayerInfo, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> ChannelLayerNorm:
    config = info.config
    weights = ctx.weight_cache.prepared(
        info.layer, lambda: (weight, bias), lambda w, b: ctx.backend.prepare_layer_norm(w, b, config, info.layer))
    return ChannelLayerNorm(ctx.backend, info, weights, eps)


_to_nhwc = Call(PERMUTES, Input("x"), name="to_nhwc")


@register("layer_norm",
          Call(PERMUTES, Call(F.layer_norm, _to_nhwc, name="ln"), name="to_nchw"),
          Call(PERMUTES, Module(nn.LayerNorm, _to_nhwc, name="ln"), name="to_nchw"), sized_by="x")
def build_layer_norm(match: Match, ctx: LayerContext) -> ChannelLayerNorm:
    check_permutes(match)
    _, c, _, _ = ctx.nchw(match.inputs["x"])
    weight, bias, eps = norm_parameters(match, ctx, c)
    return layer_norm_layer(ctx, ctx.info(f"LayerNorm over {c} channels (eps {eps:g}); permutes: no device op"),
                            weight, bias, eps)
