"""Views that move no data on the device, kept there instead of sent to torch: indexing that selects
the whole tensor (``x[:, :C]`` on a C-channel map, as GhostNet writes after concatenating its two
halves) and flattening an [N, C, 1, 1] map (a 1x1-conv classifier's output), which is already the
device's [N, 1, 1, C] layout. Indexing that drops anything is left to torch."""

from __future__ import annotations

import operator

import torch
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.modules import TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module
from ttswap.patterns.registry import LayerContext, Unsupported, register


class View(TTModule):
    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return x


def _keeps_all(index: object, size: int) -> bool:
    if not isinstance(index, slice) or index.step not in (None, 1):
        return False
    start, stop, _ = index.indices(size)
    return start == 0 and stop == size


@register("slice", Call(operator.getitem, Input("x"), name="index"), sized_by="x")
def build_slice(match: Match, ctx: LayerContext) -> View:
    shape = ctx.nchw(match.inputs["x"])
    index = match.named["index"].args[1]
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(_keeps_all(i, s) for i, s in zip(index, shape)):
        raise Unsupported(f"indexing with {index} selects part of the tensor; only whole-tensor slices are no-ops")
    return View(ctx.backend, ctx.info("selects the whole tensor: no device op"))


@register("flatten", Module(nn.Flatten, Input("x"), name="flatten"),
          Call((torch.flatten, "flatten"), Input("x"), name="flatten"), sized_by="x")
def build_flatten(match: Match, ctx: LayerContext) -> View:
    n, c, h, w = ctx.nchw(match.inputs["x"])
    if (h, w) != (1, 1) or ctx.shape(match.root) != (n, c):
        raise Unsupported(f"flatten of a {c}x{h}x{w} map to {list(ctx.shape(match.root))}; "
                          "only [N, C, 1, 1] -> [N, C]")
    return View(ctx.backend, ctx.info("[N, C, 1, 1] -> [N, C]: no device op"))
