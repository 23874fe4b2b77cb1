"""Channel concat (VoVNet's one-shot aggregation, YOLOv4's CSP and PAN routes), kept on device in
the recipe's shard layout instead of round-tripping through interleaved memory."""

from __future__ import annotations

import torch

from ttswap.backends.base import DeviceTensor
from ttswap.modules import TTModule
from ttswap.patterns.matcher import Call, Match
from ttswap.patterns.registry import BuildContext, Unsupported, register


class Concat(TTModule):
    def forward(self, *xs: DeviceTensor) -> DeviceTensor:
        return self.backend.concat(xs, self.cfg, self.layer)


@register("concat", Call((torch.cat, torch.concat), any_args=True, name="cat"))
def build_concat(match: Match, ctx: BuildContext):
    node = match.root
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if len(ctx.shape(node)) != 4 or dim not in (1, -3):
        raise Unsupported(f"concat along dim {dim}; the device concatenates NCHW channels only")
    for arg in match.input_nodes:
        ctx.nchw(arg)
    resolved = ctx.config(match, "concat")
    info = ctx.info(match, "concat", resolved)
    info.notes.append(f"{len(match.inputs)} inputs")
    from ttswap.backends.l1 import estimate_concat_l1

    n, c, h, w = ctx.nchw(node)
    cfg = resolved.config
    info.l1_bytes = estimate_concat_l1(n * h * w, [ctx.nchw(a)[1] for a in match.input_nodes],
                                       [ctx.grid(cfg, a) for a in match.input_nodes], ctx.grid(cfg, node), cfg)[0]
    return Concat(ctx.backend, info)
