"""``ttswap.converter``: trace, match patterns, build device layers, and chain them on the device."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ttswap.backends import get_backend
from ttswap.backends.base import L1_ALLOCATABLE_BYTES, Backend, DeviceTensor
from ttswap.cache import ConversionCache, Fingerprint, cache_dir, describe_conversion
from ttswap.layout_rules import InvalidLayerConfig, settle_layouts
from ttswap.modules import Download, TransferCounter, TTModule, Upload
from ttswap.patterns import BuildContext, Unsupported, rewriters_at
from ttswap.patterns.matcher import Match, match_at
from ttswap.recipe import Recipe
from ttswap.report import ConversionReport, NodeRecord, Transfers
from ttswap.simplify import simplify
from ttswap.trace import node_shape, remove_identities, trace

if TYPE_CHECKING:
    from ttswap.pipeline import Pipeline

log = logging.getLogger("ttswap")
PROGRESS_EVERY = 25  # device layers between progress log lines
CONTAINER = "ttswap"  # the submodule of the converted graph that holds the device layers


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

    # The original module computes in float32 (conversion traces it with a float32 example) and, like
    # any torch module with float32 parameters, refuses other dtypes; so does this one.
    input_dtype = torch.float32

    def forward(self, *inputs: torch.Tensor):
        self._check_inputs(inputs)
        with torch.no_grad():
            return self.graph_module(*inputs)

    def _check_inputs(self, inputs: tuple) -> None:
        """Refuse what the original module would refuse, naming what this model takes."""
        params = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        required = [n for n in params if not n.args]  # a placeholder's args hold its default
        expected = f"a float32 tensor of shape {list(self.input_shape)}"
        if not len(required) <= len(inputs) <= len(params):
            takes = ", ".join(f"{n.target}" + ("" if n in required else " (optional)") for n in params)
            raise TypeError(f"this model takes {len(required)} input(s) ({takes}: {expected}), got {len(inputs)}")
        for node, x in zip(params, inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {node.target!r} must be {expected}, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"input {node.target!r} must be {expected}, got {x.dtype} of shape {list(x.shape)}; "
                                "convert images to float and normalise them as in training, e.g. x.float() / 255")
            if x.dtype != self.input_dtype:
                raise TypeError(f"input {node.target!r} must be {expected}, got {x.dtype}: the original module has "
                                f"float32 parameters and refuses {x.dtype} too; pass x.float()")
            if tuple(x.shape) != self.input_shape:
                raise ValueError(
                    f"this model was converted for input shape {list(self.input_shape)} and got {list(x.shape)}; "
                    "device kernels are specialised to their shapes: convert again with input_shape=..."
                )

    def pipeline(self, trace: bool = True, command_queues: int = 2) -> "Pipeline":
        """This model at full speed: persistent device buffers, the device part captured once as a ttnn
        trace, and the next input's upload on a second command queue overlapping the forward. The result
        is called like this model, or on an iterable of batches. See ``ttswap.pipeline``."""
        from ttswap.pipeline import Pipeline

        return Pipeline(self, trace=trace, command_queues=command_queues)

    def device_layers(self) -> dict[str, TTModule]:
        """The device layers by name, in graph order; a composite's parts (``part_for``) are not listed."""
        gm = self.graph_module
        modules = (gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module")
        return {m.layer: m for m in modules if isinstance(m, TTModule)}

    def save(self, path: "str | Path", model_ref: str | None = None, model_kwargs: dict | None = None) -> None:
        """Write this conversion to one safetensors file; ``ttswap.load`` converts it again. See
        ``ttswap.serialize.save``."""
        if _saver is None:
            raise RuntimeError("no saver registered: import ttswap (ttswap.serialize registers it)")
        _saver(self, path, model_ref=model_ref, model_kwargs=model_kwargs)


# ``ttswap.serialize`` sits above the converter (loading a file converts the model again), so it
# registers its writer here instead of the converter importing it.
_saver: Callable[..., None] | None = None


def register_saver(save: Callable[..., None]) -> None:
    global _saver
    _saver = save


def convert(
    model: nn.Module,
    recipe: "str | Path | Recipe",
    *,
    input_shape: Sequence[int] | None = None,
    backend: "str | Backend" = "auto",
    strict: bool = False,
    cache: "bool | str | Path" = True,
    cache_max_bytes: "int | str | None" = None,
    mesh: tuple[int, int] | None = None,
) -> ConvertedModel:
    """Convert ``model`` so that every subgraph a rewriter recognises runs on the backend.

    ``recipe`` is a shipped recipe's name (``"ese_vovnet"``), a ``.toml`` path, or a ``Recipe``.
    ``input_shape`` (N, C, H, W) overrides the recipe's. The user's model is never modified.
    With ``strict=True`` any node that would stay in torch raises, listing each one and why.
    ``cache`` is the weight cache's directory (True: ``$TTSWAP_CACHE_DIR`` or ``~/.cache/ttswap/weights``;
    False: no cache); see ``ttswap.cache``. ``cache_max_bytes`` caps that directory (bytes, or ``"2G"``;
    default ``$TTSWAP_CACHE_MAX_BYTES``, else 2 GiB): least recently used entries beyond it are deleted.
    ``mesh=(rows, cols)`` runs data parallel over that many chips (ttnn's mesh device): the weights on every
    chip, the batch of ``input_shape`` split between them (it must divide evenly).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    recipe = Recipe.load(recipe)
    shape = _input_shape(input_shape, recipe)
    be = get_backend(backend, mesh=mesh) if isinstance(backend, str) else backend
    if mesh is not None and tuple(mesh) != be.mesh:
        raise ValueError(f"mesh={tuple(mesh)} was asked for, but the {be.name} backend passed runs on mesh {be.mesh}")
    # on a mesh each chip runs its share of the batch: layers are built, and L1 checked, for that share
    chip_shape = (be.check_batch(shape[0], "input"), *shape[1:])
    recipe = recipe.for_model(model, chip_shape, be)  # itself, or for "auto" a recipe tuned for this model

    traced_from = time.perf_counter()  # tuning, if any, reported its own progress
    work = copy.deepcopy(model).eval()  # the caller's model is never touched
    gm = trace(work, None)
    fingerprint = Fingerprint.of(gm, work, recipe, be, chip_shape)
    weight_cache = ConversionCache.open(cache_dir(cache), fingerprint, limit=cache_max_bytes,
                                        about=describe_conversion(model, recipe, be, chip_shape))
    weight_cache.propagate_shapes(gm, torch.zeros(chip_shape))
    remove_identities(gm)
    simplify(gm)  # shape arithmetic and constants folded, channel splits as slices
    log.info("traced %s: %d nodes (%.1f s)", type(model).__name__, len(gm.graph.nodes),
             time.perf_counter() - traced_from)
    ops = {n.name: (_describe(gm, n), _kind(n)) for n in gm.graph.nodes}  # the rewrite erases what they describe

    def build(r: Recipe) -> tuple[list[tuple[Match, TTModule]], dict[str, str]]:
        return _match_all(gm, BuildContext(gm, be, r, (shape[2], shape[3]), weight_cache))

    try:  # "auto" layouts that would not run are replaced (the recipe gains a rule saying why)
        recipe, (matches, fallbacks) = settle_layouts(recipe, build, (shape[2], shape[3]))
    except InvalidLayerConfig as error:
        raise ConversionError(str(error)) from None
    weight_cache.save()
    _check_l1(matches, recipe)
    if strict and fallbacks:
        lines = "\n".join(f"  {node} ({ops[node][0]}): {reason}" for node, reason in fallbacks.items())
        raise ConversionError(f"strict conversion: {len(fallbacks)} node(s) would fall back to torch:\n{lines}")

    counter = TransferCounter()
    _rewrite(gm, matches)
    transfers = _insert_transfers(gm, be, recipe, counter)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()

    records = _records([module for _, module in matches], ops, fallbacks)
    report = ConversionReport(type(model).__name__, recipe.name, be.name, shape, records, transfers)
    report.seconds = time.perf_counter() - start
    log.info(report.summary())
    return ConvertedModel(gm, be, recipe, report, counter, ModelSource(model, fingerprint))


def _gathered(shape: tuple[int, ...] | None, chips: int) -> tuple[int, ...] | None:
    """A traced value's shape once every chip's share is gathered: shapes are traced for one chip's
    share of the batch, which leads every device value."""
    return (shape[0] * chips, *shape[1:]) if shape and chips > 1 else shape


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


def _match_all(gm: fx.GraphModule, ctx: BuildContext) -> tuple[list[tuple[Match, TTModule]], dict[str, str]]:
    """Greedy, from the outputs back, largest pattern first (as torch.ao's fuser does), so a chain is
    claimed whole by the pattern that ends it. Returns the matches with their modules, in graph order,
    and why each node no rewriter claimed stays in torch."""
    claimed: set[fx.Node] = set()
    matches: list[tuple[Match, TTModule]] = []
    fallbacks: dict[str, str] = {}
    start = time.perf_counter()
    for node in reversed(gm.graph.nodes):
        if node in claimed or node.op not in ("call_module", "call_function", "call_method"):
            continue
        reasons: list[str] = []
        for rw in rewriters_at(node, gm):
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
            break
        else:
            fallbacks[node.name] = "; ".join(reasons) or "no rewriter matches this op"
    matches.reverse()
    return matches, dict(reversed(fallbacks.items()))


def _records(modules: list[TTModule], ops: dict[str, tuple[str, str]], fallbacks: dict[str, str]) -> list[NodeRecord]:
    """One record per traced node, in graph order, read from the modules that run: a device node shows
    the config of the layer (or composite part) that computes it, its output node the layer's notes and L1."""
    runs: dict[str, TTModule] = {}
    for module in modules:
        runs.update((node, module) for node in module.info.nodes)
    records = []
    for node, (op, kind) in ops.items():
        module = runs.get(node)
        if module is None:
            records.append(NodeRecord(node, op, kind, fallback_reason=fallbacks.get(node)))
            continue
        part, is_output = module.part_for(node), node == module.info.nodes[-1]
        records.append(NodeRecord(
            node, op, module.info.rewriter, module.layer, part.info.config, part.info.rules,
            l1_bytes=module.l1_bytes if is_output else None,
            notes=list(module.info.notes) if is_output else [f"absorbed into {module.layer}"]))
    return records


def _check_l1(matches: list[tuple[Match, TTModule]], recipe: Recipe) -> None:
    over = [(m.info, m.l1_bytes) for _, m in matches if (m.l1_bytes or 0) > L1_ALLOCATABLE_BYTES]
    if over:
        lines = "\n".join(
            f"  {i.layer}: ~{l1:,} B per core with {i.config.to_dict() if i.config else {}}"
            f" (set by {', '.join(i.rules) or 'defaults'})" for i, l1 in over)
        raise ConversionError(
            f"recipe {recipe.name!r} ({recipe.source}): {len(over)} layer(s) exceed the {L1_ALLOCATABLE_BYTES:,} B "
            f"of L1 per core:\n{lines}\nlower act_block_h, change the shard layout, or use bfp8_b activations there")


def _rewrite(gm: fx.GraphModule, matches: list[tuple[Match, TTModule]]) -> None:
    gm.add_submodule(CONTAINER, nn.ModuleDict())
    container = gm.get_submodule(CONTAINER)
    replaced: dict[fx.Node, fx.Node] = {}  # a match's root -> its replacement, for later matches' inputs
    for match, module in matches:
        key = _unique(container, module.info.layer.replace(".", "_") or match.root.name)
        container[key] = module
        with gm.graph.inserting_before(match.root):
            new = gm.graph.call_module(f"{CONTAINER}.{key}", tuple(replaced.get(n, n) for n in match.input_nodes))
        new.meta = dict(match.root.meta)
        new.meta["original_node"] = match.root.name  # the traced node whose value this replaces
        match.root.replace_all_uses_with(new)
        replaced[match.root] = new
        for n in reversed(match.nodes):
            gm.graph.erase_node(n)


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
                          else Download(backend, counter, src.name, _gathered(node_shape(src), backend.chips)))
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
