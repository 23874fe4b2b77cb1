"""Graph clean-ups after shape propagation, so that patterns see one form of each computation.

* **Shape arithmetic folds to constants.** ``B, C, H, W = x.shape``, ``x.size(0)``, ``x.dim()`` and the
  integer arithmetic and indexing on them are known once shapes are recorded (a converted model runs
  at one input shape), so their values replace them in the ops that read them (ResNeSt's
  ``x.reshape((B, radix, RC // radix, H, W))``, ``x.view(x.size(0), -1)`` heads).
* **Constant tensors fold to one buffer.** Ops that read only parameters and buffers (a layer
  scale's ``gamma.reshape(1, -1, 1, 1)``) are computed once and read as one graph constant, which a
  pattern can take as a weight instead of a value computed in torch at every forward.
* **``contiguous()`` goes**: it changes no value, and device tensors have one layout of their own.
* **``split`` and ``chunk`` along channels become one slice per part** (``x[:, a:b]``): each part then
  runs on its own, and a part nothing reads costs nothing.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ttswap.trace import node_shape

# integer arithmetic and indexing on shapes (and on what they gave)
_SHAPE_FUNCTIONS = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                              operator.truediv, operator.mod, operator.neg, max, min, int})
# ops on parameters and buffers that depend on nothing else, safe to compute once at conversion
_CONSTANT_METHODS = frozenset({"reshape", "view", "permute", "transpose", "unsqueeze", "squeeze", "flatten",
                               "expand", "mul", "add", "sub", "div", "neg", "exp", "float", "to", "t"})
_CONSTANT_FUNCTIONS = frozenset({torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
                                 torch.flatten, torch.mul, torch.add, torch.sub, torch.div, torch.exp,
                                 operator.mul, operator.add, operator.sub, operator.truediv, operator.neg})
_SPLITS = frozenset({torch.split, torch.chunk, "split", "chunk"})


def simplify(gm: fx.GraphModule) -> None:
    """Every clean-up above, in place. Nodes must carry their ``tensor_meta`` (``propagate_shapes``)."""
    fold_shape_arithmetic(gm)
    fold_constants(gm)
    drop_contiguous(gm)
    split_to_slices(gm)
    gm.graph.lint()
    gm.recompile()


def _shape_value(node: fx.Node, known: dict[fx.Node, Any]) -> tuple[bool, Any]:
    """(True, value) when ``node`` computes a shape, a dimension count or arithmetic on known values."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
        shape = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return (shape is not None), torch.Size(shape) if shape is not None else None
    if node.op == "call_method" and node.target in ("size", "dim") and isinstance(node.args[0], fx.Node):
        shape = node_shape(node.args[0])
        if shape is None:
            return False, None
        if node.target == "dim":
            return True, len(shape)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return True, torch.Size(shape) if dim is None else shape[dim]
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        inputs = node.all_input_nodes
        if not inputs or not all(n in known for n in inputs):
            return False, None
        args = fx.node.map_arg(node.args, lambda n: known[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: known[n])
        return True, node.target(*args, **kwargs)
    return False, None


def _substitute(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
    """Put each node's value in its users' arguments, then erase the nodes (users first)."""
    for node, value in values.items():
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
    for node in reversed(list(values)):
        gm.graph.erase_node(node)


def fold_shape_arithmetic(gm: fx.GraphModule) -> None:
    """Replace ``x.shape``, ``x.size()``, ``x.dim()`` and integer arithmetic on them by their values."""
    known: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        found, value = _shape_value(node, known)
        if found and isinstance(value, (int, float, tuple)):  # torch.Size is a tuple
            known[node] = tuple(value) if isinstance(value, torch.Size) else value
    _substitute(gm, known)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _is_constant_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _CONSTANT_METHODS
    return node.op == "call_function" and node.target in _CONSTANT_FUNCTIONS


def fold_constants(gm: fx.GraphModule) -> None:
    """Compute ops whose every input is a parameter or buffer (or such an op) once, and read the result
    as a buffer of the graph module: the op then costs nothing at run time, and patterns see a constant."""
    constant: dict[fx.Node, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                constant[node] = value.detach()
        elif _is_constant_op(node) and node.all_input_nodes and all(n in constant for n in node.all_input_nodes):
            args = fx.node.map_arg(node.args, lambda n: constant[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: constant[n])
            with torch.no_grad():
                value = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" \
                    else node.target(*args, **kwargs)
            if not isinstance(value, torch.Tensor):
                continue
            constant[node] = value
            name = f"_folded_{node.name}"
            gm.register_buffer(name, value.contiguous())
            with gm.graph.inserting_before(node):
                folded = gm.graph.get_attr(name)
            folded.meta = dict(node.meta)
            node.replace_all_uses_with(folded)
            constant[folded] = value
    # the ops folded away, and constants nothing reads any more
    for node in reversed(list(gm.graph.nodes)):
        if node in constant and not node.users and node.op != "get_attr":
            gm.graph.erase_node(node)


def drop_contiguous(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _split_bounds(node: fx.Node, channels: int) -> list[tuple[int, int]] | None:
    """The channel range of each part of a split or chunk along dim 1 of a 4-D tensor; None otherwise."""
    is_split = node.target in (torch.split, "split")
    if len(node.args) > 1:
        sizes_arg = node.args[1]
    elif is_split:  # torch.split's keyword, then Tensor.split's
        sizes_arg = node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
    else:
        sizes_arg = node.kwargs.get("chunks")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim not in (1, -3) or sizes_arg is None:
        return None
    probe = torch.empty(channels)
    parts = probe.split(sizes_arg) if is_split else probe.chunk(sizes_arg)
    bounds, start = [], 0
    for part in parts:
        bounds.append((start, start + part.numel()))
        start += part.numel()
    return bounds


def split_to_slices(gm: fx.GraphModule) -> None:
    """``torch.split(x, s, 1)[i]`` and ``x.chunk(n, 1)[i]`` -> ``x[:, a:b]``, when only indexing reads
    the parts."""
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _SPLITS:
            continue
        x = node.args[0]
        shape = node_shape(x) if isinstance(x, fx.Node) else None
        if shape is None or len(shape) != 4:
            continue
        users = list(node.users)
        if not users or any(u.op != "call_function" or u.target is not operator.getitem
                            or not isinstance(u.args[1], int) for u in users):
            continue
        bounds = _split_bounds(node, shape[1])
        if bounds is None:
            continue
        for user in users:
            start, stop = bounds[user.args[1]]
            user.args = (x, (slice(None), slice(start, stop)))
        gm.graph.erase_node(node)


__all__ = ["drop_contiguous", "fold_constants", "fold_shape_arithmetic", "simplify", "split_to_slices"]
