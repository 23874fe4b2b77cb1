"""TensorFlow "same" convs (timm's ``Conv2dSame``, in the tf_* EfficientNets and MobileNets), optionally
followed by BatchNorm (folded) and an activation (fused), as ``conv_bn_act`` does for ``nn.Conv2d``.

``Conv2dSame`` pads in its own forward, by an amount that depends on the input size and is uneven for
strided convs (a 3x3/2 conv on 224x224 pads 0 above and 1 below). The pad is worked out here from the
traced input size with timm's own rule; an even pad makes an ordinary conv, an uneven one is passed to
ttnn's conv2d as four-sided padding (top, bottom, left, right), which ttnn 0.81.1 accepts."""

from __future__ import annotations

from typing import Any

from torch import nn

from ttswap.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULE_TYPES
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.backends.l1 import estimate_conv_l1
from ttswap.config import Activation, Conv2dSpec
from ttswap.layers import ConvLayer
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.convs import conv_activation, conv_layer, folded_weights
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

try:
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding
except ImportError:  # pragma: no cover - timm is a dependency; without it there is nothing to match
    Conv2dSame, get_same_padding = None, None


class PaddedConvLayer(TTModule):
    """A conv whose zero padding differs above and below, or left and right."""

    def __init__(self, backend: Backend, info: LayerInfo, spec: Conv2dSpec, weights: Any,
                 activation: Activation | None, padding: tuple[int, int, int, int]):
        super().__init__(backend, info)
        self.spec, self.weights, self.activation, self.padding = spec, weights, activation, padding

    @property
    def l1_bytes(self) -> int:
        n, _, h, w = self.info.input_shapes[0]
        top, bottom, left, right = self.padding
        has_bias = getattr(self.weights, "bias", None) is not None
        return estimate_conv_l1(self.spec, n, h + top + bottom, w + left + right, self.cfg, has_bias=has_bias)[0]

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.conv2d_padded(x, self.weights, self.spec, self.padding, self.cfg, self.layer,
                                          self.activation)


def same_padding(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) as ``timm.layers.padding.pad_same`` pads a ``h`` x ``w`` input."""
    pad_h = get_same_padding(h, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    pad_w = get_same_padding(w, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2


def _patterns() -> list:
    if Conv2dSame is None:
        return []
    conv = Module(Conv2dSame, Input("x"), name="conv")
    bn = Module(nn.BatchNorm2d, conv, name="bn")  # timm's BatchNormAct2d is a BatchNorm2d subclass
    return [Module(ACTIVATION_MODULE_TYPES, bn, name="act"), Call(ACTIVATION_FUNCTIONS, bn, name="act_fn"), bn,
            Module(ACTIVATION_MODULE_TYPES, conv, name="act"), Call(ACTIVATION_FUNCTIONS, conv, name="act_fn"), conv]


@register("conv", *_patterns())
def build_conv_same(match: Match, ctx: LayerContext) -> ConvLayer | PaddedConvLayer:
    conv = ctx.module("conv")
    if conv.padding_mode != "zeros" or any(conv.padding):
        raise Unsupported(f"Conv2dSame with padding={conv.padding}, padding_mode={conv.padding_mode!r}")
    bn = ctx.module("bn") if "bn" in match.named else None
    activation = conv_activation(match, ctx)
    _, _, h, w = ctx.nchw(match.inputs["x"])
    top, bottom, left, right = same_padding(conv, h, w)
    even = top == bottom and left == right
    spec = Conv2dSpec(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                      (top, left) if even else (0, 0), tuple(conv.dilation), conv.groups)
    note = f"TF same padding {top}/{bottom}/{left}/{right} (top/bottom/left/right)"
    layer = conv_layer(ctx, ctx.info(note), spec, folded_weights(conv, bn), activation)
    if even:
        return layer
    return PaddedConvLayer(layer.backend, layer.info, spec, layer.weights, activation, (top, bottom, left, right))
