"""Builder-side setup of the conv layers several rewriters make (conv, batchnorm, separable_conv): the
spec read from the torch module, the one activation after it, the folded weights through the weight
cache, and the bfloat8_b guard, decided before the layer is built. Not a pattern: it registers none."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ttswap import layers  # called through the module, so tests can check the cache skips them
from ttswap.activations import activation_of_call, activation_of_module
from ttswap.config import Activation, Conv2dSpec, DType
from ttswap.layers import ConvLayer
from ttswap.modules import LayerInfo
from ttswap.patterns.matcher import Match
from ttswap.patterns.registry import LayerContext, Unsupported

Folded = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]  # fp32 weight and bias, BatchNorm folded in


def conv_spec(conv: nn.Conv2d) -> Conv2dSpec:
    if type(conv) is not nn.Conv2d:
        raise Unsupported(f"{type(conv).__name__} is a Conv2d subclass with its own forward")
    try:
        return Conv2dSpec.from_torch(conv)
    except ValueError as exc:
        raise Unsupported(str(exc)) from None


def norm_activation(bn: nn.Module | None, act: nn.Module | None) -> Activation | None:
    """The one activation after a conv: timm's BatchNormAct2d carries its own, or a separate module."""
    found = [a for a in (activation_of_module(m) for m in (getattr(bn, "act", None), act) if m is not None) if a]
    if len(found) > 1:
        raise Unsupported("two activations in a row after one conv")
    return found[0] if found else None


def conv_activation(match: Match, ctx: LayerContext) -> Activation | None:
    """The one activation a conv pattern matched: its norm's own, an ``act`` module or an ``act_fn`` call."""
    bn = ctx.module("bn") if "bn" in match.named else None
    activation = norm_activation(bn, ctx.module("act") if "act" in match.named else None)
    if "act_fn" in match.named:
        if activation is not None:
            raise Unsupported("two activations in a row after one conv")
        activation = activation_of_call(match.named["act_fn"])
    return activation


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> Folded:
    def folded() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else None
        return layers.fold_batchnorm(weight, bias, bn) if bn is not None else (weight, bias)

    return folded


def conv_layer(ctx: LayerContext, info: LayerInfo, spec: Conv2dSpec, folded: Folded,
               activation: Activation | None) -> ConvLayer:
    """The conv layer for ``info``: its weights ``folded()`` (called only when the cache misses), kept
    in bfloat16 if bfloat8_b would put more error than the recipe's guard on one output channel."""
    folded = functools.cache(folded)
    info = _guard_bfp8(ctx, info, lambda: folded()[0], spec.groups)
    info = info.replace(notes=(_describe(spec, activation), *info.notes))
    config = info.config
    weights = ctx.weight_cache.prepared(
        info.layer, folded, lambda w, b: ctx.backend.prepare_conv(w, b, spec, config, info.layer))
    return ConvLayer(ctx.backend, info, spec, weights, activation)


def _guard_bfp8(ctx: LayerContext, info: LayerInfo, weight: Callable[[], torch.Tensor], groups: int) -> LayerInfo:
    cfg, guard = info.config, ctx.recipe.bfp8_guard
    if cfg is None or guard is None or cfg.weight_dtype is not DType.BFP8_B:
        return info
    error = ctx.weight_cache.value(f"{info.layer}/bfp8_error", lambda: layers.bfp8_channel_error(weight(), groups))
    if error <= guard:
        return info
    note = f"bf16 weights: bfp8_b would put {error:.1%} error on a channel (guard {guard:.1%})"
    return info.replace(config=cfg.replace(weight_dtype=DType.BF16), notes=(*info.notes, note))


def _describe(spec: Conv2dSpec, activation: Activation | None) -> str:
    return (f"conv {spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]} {spec.in_channels}->{spec.out_channels}"
            + (f" g{spec.groups}" if spec.groups > 1 else "") + (f" +{activation}" if activation else ""))
