"""The rewriter registry: one decorated function per pattern, in the file that defines it.

    @register("maxpool", Module(nn.MaxPool2d, Input("x"), name="pool"), sized_by="x")
    def build_maxpool(match: Match, ctx: LayerContext) -> MaxPool: ...

``register`` declares what every builder would otherwise repeat: the rewriter's name (recipe rules
select layers by it) and which node's shape sizes the recipe's config (``sized_by`` names an input;
by default the match's output). A builder checks what is particular to its pattern, then asks
``ctx.info(note)`` for the layer's config, decided in full there (recipe rules, then the policy that an
input with more than one user is kept), and returns the replacement module, whose forward takes the
match's inputs in pattern order. Or it raises ``Unsupported`` with a reason, which the report shows
when nothing else matches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.fx as fx
from torch import nn

from ttswap.backends.base import Backend
from ttswap.cache import ConversionCache
from ttswap.modules import LayerInfo, TTModule
from ttswap.patterns.matcher import Call, Input, Match, Module, PatternNode
from ttswap.recipe import REWRITER_NAMES, Recipe, ResolvedConfig
from ttswap.trace import node_scope, node_shape
from ttswap.unsupported import Unsupported


@dataclass
class BuildContext:
    """What every layer of one conversion is built from."""

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


class LayerContext:
    """One rewriter's attempt at one match: the conversion's context, plus what the rewriter declared
    at ``register``. ``info`` resolves the layer's config and decides its policies, once."""

    def __init__(self, conversion: BuildContext, rewriter: "Rewriter", match: Match):
        self.conversion, self.rewriter, self.match = conversion, rewriter, match
        self.gm, self.backend = conversion.gm, conversion.backend
        self.recipe, self.weight_cache = conversion.recipe, conversion.weight_cache
        self.shape, self.nchw = conversion.shape, conversion.nchw

    def module(self, name: str) -> nn.Module:
        """The module a named ``Module`` pattern node matched."""
        return self.match.module(self.gm, name)

    @functools.cached_property
    def layer(self) -> str:
        return layer_name(self.match, self.gm)

    @functools.cached_property
    def resolved(self) -> ResolvedConfig:
        """The recipe's config for this match, sized by the node ``register`` named."""
        sized_by = self.rewriter.sized_by
        shape = self.shape(self.match.inputs[sized_by] if sized_by else self.match.root)
        if len(shape) < 2:
            raise Unsupported(f"a {len(shape)}-D tensor has no channels to size a device config by")
        n, c = shape[0], shape[1]
        nhw = n * (shape[2] * shape[3] if len(shape) == 4 else 1)
        return self.recipe.resolve(self.layer, self.rewriter.name, nhw, c, self.conversion.input_hw)

    def info(self, *notes: str, layer: str | None = None, nodes: Iterable[fx.Node] | None = None,
             inputs: Iterable[fx.Node] | None = None) -> LayerInfo:
        """The frozen description of the layer (by default the whole match; a composite's parts pass
        their own ``layer``, ``nodes`` and ``inputs``). Policy: an input with more than one user is
        kept, since another layer reads it later (ttnn would read a freed tensor)."""
        nodes = list(nodes) if nodes is not None else self.match.nodes
        inputs = list(inputs) if inputs is not None else self.match.input_nodes
        resolved = self.resolved
        config = resolved.config
        if config.deallocate and any(len(n.users) > 1 for n in inputs):
            config = config.replace(deallocate=False)
        return LayerInfo(
            layer=layer if layer is not None else self.layer, rewriter=self.rewriter.name, config=config,
            rules=resolved.rules, notes=(*resolved.notes, *notes), nodes=tuple(n.name for n in nodes),
            input_shapes=tuple(self.shape(n) for n in inputs), output_shape=self.shape(nodes[-1]))


Builder = Callable[[Match, LayerContext], TTModule]


@dataclass(frozen=True)
class Rewriter:
    name: str
    pattern: PatternNode
    builder: Builder
    sized_by: str | None = None  # the Input whose shape sizes the recipe's config; None: the match's output

    @property
    def size(self) -> int:
        return _pattern_size(self.pattern)

    @property
    def root_keys(self) -> tuple[object, ...]:
        """What the pattern's output node calls: module types, or functions and method names."""
        root = self.pattern
        return root.types if isinstance(root, Module) else root.targets  # type: ignore[union-attr]

    def build(self, match: Match, ctx: BuildContext) -> TTModule:
        return self.builder(match, LayerContext(ctx, self, match))


_REGISTRY: list[Rewriter] = []
_INDEX: dict[object, list[Rewriter]] = {}  # root key -> rewriters, larger patterns first


def register(name: str, *patterns: PatternNode, sized_by: str | None = None) -> Callable[[Builder], Builder]:
    def deco(build: Builder) -> Builder:
        REWRITER_NAMES.add(name)  # recipes check a rule's op against these
        for pattern in patterns:
            if not isinstance(pattern, (Module, Call)):
                raise TypeError(f"rewriter {name!r}: a pattern's output must be a Module or a Call")
            _REGISTRY.append(Rewriter(name, pattern, build, sized_by))
        _INDEX.clear()
        return build

    return deco


def rewriters() -> list[Rewriter]:
    """Larger patterns first, so a Conv+BN+ReLU is never split into three single-op matches."""
    return sorted(_REGISTRY, key=lambda r: r.size, reverse=True)


def rewriters_at(node: fx.Node, gm: fx.GraphModule) -> list[Rewriter]:
    """The rewriters whose pattern's output could be ``node`` (by module type, function or method
    name), larger patterns first: the only ones worth trying to match there."""
    if not _INDEX:
        for rw in rewriters():
            for key in rw.root_keys:
                _INDEX.setdefault(key, []).append(rw)
    if node.op == "call_module":
        keys: Iterable[object] = type(gm.get_submodule(node.target)).__mro__  # subclasses match too
    elif node.op in ("call_function", "call_method"):
        keys = (node.target,)
    else:
        return []
    found: dict[int, Rewriter] = {}
    for key in keys:
        try:
            found.update((id(rw), rw) for rw in _INDEX.get(key, ()))
        except TypeError:  # an unhashable target is no pattern's
            pass
    return sorted(found.values(), key=lambda r: r.size, reverse=True)


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

__all__ = ["BuildContext", "Call", "Input", "LayerContext", "Match", "Module", "Rewriter", "Unsupported", "register",
           "rewriters", "rewriters_at", "layer_name"]
