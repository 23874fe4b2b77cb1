"""Squeeze-excitation, entirely on device: mean over H and W, a 1x1 conv (or a reduction MLP of
two), a sigmoid-like gate, and a per-channel multiply. Matches timm's ``EffectiveSEModule`` (eSE)
and ``SqueezeExcite``-style blocks."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, activation_of, activation_of_module
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.config import Activation
from ttswap.layers import eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module, PatternNode
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg

_GATES = ("sigmoid", "hardsigmoid")
_mean = Call("mean", Input("x"), name="mean")
_one_fc = Module(nn.Conv2d, _mean, name="fc")
_mlp = Module(nn.Conv2d, Module(ACTIVATION_MODULE_TYPES, Module(nn.Conv2d, _mean, name="fc1"), name="act"), name="fc")


def _gated(fc_pattern: PatternNode) -> list[Call]:
    # the gate is a module (timm's SqueezeExcite, eSE) or a call (x_se.sigmoid() in timm's SEModule)
    gates = (Module(ACTIVATION_MODULE_TYPES, fc_pattern, name="gate"),
             Call(ACTIVATION_FUNCTIONS, fc_pattern, name="gate"))
    return [Call((operator.mul, torch.mul), *args, name="mul")
            for gate in gates for args in ((Input("x"), gate), (gate, Input("x")))]


class SqueezeExcite(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, weights: list[Any], hidden_act: Activation | None,
                 gate: Activation):
        super().__init__(backend, info)
        self.weights, self.hidden_act, self.gate = weights, hidden_act, gate

    @property
    def l1_bytes(self) -> int:
        return eltwise_l1(self.info, 2)  # the multiply: the map, its gate, the output

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        s = self.backend.mean_hw(x, self.cfg, self.layer)
        for i, weights in enumerate(self.weights):
            s = self.backend.linear(s, weights, self.cfg, self.layer)
            if i < len(self.weights) - 1 and self.hidden_act is not None:
                s = self.backend.activation(s, self.hidden_act, self.cfg, self.layer)
        s = self.backend.activation(s, self.gate, self.cfg, self.layer)
        return self.backend.multiply(x, s, self.cfg, self.layer)


@register("squeeze_excite", *_gated(_mlp), *_gated(_one_fc))
def build_se(match: Match, ctx: LayerContext) -> SqueezeExcite:
    mean = match.named["mean"]
    dims, keepdim = call_arg(mean, 1, "dim"), call_arg(mean, 2, "keepdim", False)
    if tuple(dims or ()) not in ((2, 3), (-2, -1), (3, 2), (-1, -2)) or not keepdim:
        raise Unsupported(f"mean over {dims} (keepdim={keepdim}) is not a spatial squeeze")
    gate = activation_of(ctx.gm, match.named["gate"])
    if gate is None or gate.kind not in _GATES:
        raise Unsupported(f"gate {gate} is not a sigmoid or hard sigmoid")
    fcs = [ctx.module(k) for k in ("fc1", "fc") if k in match.named]
    if any(fc.kernel_size != (1, 1) or fc.groups != 1 or type(fc) is not nn.Conv2d for fc in fcs):
        raise Unsupported("squeeze-excitation convs must be plain 1x1 convs")
    hidden = activation_of_module(ctx.module("act")) if "act" in match.named else None
    ctx.nchw(match.root)
    info = ctx.info("mean -> " + " -> ".join(f"fc {fc.in_channels}->{fc.out_channels}" for fc in fcs)
                    + f" -> {gate} -> multiply")
    weights = [ctx.weight_cache.prepared(
        f"{info.layer}.fc{i}", lambda fc=fc: (fc.weight.detach().flatten(1), _bias(fc)),
        lambda w, b, i=i: ctx.backend.prepare_linear(w, b, info.config, f"{info.layer}.fc{i}"),
    ) for i, fc in enumerate(fcs)]
    return SqueezeExcite(ctx.backend, info, weights, hidden, gate)


def _bias(fc: nn.Conv2d) -> torch.Tensor | None:
    return fc.bias.detach() if fc.bias is not None else None
