"""``ttswap.converter``: trace, match patterns, build device layers, and chain them on the device."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from ttswap.backends import get_backend
from ttswap.backends.base import L1_ALLOCATABLE_BYTES, Backend, DeviceTensor
from ttswap.cache import ConversionCache, Fingerprint, cache_dir
from ttswap.modules import Download, TransferCounter, TTModule, Upload
from ttswap.patterns import BuildContext, Unsupported, rewriters
from ttswap.patterns.matcher import Match, match_at
from ttswap.recipe import Recipe
from ttswap.report import ConversionReport, NodeRecord, Transfers
from ttswap.trace import node_shape, remove_identities, trace

log = logging.getLogger("ttswap")
PROGRESS_EVERY = 25  # device layers between progress log lines


class ConversionError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """What a conversion started from: the model as given (not a copy) and its fingerprint then."""

    model: nn.Module
    fingerprint: Fingerprint


class ConvertedModel(nn.Module):
    """The converted network: still an ``nn.Module``, torch tensors in and out."""

    def __init__(self, graph_module: fx.GraphModule, backend: Backend, recipe: Recipe, report: ConversionReport,
                 counter: TransferCounter, source: ModelSource | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.backend = backend
        self.recipe = recipe
        self.report = report
        self.transfer_counter = counter  # runtime counts; the report holds the static ones
        self.source = source  # for save(); a dataclass, so the model is not registered as a submodule

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.report.input_shape

    def forward(self, *inputs: torch.Tensor):
        for x in inputs:
            if tuple(x.shape) != self.input_shape:
                raise ValueError(
                    f"this model was converted for input shape {list(self.input_shape)} and got {list(x.shape)}; "
                    "device kernels are specialised to their shapes: convert again with input_shape=..."
                )
        with torch.no_grad():
            return self.graph_module(*inputs)

    def device_layers(self) -> dict[str, TTModule]:
        return {m.layer: m for m in self.graph_module.modules() if isinstance(m, TTModule) and m.info.rewriter}

    def save(self, path: "str | Path", model_ref: str | None = None, model_kwargs: dict | None = None) -> None:
        """Write this conversion to one safetensors file; ``ttswap.load`` converts it again. See
        ``ttswap.serialize.save``."""
        from ttswap.serialize import save

        save(self, path, model_ref=model_ref, model_kwargs=model_kwargs)


def convert(
    model: nn.Module,
    recipe: "str | Path | Recipe",
    *,
    input_shape: Sequence[int] | None = None,
    backend: "str | Backend" = "auto",
    strict: bool = False,
    cache: "bool | str | Path" = True,
) -> ConvertedModel:
    """Convert ``model`` so that every subgraph a rewriter recognises runs on the backend.

    ``recipe`` is a shipped recipe's name (``"ese_vovnet"``), a ``.toml`` path, or a ``Recipe``.
    ``input_shape`` (N, C, H, W) overrides the recipe's. The user's model is never modified.
    With ``strict=True`` any node that would stay in torch raises, listing each one and why.
    ``cache`` is the weight cache's directory (True: ``$TTSWAP_CACHE_DIR`` or ``~/.cache/ttswap/weights``;
    False: no cache); see ``ttswap.cache``.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    recipe = Recipe.load(recipe)
    shape = _input_shape(input_shape, recipe)
    be = get_backend(backend) if isinstance(backend, str) else backend
    recipe = recipe.for_model(model, shape, be)  # itself, or for "auto" a recipe tuned for this model

    traced_from = time.perf_counter()  # tuning, if any, reported its own progress
    work = copy.deepcopy(model).eval()  # the caller's model is never touched
    gm = trace(work, None)
    fingerprint = Fingerprint.of(gm, work, recipe, be, shape)
    weight_cache = ConversionCache.open(cache_dir(cache), fingerprint)
    weight_cache.propagate_shapes(gm, torch.zeros(shape))
    remove_identities(gm)
    log.info("traced %s: %d nodes (%.1f s)", type(model).__name__, len(gm.graph.nodes),
             time.perf_counter() - traced_from)
    ctx = BuildContext(gm, be, recipe, (shape[2], shape[3]), weight_cache)
    records = {n: NodeRecord(n.name, _describe(gm, n), _kind(n)) for n in gm.graph.nodes}

    matches = _match_all(gm, ctx, records)
    weight_cache.save()
    _check_l1(matches, recipe)
    unconverted = [r for r in records.values() if r.replacement == "torch"]
    if strict and unconverted:
        lines = "\n".join(f"  {r.node} ({r.op}): {r.fallback_reason}" for r in unconverted)
        raise ConversionError(f"strict conversion: {len(unconverted)} node(s) would fall back to torch:\n{lines}")

    counter = TransferCounter()
    _rewrite(gm, matches)
    transfers = _insert_transfers(gm, be, recipe, counter)
    _keep_shared_inputs(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()

    report = ConversionReport(type(model).__name__, recipe.name, be.name, shape, list(records.values()), transfers)
    report.seconds = time.perf_counter() - start
    log.info(report.summary())
    return ConvertedModel(gm, be, recipe, report, counter, ModelSource(model, fingerprint))


def _input_shape(input_shape: Sequence[int] | None, recipe: Recipe) -> tuple[int, int, int, int]:
    shape = tuple(input_shape) if input_shape is not None else recipe.input_shape
    if shape is None:
        raise ValueError(f"no input shape: recipe {recipe.name!r} declares none, so pass input_shape=(N, C, H, W)")
    if len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ValueError(f"input_shape must be 4 positive integers (N, C, H, W), got {shape!r}")
    return shape  # type: ignore[return-value]


def _kind(node: fx.Node) -> str:
    return {"placeholder": "input", "output": "output", "get_attr": "constant"}.get(node.op, "torch")


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} {node.target}"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _match_all(gm: fx.GraphModule, ctx: BuildContext, records: dict[fx.Node, NodeRecord]) -> list[tuple[Match, TTModule]]:
    """Greedy, from the outputs back, largest pattern first (as torch.ao's fuser does), so a chain is
    claimed whole by the pattern that ends it."""
    claimed: set[fx.Node] = set()
    matches: list[tuple[Match, TTModule]] = []
    candidates = rewriters()
    start = time.perf_counter()
    for node in reversed(gm.graph.nodes):
        if node in claimed or node.op not in ("call_module", "call_function", "call_method"):
            continue
        reasons: list[str] = []
        for rw in candidates:
            match = match_at(rw.pattern, node, gm)
            if match is None or claimed.intersection(match.nodes):
                continue
            try:
                module = rw.build(match, ctx)
            except Unsupported as exc:
                reasons.append(f"{rw.name}: {exc}")
                continue
            claimed.update(match.nodes)
            matches.append((match, module))
            if len(matches) % PROGRESS_EVERY == 0:
                log.info("built %d device layers (%.1f s)", len(matches), time.perf_counter() - start)
            for n in match.nodes:
                rec = records[n]
                rec.replacement, rec.layer = rw.name, module.info.layer
                rec.config, rec.rules = module.info.config, module.info.rules
                if n is match.root:
                    rec.l1_bytes, rec.notes = module.info.l1_bytes, module.info.notes
                else:
                    rec.notes = [f"absorbed into {module.info.layer}"]
            break
        else:
            records[node].fallback_reason = "; ".join(reasons) or "no rewriter matches this op"
    matches.reverse()
    return matches


