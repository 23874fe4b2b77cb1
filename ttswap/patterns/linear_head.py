"""A linear layer on a flattened [N, C, 1, 1] map: the classifier of heads that pool, then run a
1x1 conv (MobileNetV3, GhostNet), then flatten. Takes ``nn.Linear`` or ``F.linear`` (timm's
``Linear`` traces to it, with its weight and bias as graph constants), after ``nn.Flatten`` or
``torch.flatten``, with an inference-mode ``F.dropout`` in between dropped."""

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

_FLATTENS = (Module(nn.Flatten, Input("x"), name="flatten"),
             Call((torch.flatten, "flatten"), Input("x"), name="flatten"))
_INPUTS = (*_FLATTENS, *(Call(F.dropout, flat, name="dropout") for flat in _FLATTENS))


class LinearHead(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, weights: Any):
        super().__init__(backend, info)
        self.weights = weights

    @property
    def l1_bytes(self) -> int:
        n, c = self.info.input_shapes[0][:2]
        return estimate_eltwise_l1(n, c, 1, None, self.cfg)[0]  # [N, C] rows, counted as interleaved

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.linear(x, self.weights, self.cfg, self.layer)


def _constant(gm: fx.GraphModule, node: object, what: str) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise Unsupported(f"linear {what} is computed in the graph, not a parameter")
    return functools.reduce(getattr, node.target.split("."), gm).detach()


@register("linear", *(Module(nn.Linear, flat, name="fc") for flat in _INPUTS),
          *(Call(F.linear, flat, name="fc") for flat in _INPUTS), sized_by="x")
def build_linear(match: Match, ctx: LayerContext) -> LinearHead:
    if "dropout" in match.named and call_arg(match.named["dropout"], 2, "training", True) is not False:
        raise Unsupported("F.dropout in training mode")
    _, c, h, w = ctx.nchw(match.inputs["x"])
    if (h, w) != (1, 1):
        raise Unsupported(f"flatten of a {c}x{h}x{w} map; the device runs a linear layer on [N, C, 1, 1] only")
    node = match.named["fc"]
    if node.op == "call_module":
        fc = ctx.module("fc")
        weight, bias = fc.weight.detach(), fc.bias.detach() if fc.bias is not None else None
    else:
        weight = _constant(ctx.gm, call_arg(node, 1, "weight"), "weight")
        bias = _constant(ctx.gm, call_arg(node, 2, "bias"), "bias")
    info = ctx.info(f"linear {weight.shape[1]}->{weight.shape[0]}")
    weights = ctx.weight_cache.prepared(
        info.layer, lambda: (weight, bias), lambda w, b: ctx.backend.prepare_linear(w, b, info.config, info.layer))
    return LinearHead(ctx.backend, info, weights)
