"""Channel concat (VoVNet's one-shot aggregation, YOLOv4's CSP and PAN routes), kept on device in
the recipe's shard layout instead of round-tripping through interleaved memory."""

from __future__ import annotations

import torch

from ttswap.backends.base import DeviceTensor
from ttswap.backends.l1 import estimate_concat_l1, tensor_shard_grid
from ttswap.modules import TTModule
from ttswap.patterns.matcher import Call, Match
from ttswap.patterns.registry import LayerContext, Unsupported, register
from ttswap.trace import call_arg


class Concat(TTModule):
    @property
    def l1_bytes(self) -> int:
        n, c, h, w = self.info.output_shape
        shard = self.cfg.shard
        channels = [shape[1] for shape in self.info.input_shapes]
        grids = [tensor_shard_grid(shard, n * h * w, ci) for ci in channels]
        return estimate_concat_l1(n * h * w, channels, grids, tensor_shard_grid(shard, n * h * w, c), self.cfg)[0]

    def forward(self, *xs: DeviceTensor) -> DeviceTensor:
        return self.backend.concat(xs, self.cfg, self.layer)


@register("concat", Call((torch.cat, torch.concat), any_args=True, name="cat"))
def build_concat(match: Match, ctx: LayerContext) -> Concat:
    dim = call_arg(match.root, 1, "dim", 0)
    if len(ctx.shape(match.root)) != 4 or dim not in (1, -3):
        raise Unsupported(f"concat along dim {dim}; the device concatenates NCHW channels only")
    for arg in match.input_nodes:
        ctx.nchw(arg)
    return Concat(ctx.backend, ctx.info(f"{len(match.inputs)} inputs"))
