"""Squeeze-excitation, entirely on device: mean over H and W, a 1x1 conv (or a reduction MLP of
two), a sigmoid-like gate, and a per-channel multiply. Matches timm's ``EffectiveSEModule`` (eSE)
and ``SqueezeExcite``-style blocks."""

from __future__ import annotations

import operator

import torch
from torch import nn

from ttswap.activations import (ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES, UnsupportedActivation,
                                activation_of_call, activation_of_module)
from ttswap.backends.base import DeviceTensor
from ttswap.config import Activation
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import BuildContext, Unsupported, register

_GATES = ("sigmoid", "hardsigmoid")
_mean = Call("mean", Input("x"), name="mean")
_one_fc = Module(nn.Conv2d, _mean, name="fc")
_mlp = Module(nn.Conv2d, Module(ACTIVATION_MODULE_TYPES, Module(nn.Conv2d, _mean, name="fc1"), name="act"), name="fc")


def _gated(fc_pattern):
    # the gate is a module (timm's SqueezeExcite, eSE) or a call (x_se.sigmoid() in timm's SEModule)
    gates = (Module(ACTIVATION_MODULE_TYPES, fc_pattern, name="gate"), Call(ACTIVATION_FUNCTIONS, fc_pattern, name="gate"))
    return [Call((operator.mul, torch.mul), *args, name="mul")
            for gate in gates for args in ((Input("x"), gate), (gate, Input("x")))]


class SqueezeExcite(TTModule):
    def __init__(self, ctx: BuildContext, info: LayerInfo, fcs: list[nn.Conv2d], hidden_act: Activation | None,
                 gate: Activation):
        super().__init__(ctx.backend, info)
        self.hidden_act, self.gate = hidden_act, gate
        self.weights = [ctx.weight_cache.prepared(
            f"{info.layer}.fc{i}", lambda fc=fc: (fc.weight.detach().flatten(1), _bias(fc)),
            lambda w, b, i=i: ctx.backend.prepare_linear(w, b, info.config, f"{info.layer}.fc{i}"),
        ) for i, fc in enumerate(fcs)]

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        s = self.backend.mean_hw(x, self.cfg, self.layer)
        for i, weights in enumerate(self.weights):
            s = self.backend.linear(s, weights, self.cfg, self.layer)
            if i < len(self.weights) - 1 and self.hidden_act is not None:
                s = self.backend.activation(s, self.hidden_act, self.cfg, self.layer)
        s = self.backend.activation(s, self.gate, self.cfg, self.layer)
        return self.backend.multiply(x, s, self.cfg, self.layer)


def _bias(fc: nn.Conv2d):
    return fc.bias.detach() if fc.bias is not None else None


def _act(module: nn.Module) -> Activation | None:
    try:
        return activation_of_module(module)
    except UnsupportedActivation as exc:
        raise Unsupported(f"activation {exc} has no device implementation") from None


@register("squeeze_excite", *_gated(_mlp), *_gated(_one_fc))
def build_se(match: Match, ctx: BuildContext):
    mean = match.named["mean"]
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if tuple(dims or ()) not in ((2, 3), (-2, -1), (3, 2), (-1, -2)) or not keepdim:
        raise Unsupported(f"mean over {dims} (keepdim={keepdim}) is not a spatial squeeze")
    gate_node = match.named["gate"]
    if gate_node.op == "call_module":
        gate = _act(match.module(ctx.gm, "gate"))
    else:
        try:
            gate = activation_of_call(gate_node.target, gate_node.args, gate_node.kwargs)
        except UnsupportedActivation as exc:
            raise Unsupported(f"gate {exc} has no device implementation") from None
    if gate is None or gate.kind not in _GATES:
        raise Unsupported(f"gate {gate} is not a sigmoid or hard sigmoid")
    fcs = [match.module(ctx.gm, k) for k in ("fc1", "fc") if k in match.named]
    if any(fc.kernel_size != (1, 1) or fc.groups != 1 or type(fc) is not nn.Conv2d for fc in fcs):
        raise Unsupported("squeeze-excitation convs must be plain 1x1 convs")
    hidden = _act(match.module(ctx.gm, "act")) if "act" in match.named else None
    resolved = ctx.config(match, "squeeze_excite")
    info = ctx.info(match, "squeeze_excite", resolved)
    info.notes.append("mean -> " + " -> ".join(f"fc {fc.in_channels}->{fc.out_channels}" for fc in fcs)
                      + f" -> {gate} -> multiply")
    from ttswap.backends.l1 import estimate_eltwise_l1

    n, c, h, w = ctx.nchw(match.root)
    info.l1_bytes = estimate_eltwise_l1(n * h * w, c, 2, ctx.grid(resolved.config, match.root), resolved.config)[0]
    return SqueezeExcite(ctx, info, fcs, hidden, gate)
