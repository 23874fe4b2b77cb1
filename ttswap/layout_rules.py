"""Conversion-time checks of each layer's placement against the backends' constraints, so that a
conversion that returns also runs.

Two rules, checked on the built layers before the graph is rewritten:

* **Row-major sharding.** A value computed on the host (a torch fallback, or the model input) reaches
  the device row-major (``upload``; bfloat8_b activations excepted, which exist only in tiles).
  Block or width sharding a row-major tensor needs channels in multiples of 32 (ttnn's shard spec
  for a row-major tensor is as wide as its channels; ``ttswap.backends.l1.tensor_shard_grid`` raises
  the same error at run time). Measured on the emulated backend, the layers that shard such an input
  themselves are standalone activations and standalone BatchNorms; convs, pools, adds, concats and
  upsamples tilize it first.
* **L1.** A layer's estimated peak L1 per core must fit (``L1_ALLOCATABLE_BYTES``); checked here for
  "auto" layouts only (an explicit one over L1 is the converter's ``_check_l1`` to report).

Where the recipe leaves a layer's ``shard`` to ``"auto"``, a layout that breaks a rule is replaced by
the first valid one, in the order height, block, width, with a rule whose note says why (the
returned recipe carries those rules, so the converted model's recipe reproduces the conversion).
Where a recipe rule set the layout explicitly, the conversion stops with ``InvalidLayerConfig``,
naming the layer, the rule and the constraint.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx as fx

from ttswap.backends.base import L1_ALLOCATABLE_BYTES, TILE
from ttswap.config import DType, ShardLayout
from ttswap.modules import TTModule
from ttswap.patterns.matcher import Match
from ttswap.recipe import Recipe, Rule
from ttswap.trace import node_shape

# rewriters whose layer moves a host (row-major) input to its shard layout itself (measured: see above)
SHARDS_ROW_MAJOR_INPUT = frozenset({"activation", "batchnorm"})
LAYOUT_ORDER = (ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH)

Built = tuple[list[tuple[Match, TTModule]], dict[str, str]]  # what the converter's matching returns


class InvalidLayerConfig(ValueError):
    """A recipe rule sets a layer's config to something the backend cannot run."""


@dataclass(frozen=True)
class Problem:
    layer: str
    rewriter: str
    rule: str  # the label of the rule that set the layout; "" when the recipe left it to "auto"
    message: str


def settle_layouts(recipe: Recipe, build: Callable[[Recipe], Built], input_hw: tuple[int, int]) -> tuple[Recipe, Built]:
    """Build with ``recipe``; where an "auto" layout breaks a rule, build again with the layouts
    fixed (at most once per layout). Raises ``InvalidLayerConfig`` for a layout a rule set explicitly."""
    built = build(recipe)
    for _ in LAYOUT_ORDER:
        problems, fixes = check_layers(built[0], recipe, input_hw)
        explicit = [p for p in problems if p.rule]
        if explicit:
            lines = "\n".join(f"  layer {p.layer!r} ({p.rewriter}), shard set by {p.rule}: {p.message}"
                              for p in explicit)
            raise InvalidLayerConfig(f"recipe {recipe.name!r} ({recipe.source}): {len(explicit)} layer(s) configured "
                                     f"with a layout the backend cannot run:\n{lines}")
        if not fixes:
            return recipe, built
        recipe = dataclasses.replace(recipe, rules=[*recipe.rules, *fixes])
        built = build(recipe)
    return recipe, built


def check_layers(matches: Sequence[tuple[Match, TTModule]], recipe: Recipe,
                 input_hw: tuple[int, int]) -> tuple[list[Problem], list[Rule]]:
    """Every layer that breaks a rule, and for those whose layout was "auto", a rule choosing a valid one."""
    device_values = {match.root for match, _ in matches}
    host_row_major = recipe.defaults.act_dtype is not DType.BFP8_B  # how upload gives host values
    problems, fixes = [], []
    for match, module in matches:
        info = module.info
        if info.config is None:
            continue
        reads_host = host_row_major and any(n not in device_values for n in match.input_nodes)
        channels = _channels(match.input_nodes)
        rule = explicit_shard_rule(recipe, info.layer, info.rewriter, input_hw)

        def breaks(layout: ShardLayout, candidate: TTModule, l1: bool) -> str:
            if (reads_host and info.rewriter in SHARDS_ROW_MAJOR_INPUT and channels % TILE
                    and layout in (ShardLayout.BLOCK, ShardLayout.WIDTH)):
                return (f"{layout.value} sharding a row-major tensor (its input comes from the host) needs channels "
                        f"in multiples of {TILE}, got {channels}")
            needed = candidate.l1_bytes if l1 else None
            if needed is not None and needed > L1_ALLOCATABLE_BYTES:
                return f"{layout.value} sharding needs ~{needed:,} B of L1 per core, {L1_ALLOCATABLE_BYTES:,} B fit"
            return ""

        layout = info.config.shard
        # an explicit layout over L1 is the converter's own L1 check's to report, with its advice
        message = breaks(layout, module, l1=rule is None)
        if not message:
            continue
        problems.append(Problem(info.layer, info.rewriter, rule or "", message))
        if rule is not None:
            continue
        for other in LAYOUT_ORDER:
            if other is not layout and not breaks(other, _with_shard(module, other), l1=True):
                fixes.append(Rule(glob.escape(info.layer), {"shard": other}, (info.rewriter,),
                                  label=f"shard auto {info.layer}",
                                  note=f"shard auto: {other.value}, because {message}"))
                break
    return problems, fixes


def explicit_shard_rule(recipe: Recipe, layer: str, rewriter: str, input_hw: tuple[int, int]) -> str | None:
    """The label of the recipe rule (or "[defaults]") that sets this layer's shard to a layout; None
    when the layer's shard is left to "auto"."""
    setter, value = "[defaults]", recipe.defaults.shard
    for rule in [*recipe.rules, *recipe.resolutions.get(f"{input_hw[0]}x{input_hw[1]}", [])]:
        if "shard" in rule.overrides and rule.applies(layer, rewriter):
            setter, value = rule.label or repr(rule.match), rule.overrides["shard"]
    return None if ShardLayout(value) is ShardLayout.AUTO else setter


def _channels(nodes: Sequence[fx.Node]) -> int:
    shape = node_shape(nodes[0]) if nodes else None
    return int(shape[1]) if shape is not None and len(shape) > 1 else 0


def _with_shard(module: TTModule, layout: ShardLayout) -> TTModule:
    """A shallow copy of ``module`` (and its device parts) configured with ``layout``: to ask its L1
    estimate, never to run."""
    clone = copy.copy(module)
    clone._modules = {name: _with_shard(m, layout) if isinstance(m, TTModule) else m
                      for name, m in module._modules.items()}
    if clone.info.config is not None:
        clone.reconfigure(clone.info.config.replace(shard=layout))
    return clone


__all__ = ["InvalidLayerConfig", "LAYOUT_ORDER", "Problem", "check_layers", "explicit_shard_rule", "settle_layouts"]
