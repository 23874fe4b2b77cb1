"""FX tracing with shape propagation, so every node knows its N, C, H and W."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp


def _timm_leaf_types() -> tuple[type, ...]:
    """timm's norm+act layers stay whole: tracing through them yields F.batch_norm plus assert nodes,
    while as leaves they match as one BatchNorm-with-activation module."""
    try:
        from timm.layers import get_notrace_modules
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:
        return ()
    leaves = {BatchNormAct2d, *get_notrace_modules()}
    try:  # ResNeSt's split attention and ConvNeXt-V2's GRN match whole (patterns/split_attention.py, grn.py)
        from timm.layers.grn import GlobalResponseNorm
        from timm.layers.split_attn import SplitAttn

        leaves.update((SplitAttn, GlobalResponseNorm))
    except ImportError:
        pass
    return tuple(leaves)


class LeafTracer(fx.Tracer):
    def __init__(self, extra_leaves: Iterable[type] = ()):
        super().__init__()
        self.leaf_types = _timm_leaf_types() + tuple(extra_leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


class TraceError(RuntimeError):
    pass


def trace(model: nn.Module, example: torch.Tensor | None, extra_leaves: Iterable[type] = ()) -> fx.GraphModule:
    """Trace ``model`` (which the caller owns: it is not copied here) and record tensor shapes by
    running ``example`` through it. ``example=None`` leaves shapes to the caller (the weight cache
    restores them without running the model)."""
    tracer = LeafTracer(extra_leaves)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Models with data-dependent control flow "
            "need a traceable forward, or the offending submodule passed as a leaf (extra_leaves=...)"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if example is not None:
        propagate_shapes(gm, example)
    return gm


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    with torch.no_grad():
        ShapeProp(gm).propagate(example)


def remove_identities(gm: fx.GraphModule) -> None:
    """Inference needs no Identity or Dropout: drop them so they never split a pattern."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def node_scope(node: fx.Node) -> str:
    """The module path a node belongs to: its target for call_module, else its innermost module."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = list(stack.keys())[-1] if stack else ""
    return f"{scope}.{node.name}" if scope else node.name


def call_arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``name`` of a traced call, passed by position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
