"""Residual add of two device tensors of one shape, with a following activation fused in."""

from __future__ import annotations

import operator

import torch

from ttswap.activations import ACTIVATION_MODULE_TYPES, activation_of_module
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Activation
from ttswap.layers import eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

_add = Call((operator.add, torch.add, operator.iadd), Input("a"), Input("b"), name="add")


class Add(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, activation: Activation | None):
        super().__init__(backend, info)
        self.activation = activation

    @property
    def l1_bytes(self) -> int:
        return eltwise_l1(self.info, 2)

    def forward(self, a: DeviceTensor, b: DeviceTensor) -> DeviceTensor:
        return self.backend.add(a, b, self.cfg, self.layer, self.activation)


@register("add", Module(ACTIVATION_MODULE_TYPES, _add, name="act"), _add)
def build_add(match: Match, ctx: LayerContext) -> Add:
    node = match.named["add"]
    if len(node.args) > 2 or node.kwargs:
        raise Unsupported("add with alpha or out= arguments")
    a, b = (ctx.nchw(match.inputs[k]) for k in ("a", "b"))
    if a != b:
        raise Unsupported(f"add of shapes {a} and {b}: the device adds equal shapes only")
    activation = activation_of_module(ctx.module("act")) if "act" in match.named else None
    return Add(ctx.backend, ctx.info("add" + (f" +{activation}" if activation else "")), activation)
