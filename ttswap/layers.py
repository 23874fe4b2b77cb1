"""Device layers shared by several rewriters: convolution (with BatchNorm folded in) and linear."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ttswap.activations import UnsupportedActivation, activation_of_module
from ttswap.backends.base import DeviceTensor
from ttswap.config import Activation, Conv2dSpec, DType
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.registry import BuildContext, Unsupported


@torch.no_grad()
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv followed by inference BatchNorm == one conv with rescaled weights and a shifted bias."""
    if bn.running_mean is None or bn.running_var is None:
        raise Unsupported(f"{type(bn).__name__} without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    folded = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return folded.float(), shift.float()


def conv_spec(conv: nn.Conv2d) -> Conv2dSpec:
    if type(conv) is not nn.Conv2d:
        raise Unsupported(f"{type(conv).__name__} is a Conv2d subclass with its own forward")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise Unsupported(f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; only explicit zero padding runs on device")
    return Conv2dSpec(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
    )


def norm_activation(bn: nn.Module | None, act: nn.Module | None) -> Activation | None:
    """The one activation after a conv: timm's BatchNormAct2d carries its own, or a separate module."""
    acts = []
    for module in (getattr(bn, "act", None), act):
        if module is None:
            continue
        try:
            found = activation_of_module(module)
        except UnsupportedActivation as exc:
            raise Unsupported(f"activation {exc} has no device implementation") from None
        if found is not None:
            acts.append(found)
    if len(acts) > 1:
        raise Unsupported("two activations in a row after one conv")
    return acts[0] if acts else None


def bfp8_channel_error(weight: torch.Tensor, groups: int) -> float:
    """Worst per-output-channel relative error bfloat8_b puts on conv weights, as ttnn lays them out:
    a [kh*kw*Cin, Cout] matrix whose exponent blocks run over 16 output channels. Grouped weights are
    expanded block-diagonally first, as ttnn does."""
    from ttswap.backends.numerics import quantize_bfp8_b

    cout, cin_g, kh, kw = weight.shape
    if groups > 1:
        full = weight.new_zeros(cout, cin_g * groups, kh, kw)
        per = cout // groups
        for g in range(groups):
            full[g * per:(g + 1) * per, g * cin_g:(g + 1) * cin_g] = weight[g * per:(g + 1) * per]
        weight = full
    matrix = weight.permute(2, 3, 1, 0).reshape(-1, cout)
    err = (quantize_bfp8_b(matrix) - matrix).norm(dim=0) / matrix.norm(dim=0).clamp_min(1e-30)
    return float(err.max())


class ConvLayer(TTModule):
    """One device conv2d with optional bias and fused activation. ``folded`` returns the fp32 weight
    and bias (BatchNorm folded in); it is not called when the weight cache holds what they give."""

    def __init__(self, ctx: BuildContext, info: LayerInfo, spec: Conv2dSpec,
                 folded: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], activation: Activation | None,
                 input_nhw: tuple[int, int, int]):
        super().__init__(ctx.backend, info)
        self.spec, self.activation = spec, activation
        folded = functools.cache(folded)
        info.config = _guard_bfp8(ctx, info, lambda: folded()[0], spec.groups)
        self.weights = ctx.weight_cache.prepared(
            info.layer, folded, lambda w, b: ctx.backend.prepare_conv(w, b, spec, info.config, info.layer))
        info.l1_bytes = _conv_l1(spec, input_nhw, info)
        info.notes.insert(0, f"conv {spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]} {spec.in_channels}->"
                             f"{spec.out_channels}" + (f" g{spec.groups}" if spec.groups > 1 else "")
                             + (f" +{activation}" if activation else ""))

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.conv2d(x, self.weights, self.spec, self.cfg, self.layer, self.activation)


def make_conv(ctx: BuildContext, info: LayerInfo, conv: nn.Conv2d, bn: nn.BatchNorm2d | None,
              activation: Activation | None, input_shape: tuple[int, ...]) -> ConvLayer:
    spec = conv_spec(conv)

    def folded() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else None
        return fold_batchnorm(weight, bias, bn) if bn is not None else (weight, bias)

    n, _, h, w = input_shape
    return ConvLayer(ctx, info, spec, folded, activation, (n, h, w))


def _guard_bfp8(ctx: BuildContext, info: LayerInfo, weight: Callable[[], torch.Tensor], groups: int):
    cfg = info.config
    guard = ctx.recipe.bfp8_guard
    if cfg is None or guard is None or cfg.weight_dtype is not DType.BFP8_B:
        return cfg
    error = ctx.weight_cache.value(f"{info.layer}/bfp8_error", lambda: bfp8_channel_error(weight(), groups))
    if error > guard:
        info.notes.append(f"bf16 weights: bfp8_b would put {error:.1%} error on a channel (guard {guard:.1%})")
        return cfg.replace(weight_dtype=DType.BF16)
    return cfg


def _conv_l1(spec: Conv2dSpec, input_nhw: tuple[int, int, int], info: LayerInfo) -> int | None:
    from ttswap.backends.l1 import estimate_conv_l1

    n, h, w = input_nhw
    needed, _ = estimate_conv_l1(spec, n, h, w, info.config)
    return needed