def _check_l1(matches: list[tuple[Match, TTModule]], recipe: Recipe) -> None:
    over = [m.info for _, m in matches if m.info.l1_bytes and m.info.l1_bytes > L1_ALLOCATABLE_BYTES]
    if over:
        lines = "\n".join(
            f"  {i.layer}: ~{i.l1_bytes:,} B per core with {i.config.to_dict() if i.config else {}}"
            f" (set by {', '.join(i.rules) or 'defaults'})" for i in over)
        raise ConversionError(
            f"recipe {recipe.name!r} ({recipe.source}): {len(over)} layer(s) exceed the {L1_ALLOCATABLE_BYTES:,} B of L1 "
            f"per core:\n{lines}\nlower act_block_h, change the shard layout, or use bfp8_b activations there")


def _rewrite(gm: fx.GraphModule, matches: list[tuple[Match, TTModule]]) -> None:
    gm.add_submodule("ttswap", nn.ModuleDict())
    container = gm.get_submodule("ttswap")
    replaced: dict[fx.Node, fx.Node] = {}  # a match's root -> its replacement, for later matches' inputs
    for match, module in matches:
        key = _unique(container, module.info.layer.replace(".", "_") or match.root.name)
        container[key] = module
        with gm.graph.inserting_before(match.root):
            new = gm.graph.call_module(f"ttswap.{key}", tuple(replaced.get(n, n) for n in match.input_nodes))
        new.meta = dict(match.root.meta)
        new.meta["original_node"] = match.root.name  # the traced node whose value this replaces
        match.root.replace_all_uses_with(new)
        replaced[match.root] = new
        for n in reversed(match.nodes):
            gm.graph.erase_node(n)


def _keep_shared_inputs(gm: fx.GraphModule) -> None:
    """An op may free its input only when nothing else reads it later (ttnn crashes on a freed tensor)."""
    for node in gm.graph.nodes:
        if not _is_device(gm, node):
            continue
        if any(len(arg.users) > 1 for arg in node.all_input_nodes):
            gm.get_submodule(node.target).keep_inputs()


def _unique(container: nn.ModuleDict, key: str) -> str:
    candidate, i = key, 1
    while candidate in container:
        i += 1
        candidate = f"{key}_{i}"
    return candidate


def _is_device(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), TTModule)


def _insert_transfers(gm: fx.GraphModule, backend: Backend, recipe: Recipe, counter: TransferCounter) -> Transfers:
    """Put one Upload after each host value a device layer reads, and one Download after each device
    value a host node (a fallback, or the output) reads. Everything else stays on the device."""
    transfers = Transfers()
    uploads: dict[fx.Node, fx.Node] = {}
    downloads: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        device = _is_device(gm, node)

        def crossing(src: fx.Node) -> fx.Node:
            if _is_device(gm, src) == device:
                return src
            cache = uploads if device else downloads
            if src not in cache:
                name = f"{'upload' if device else 'download'}_{src.name}"
                module = (Upload(backend, recipe.defaults, counter, src.name) if device
                          else Download(backend, counter, src.name, node_shape(src)))
                gm.add_submodule(name, module)
                with gm.graph.inserting_after(src):
                    cache[src] = gm.graph.call_module(name, (src,))
                cache[src].meta = dict(src.meta)
                if device:
                    transfers.uploads += 1
                else:
                    transfers.downloads += 1
            return cache[src]

        if node.op in ("call_module", "call_function", "call_method", "output"):
            node.args = fx.node.map_arg(node.args, crossing)
            node.kwargs = fx.node.map_arg(node.kwargs, crossing)
    return transfers


__all__ = ["ConversionError", "ConvertedModel", "DeviceTensor", "ModelSource", "convert"]
