"""Residual add of two device tensors of one shape, with a following activation fused in."""

from __future__ import annotations

import operator

import torch

from ttswap.activations import ACTIVATION_MODULE_TYPES, UnsupportedActivation, activation_of_module
from ttswap.backends.base import DeviceTensor
from ttswap.config import Activation
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

_add = Call((operator.add, torch.add, operator.iadd), Input("a"), Input("b"), name="add")


class Add(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, activation: Activation | None):
        super().__init__(ctx.backend, info)
        self.activation = activation

    def forward(self, a: DeviceTensor, b: DeviceTensor) -> DeviceTensor:
        return self.backend.add(a, b, self.cfg, self.layer, self.activation)


@register("add", Module(ACTIVATION_MODULE_TYPES, _add, name="act"), _add)
def build_add(match: Match, ctx: BuildContext):
    node = match.named["add"]
    if len(node.args) > 2 or node.kwargs:
        raise Unsupported("add with alpha or out= arguments")
    a, b = (ctx.nchw(match.inputs[k]) for k in ("a", "b"))
    if a != b:
        raise Unsupported(f"add of shapes {a} and {b}: the device adds equal shapes only")
    activation = None
    if "act" in match.named:
        try:
            activation = activation_of_module(match.module(ctx.gm, "act"))
        except UnsupportedActivation as exc:
            raise Unsupported(f"activation {exc} has no device implementation") from None
    resolved = ctx.config(match, "add")
    info = ctx.info(match, "add", resolved)
    info.notes.append("add" + (f" +{activation}" if activation else ""))
    from ttswap.backends.l1 import estimate_eltwise_l1

    n, c, h, w = a
    info.l1_bytes = estimate_eltwise_l1(n * h * w, c, 2, ctx.grid(resolved.config, match.root), resolved.config)[0]
    return Add(ctx, info, activation)
