"""The rewriter registry: one decorated function per pattern, in the file that defines it.

    @register("maxpool", Module(nn.MaxPool2d, Input("x"), name="pool"))
    def build_maxpool(match: Match, ctx: BuildContext) -> TTModule: ...

A builder returns the replacement module, whose forward takes the match's inputs in pattern order,
or raises ``Unsupported`` with a reason, which the report shows when nothing else matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from ttswap.backends.base import Backend
from ttswap.cache import ConversionCache
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module, PatternNode
from ttswap.recipe import Recipe, ResolvedConfig
from ttswap.trace import node_scope, node_shape


class Unsupported(Exception):
    """A pattern matched but this instance cannot run on the device; the message says why."""


@dataclass
class BuildContext:
    gm: fx.GraphModule
    backend: Backend
    recipe: Recipe
    input_hw: tuple[int, int]
    weight_cache: ConversionCache = field(default_factory=ConversionCache)

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        shape = node_shape(node)
        if shape is None:
            raise Unsupported(f"no tensor shape recorded for {node.name}")
        return shape

    def nchw(self, node: fx.Node) -> tuple[int, int, int, int]:
        shape = self.shape(node)
        if len(shape) != 4:
            raise Unsupported(f"{node.name} is {len(shape)}-D; device activations are 4-D NCHW")
        return shape  # type: ignore[return-value]

    def config(self, match: Match, op: str, node: fx.Node | None = None) -> ResolvedConfig:
        """The recipe's config for this match, sized by ``node``'s output (default: the match's)."""
        shape = self.shape(node if node is not None else match.root)
        n, c = shape[0], shape[1]
        nhw = n * (shape[2] * shape[3] if len(shape) == 4 else 1)
        return self.recipe.resolve(layer_name(match, self.gm), op, nhw, c, self.input_hw)

    def grid(self, config, node: fx.Node, sharded: bool = False):
        """The shard grid a tensor of ``node``'s shape gets under ``config``: None when interleaved,
        unless ``sharded`` (ops such as pooling, which height-shard an interleaved input first)."""
        from ttswap.backends.l1 import tensor_shard_grid
        from ttswap.config import ShardLayout

        n, c, h, w = self.nchw(node)
        layout = ShardLayout.HEIGHT if sharded and config.shard is ShardLayout.INTERLEAVED else config.shard
        return tensor_shard_grid(layout, n * h * w, c)

    def info(self, match: Match, rewriter: str, resolved: ResolvedConfig | None, **extra) -> LayerInfo:
        return LayerInfo(layer=layer_name(match, self.gm), rewriter=rewriter,
                         config=resolved.config if resolved else None,
                         rules=resolved.rules if resolved else (),
                         notes=list(resolved.notes) if resolved else [], **extra)


Builder = Callable[[Match, BuildContext], TTModule]


@dataclass(frozen=True)
class Rewriter:
    name: str
    pattern: PatternNode
    build: Builder
    priority: int

    @property
    def size(self) -> int:
        return _pattern_size(self.pattern)


_REGISTRY: list[Rewriter] = []


def register(name: str, *patterns: PatternNode, priority: int = 0) -> Callable[[Builder], Builder]:
    def deco(build: Builder) -> Builder:
        for pattern in patterns:
            _REGISTRY.append(Rewriter(name, pattern, build, priority))
        return build

    return deco


def rewriters() -> list[Rewriter]:
    """Larger patterns first, so a Conv+BN+ReLU is never split into three single-op matches."""
    return sorted(_REGISTRY, key=lambda r: (r.priority, r.size), reverse=True)


def _pattern_size(p: PatternNode) -> int:
    if isinstance(p, list):
        return sum(_pattern_size(a) for a in p)
    if isinstance(p, Input):
        return 0
    return 1 + sum(_pattern_size(a) for a in (p.args or ()))


def layer_name(match: Match, gm: fx.GraphModule | None = None) -> str:
    """The deepest module path shared by every node of the match, when that module holds nothing
    else; otherwise (e.g. a timm ResNet block's conv1/bn1/act1, whose common path "layer1.0" also
    holds conv2) the path of the match's first node. Layer names must be unique: recipes address
    layers by them and the weight cache keys on them."""
    scopes = [node_scope(n).split(".") for n in match.nodes]
    common: list[str] = []
    for parts in zip(*scopes):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    name = ".".join(common)
    if not name:
        return node_scope(match.nodes[0])
    if gm is not None and len(match.nodes) > 1:
        inside = set(match.nodes)
        if any(n not in inside and (node_scope(n) + ".").startswith(name + ".") for n in gm.graph.nodes
               if n.op in ("call_module", "call_function", "call_method")):
            return node_scope(match.nodes[0])
    return name

__all__ = ["BuildContext", "Call", "Input", "Match", "Module", "Rewriter", "Unsupported", "register", "rewriters",
           "layer_name"]
