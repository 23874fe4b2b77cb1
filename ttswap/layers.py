"""The device layer several rewriters build (convolution), the per-core L1 estimates the pattern layers
share, and the weight arithmetic convolutions need (BatchNorm folding, bfloat8_b error).

A layer gets only what it runs with: the backend, its ``LayerInfo`` (config decided in full), its geometry,
its prepared weights and its fused activation, as tt-metal's ``TtConv2d(configuration, device)`` does.
Choosing the config, guarding bfloat8_b and fetching weights from the cache happen in the builders.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.backends.l1 import estimate_conv_l1, estimate_eltwise_l1, estimate_pool_l1, tensor_shard_grid
from ttswap.backends.numerics import quantize_bfp8_b
from ttswap.config import Activation, Conv2dSpec, Pool2dSpec, ShardLayout
from ttswap.modules import LayerInfo, TTModule
from ttswap.unsupported import Unsupported


@torch.no_grad()
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
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


def bfp8_channel_error(weight: torch.Tensor, groups: int) -> float:
    """Worst per-output-channel relative error bfloat8_b puts on conv weights, as ttnn lays them out:
    a [kh*kw*Cin, Cout] matrix whose exponent blocks run over 16 output channels. Grouped weights are
    expanded block-diagonally first, as ttnn does."""
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
    """One device conv2d with optional bias and fused activation."""

    def __init__(self, backend: Backend, info: LayerInfo, spec: Conv2dSpec, weights: Any,
                 activation: Activation | None):
        super().__init__(backend, info)
        self.spec, self.weights, self.activation = spec, weights, activation

    @property
    def l1_bytes(self) -> int:
        n, _, h, w = self.info.input_shapes[0]
        has_bias = getattr(self.weights, "bias", None) is not None
        return estimate_conv_l1(self.spec, n, h, w, self.cfg, has_bias=has_bias)[0]

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.conv2d(x, self.weights, self.spec, self.cfg, self.layer, self.activation)


def eltwise_l1(info: LayerInfo, num_inputs: int, shape: tuple[int, ...] | None = None) -> int:
    """Per-core L1 of an elementwise op on a tensor of ``shape`` (default: the layer's first input) laid
    out as the layer's config says."""
    n, c, h, w = shape or info.input_shapes[0]
    cfg = info.config
    assert cfg is not None
    return estimate_eltwise_l1(n * h * w, c, num_inputs, tensor_shard_grid(cfg.shard, n * h * w, c), cfg)[0]


def pool_l1(spec: Pool2dSpec, info: LayerInfo) -> int:
    """Per-core L1 of a max or average pool over the layer's input, height-sharded if the config keeps
    it interleaved (a pool computes sharded)."""
    n, c, h, w = info.input_shapes[0]
    cfg = info.config
    assert cfg is not None
    layout = ShardLayout.HEIGHT if cfg.shard is ShardLayout.INTERLEAVED else cfg.shard
    grid = tensor_shard_grid(layout, n * h * w, c)
    assert grid is not None
    return estimate_pool_l1(spec, n, h, w, c, grid, cfg)[0]
