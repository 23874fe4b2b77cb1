"""timm VGG's pre-logits head (``timm.models.vgg.ConvMlp``, a leaf when tracing: its forward pools
inputs smaller than its kernel first): a kxk conv with its activation, then a 1x1 conv with its
activation, on the device as two convs. Inputs smaller than the kernel (which it would first pool up
with ``adaptive_avg_pool2d``) stay in torch."""

from __future__ import annotations

from ttswap.activations import activation_of_module
from ttswap.backends.base import Backend, DeviceTensor
from ttswap.layers import ConvLayer
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.convs import conv_layer, conv_spec, folded_weights
from ttswap.patterns.matcher import Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

try:
    from timm.models.vgg import ConvMlp
except ImportError:  # pragma: no cover - timm is a dependency
    ConvMlp = None


class ConvMlpHead(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, fc1: ConvLayer, fc2: ConvLayer):
        super().__init__(backend, info)
        self.fc1, self.fc2 = fc1, fc2

    @property
    def l1_bytes(self) -> int:
        return max(self.fc1.l1_bytes, self.fc2.l1_bytes)

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.fc2(self.fc1(x))


@register("conv_mlp", *([] if ConvMlp is None else [Module(ConvMlp, Input("x"), name="mlp")]))
def build_conv_mlp(match: Match, ctx: LayerContext) -> ConvMlpHead:
    mlp = ctx.module("mlp")
    _, _, h, w = ctx.nchw(match.inputs["x"])
    if h < mlp.input_kernel_size or w < mlp.input_kernel_size:
        raise Unsupported(f"a {h}x{w} input under the {mlp.input_kernel_size}x{mlp.input_kernel_size} kernel: "
                          "ConvMlp pools it up first")
    info = ctx.info(f"ConvMlp: fc1 {mlp.fc1.kernel_size[0]}x{mlp.fc1.kernel_size[1]}, fc2 1x1")
    parts = []
    for name, act in (("fc1", mlp.act1), ("fc2", mlp.act2)):
        conv = getattr(mlp, name)
        parts.append(conv_layer(ctx, ctx.info(layer=f"{info.layer}.{name}"), conv_spec(conv),
                                folded_weights(conv, None), activation_of_module(act)))
    return ConvMlpHead(ctx.backend, info, *parts)
