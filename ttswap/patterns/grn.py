"""ConvNeXt-V2's global response norm (timm's ``GlobalResponseNorm`` on NCHW maps, traced as one leaf):
the L2 norm of each channel over H and W, divided by its mean over channels, scales each channel;
``x + bias + weight * x * norm / (mean + eps)``. One device op (``global_response_norm``), which ttnn
runs as a chain of eltwise and reduction ops on L1 interleaved tensors."""

from __future__ import annotations

from typing import Any

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.backends.l1 import estimate_eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register

try:
    from timm.layers.grn import GlobalResponseNorm
except ImportError:  # pragma: no cover - timm is a dependency
    GlobalResponseNorm = None


class GlobalResponseNormLayer(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, weights: Any, eps: float):
        super().__init__(backend, info)
        self.weights, self.eps = weights, eps

    @property
    def l1_bytes(self) -> int:
        n, c, h, w = self.info.input_shapes[0]
        return estimate_eltwise_l1(n * h * w, c, 2, None, self.cfg)[0]  # runs interleaved

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.global_response_norm(x, self.weights, self.eps, self.cfg, self.layer)


@register("global_response_norm",
          *([] if GlobalResponseNorm is None else [Module(GlobalResponseNorm, Input("x"), name="grn")]), sized_by="x")
def build_grn(match: Match, ctx: LayerContext) -> GlobalResponseNormLayer:
    grn = ctx.module("grn")
    if grn.channel_dim != 1:
        raise Unsupported("channels-last GRN (on an NHWC torch tensor); the device runs it on NCHW maps")
    _, c, _, _ = ctx.nchw(match.inputs["x"])
    info = ctx.info(f"global response norm over {c} channels (eps {grn.eps:g})")
    weight, bias = grn.weight.detach(), grn.bias.detach()
    weights = ctx.weight_cache.prepared(
        info.layer, lambda: (weight, bias), lambda w, b: ctx.backend.prepare_layer_norm(w, b, info.config, info.layer))
    return GlobalResponseNormLayer(ctx.backend, info, weights, float(grn.eps))
