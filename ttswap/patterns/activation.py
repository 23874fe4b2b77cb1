"""A standalone activation (one that no conv or add absorbed) as a device eltwise op."""

from __future__ import annotations

from ttswap.activations import (ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, UnsupportedActivation,
                                activation_of_call, activation_of_module)
from ttswap.backends.base import DeviceTensor
from ttswap.config import Activation
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register


class Eltwise(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, activation: Activation):
        super().__init__(ctx.backend, info)
        self.activation = activation

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.activation(x, self.activation, self.cfg, self.layer)


@register("activation", Module(ACTIVATION_MODULE_TYPES, Input("x"), name="act"),
          Call(ACTIVATION_FUNCTIONS, Input("x"), name="act"))
def build_activation(match: Match, ctx: BuildContext):
    node = match.named["act"]
    try:
        if node.op == "call_module":
            activation = activation_of_module(match.module(ctx.gm, "act"))
        else:
            activation = activation_of_call(node.target, node.args, node.kwargs)
    except UnsupportedActivation as exc:
        raise Unsupported(f"activation {exc} has no device implementation") from None
    if activation is None:
        raise Unsupported("identity")
    n, c, h, w = ctx.nchw(node)
    resolved = ctx.config(match, "activation")
    info = ctx.info(match, "activation", resolved)
    info.notes.append(str(activation))
    from ttswap.backends.l1 import estimate_eltwise_l1

    info.l1_bytes = estimate_eltwise_l1(n * h * w, c, 1, ctx.grid(resolved.config, node), resolved.config)[0]
    return Eltwise(ctx, info, activation)
