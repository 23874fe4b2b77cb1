"""A standalone activation (one that no conv or add absorbed) as a device eltwise op."""

from __future__ import annotations

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, activation_of
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Activation
from ttswap.layers import eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register


class Eltwise(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, activation: Activation):
        super().__init__(backend, info)
        self.activation = activation

    @property
    def l1_bytes(self) -> int:
        return eltwise_l1(self.info, 1)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.activation(x, self.activation, self.cfg, self.layer)


@register("activation", Module(ACTIVATION_MODULE_TYPES, Input("x"), name="act"),
          Call(ACTIVATION_FUNCTIONS, Input("x"), name="act"))
def build_activation(match: Match, ctx: LayerContext) -> Eltwise:
    activation = activation_of(ctx.gm, match.named["act"])
    if activation is None:
        raise Unsupported("identity")
    ctx.nchw(match.root)
    return Eltwise(ctx.backend, ctx.info(str(activation)), activation)
