"""Declarative subgraph patterns and the small matcher that finds them in an FX graph.

A pattern is a tree written from its output back to its inputs, in the spirit of torch.ao's fusion
patterns::

    Module(nn.ReLU, Module(nn.BatchNorm2d, Module(nn.Conv2d, Input("x"))))

``Module`` matches a ``call_module`` node by the *type* of the module it calls (torch.fx's own
SubgraphMatcher compares targets by name, which cannot work across models). ``Call`` matches a
``call_function`` or ``call_method`` node. ``Input`` binds any node; an input name used twice must bind
the same node, which is how a squeeze-excitation's two uses of ``x`` are expressed.

Every node a match absorbs, except the root, must be used only inside the match: otherwise replacing
the subgraph would drop a value something else still reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.fx as fx
from torch import nn


@dataclass(frozen=True)
class Input:
    """Binds whatever node feeds this position; it becomes an input of the replacement."""

    name: str


@dataclass(frozen=True)
class Module:
    types: type | tuple[type, ...]
    args: tuple["PatternNode", ...] = ()
    name: str | None = None  # key under which the matched module is exposed

    def __init__(self, types, *args: "PatternNode", name: str | None = None):
        object.__setattr__(self, "types", types if isinstance(types, tuple) else (types,))
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "name", name)


@dataclass(frozen=True)
class Call:
    """A call_function (by function object) or call_method (by method name). ``args=None`` accepts any
    arguments and binds every node among them, in order, as inputs ``name.0``, ``name.1`` ..."""

    targets: tuple[Any, ...]
    args: tuple["PatternNode", ...] | None = ()
    name: str | None = None

    def __init__(self, targets, *args: "PatternNode", name: str | None = None, any_args: bool = False):
        object.__setattr__(self, "targets", targets if isinstance(targets, tuple) else (targets,))
        object.__setattr__(self, "args", None if any_args else args)
        object.__setattr__(self, "name", name)


PatternNode = Union[Input, Module, Call, list]  # a list matches a list argument (torch.cat's) item by item


@dataclass
class Match:
    """One occurrence of a pattern: the nodes it absorbs and what its inputs bind to."""

    root: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)  # absorbed nodes, root last
    named: dict[str, fx.Node] = field(default_factory=dict)  # Module/Call name -> node
    inputs: dict[str, fx.Node] = field(default_factory=dict)  # Input name -> bound node

    def module(self, gm: fx.GraphModule, name: str) -> nn.Module:
        return gm.get_submodule(self.named[name].target)

    @property
    def input_nodes(self) -> list[fx.Node]:
        return list(self.inputs.values())


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _match(pattern: PatternNode, node: Any, gm: fx.GraphModule, m: Match, is_root: bool) -> bool:
    if isinstance(pattern, list):
        return (isinstance(node, (list, tuple)) and len(node) == len(pattern)
                and all(_match(p, n, gm, m, False) for p, n in zip(pattern, node)))
    if isinstance(pattern, Input):
        if not isinstance(node, fx.Node):
            return False
        bound = m.inputs.get(pattern.name)
        if bound is not None and bound is not node:
            return False
        m.inputs[pattern.name] = node
        return True
    if not isinstance(node, fx.Node) or node in m.nodes:
        return False
    if not is_root and len(node.users) != 1:
        return False
    if isinstance(pattern, Module):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), pattern.types):
            return False
    elif isinstance(pattern, Call):
        if node.op == "call_function":
            if node.target not in pattern.targets:
                return False
        elif node.op == "call_method":
            if node.target not in pattern.targets:
                return False
        else:
            return False
    m.nodes.insert(0, node)
    if pattern.name:
        m.named[pattern.name] = node
    if isinstance(pattern, Call) and pattern.args is None:
        for i, arg in enumerate(_tensor_args(node)):
            m.inputs[f"{pattern.name or 'arg'}.{i}"] = arg
        return True
    if len(node.args) < len(pattern.args):
        return False
    return all(_match(p, a, gm, m, False) for p, a in zip(pattern.args, node.args))


def match_at(pattern: PatternNode, node: fx.Node, gm: fx.GraphModule) -> Match | None:
    m = Match(root=node)
    if not _match(pattern, node, gm, m, is_root=True):
        return None
    # an input must not be one of the absorbed nodes (the pattern would feed itself)
    if any(n in m.nodes for n in m.inputs.values()):
        return None
    m.nodes.sort(key=_position(gm))
    return m


def _position(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__
