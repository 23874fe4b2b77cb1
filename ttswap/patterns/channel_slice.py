"""Channel slices on the device: ``x[:, a:b]``, and ``torch.split`` / ``chunk`` along channels, which
tracing turns into one such slice per part (``ttswap.simplify``). CSP stages, Res2Net's hierarchical
splits, MixNet's mixed-kernel convs and DPN's dual paths cut their maps this way; the parts then feed
convs, adds and concats, which stay on the device too.

On ttnn a slice of a height-sharded map that falls on tile columns (multiples of 32 channels) stays on
its cores; any other slice reads the map from L1 interleaved (a reshard on the device, no host trip)."""

from __future__ import annotations

import operator

from ttswap.backends.base import TILE, Backend, DeviceTensor
from ttswap.layers import eltwise_l1
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match
from ttswap.patterns.registry import LayerContext, Unsupported, register


class ChannelSlice(TTModule):
    def __init__(self, backend: Backend, info: LayerInfo, start: int, stop: int):
        super().__init__(backend, info)
        self.start, self.stop = start, stop

    @property
    def l1_bytes(self) -> int:
        return eltwise_l1(self.info, 0, self.info.output_shape)  # the input is counted where it was made

    def forward(self, x: DeviceTensor) -> DeviceTensor:
        return self.backend.slice_channels(x, self.start, self.stop, self.cfg, self.layer)


def _whole(index: object) -> bool:
    return isinstance(index, slice) and index == slice(None)


def channel_range(index: object, channels: int) -> tuple[int, int] | None:
    """(start, stop) when ``index`` selects a contiguous channel range of an NCHW tensor and all of its
    other dimensions; None otherwise."""
    if not isinstance(index, tuple) or len(index) < 2 or len(index) > 4:
        return None
    batch, chans, *rest = index
    if not _whole(batch) or not all(_whole(i) for i in rest):
        return None
    if not isinstance(chans, slice) or chans.step not in (None, 1):
        return None
    start, stop, _ = chans.indices(channels)
    return (start, stop) if start < stop else None


@register("channel_slice", Call(operator.getitem, Input("x"), name="index"), sized_by="x")
def build_channel_slice(match: Match, ctx: LayerContext) -> ChannelSlice:
    _, c, _, _ = ctx.nchw(match.inputs["x"])
    index = match.named["index"].args[1]
    bounds = channel_range(index, c)
    if bounds is None:
        raise Unsupported(f"indexing with {index}; the device slices a contiguous range of channels only")
    start, stop = bounds
    if (start, stop) == (0, c):
        raise Unsupported("selects the whole tensor")  # a no-op view: patterns/views.py
    where = "on its cores if height-sharded" if start % TILE == 0 and stop % TILE == 0 else "from L1 interleaved"
    return ChannelSlice(ctx.backend, ctx.info(f"channels {start}:{stop} of {c}, {where}"), start, stop)
