"""A linear layer on a flattened [N, C, 1, 1] map: the classifier of heads that pool, then run a
1x1 conv (MobileNetV3, GhostNet), then flatten. Takes ``nn.Linear`` or ``F.linear`` (timm's
``Linear`` traces to it, with its weight and bias as graph constants), after ``nn.Flatten`` or
``torch.flatten``, with an inference-mode ``F.dropout`` in between dropped."""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.backends.l1 import estimate_eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

_FLATTENS = (Module(nn.Flatten, Input("x"), name="flatten"),
             Call((torch.flatten, "flatten"), Input("x"), name="flatten"))
_INPUTS = (*_FLATTENS, *(Call(F.dropout, flat, name="dropout") for flat in _FLATTENS))


class LinearHead(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(ctx.backend, info)
        self.weights = ctx.weight_cache.prepared(
            info.layer, lambda: (weight, bias), lambda w, b: ctx.backend.prepare_linear(w, b, info.config, info.layer))

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.linear(x, self.weights, self.cfg, self.layer)


def _constant(gm: fx.GraphModule, node: object, what: str) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise Unsupported(f"linear {what} is computed in the graph, not a parameter")
    return functools.reduce(getattr, node.target.split("."), gm).detach()


@register("linear", *(Module(nn.Linear, flat, name="fc") for flat in _INPUTS),
          *(Call(F.linear, flat, name="fc") for flat in _INPUTS))
def build_linear(match: Match, ctx: BuildContext):
    if "dropout" in match.named:
        drop = match.named["dropout"]
        training = drop.args[2] if len(drop.args) > 2 else drop.kwargs.get("training", True)
        if training is not False:
            raise Unsupported("F.dropout in training mode")
    n, c, h, w = ctx.nchw(match.inputs["x"])
    if (h, w) != (1, 1):
        raise Unsupported(f"flatten of a {c}x{h}x{w} map; the device runs a linear layer on [N, C, 1, 1] only")
    node = match.named["fc"]
    if node.op == "call_module":
        fc = match.module(ctx.gm, "fc")
        weight, bias = fc.weight.detach(), fc.bias.detach() if fc.bias is not None else None
    else:
        weight = _constant(ctx.gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"), "weight")
        bias = _constant(ctx.gm, node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"), "bias")
    resolved = ctx.config(match, "linear", match.inputs["x"])
    info = ctx.info(match, "linear", resolved)
    info.notes.append(f"linear {weight.shape[1]}->{weight.shape[0]}")
    info.l1_bytes = estimate_eltwise_l1(n, c, 1, None, resolved.config)[0]
    return LinearHead(ctx, info, weight, bias)
