"""Per-layer numerics: where a converted model departs from torch fp32.

    result = ttswap.compare(model, converted, x)
    print(result)                          # one row per device layer: PCC and max |error| per mode
    result.first_below("isolated")         # the first layer under the threshold, or None
    result.to_json(); result.plot("pcc.png")

Every device layer (each ``TTModule`` node of ``converted.graph_module``) is compared with the value
the original model computes, in fp32, at the traced node the layer replaces (``convert`` records its
name as ``node.meta["original_node"]``). Two modes:

* ``propagated``: the converted chain as it runs, each layer's output downloaded as it is produced, so
  a layer's error includes everything upstream of it;
* ``isolated``: each layer fed the torch reference values of its inputs, uploaded in the dtype of the
  layer (or upload) that produces them in the chain, so a layer's error is its own.

A layer low in ``propagated`` but fine in ``isolated`` inherits its error; one low in both causes it.
Outputs holding NaN or Inf are flagged and count as below the threshold.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ttswap.backends.base import DeviceTensor
from ttswap.cache import weights_digest
from ttswap.config import OpConfig
from ttswap.converter import ConvertedModel
from ttswap.metrics import pcc
from ttswap.modules import Download, TTModule, Upload
from ttswap.trace import trace

MODES = ("propagated", "isolated")


@dataclass(frozen=True)
class Metrics:
    pcc: float
    max_abs_error: float
    nan: int  # NaN values in the device output
    inf: int

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    def below(self, threshold: float) -> bool:
        return not self.finite or not self.pcc >= threshold  # a NaN PCC is below any threshold


@dataclass
class LayerComparison:
    layer: str  # the device layer's module path
    rewriter: str
    node: str  # the traced node of the original model it replaces
    shape: tuple[int, ...]
    metrics: dict[str, Metrics] = field(default_factory=dict)  # by mode


@dataclass
class Comparison:
    model: str
    threshold: float
    modes: tuple[str, ...]
    layers: list[LayerComparison]
    output_pcc: list[float] | None  # the converted model's outputs against torch (propagated mode)
    seconds: float = 0.0

    def __getitem__(self, layer: str) -> LayerComparison:
        for row in self.layers:
            if row.layer == layer:
                return row
        raise KeyError(f"no device layer {layer!r}; layers: {', '.join(r.layer for r in self.layers)}")

    def first_below(self, mode: str) -> LayerComparison | None:
        """The first layer, in graph order, whose PCC is under the threshold or whose output is not finite."""
        self._check_mode(mode)
        return next((r for r in self.layers if r.metrics[mode].below(self.threshold)), None)

    def non_finite(self, mode: str) -> list[LayerComparison]:
        self._check_mode(mode)
        return [r for r in self.layers if not r.metrics[mode].finite]

    def _check_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} was not run; this comparison has {', '.join(self.modes)}")

    # -- output ------------------------------------------------------------------------------------
    def table(self) -> str:
        head = ["#", "layer", "op", "shape"]
        for mode in self.modes:
            head += [f"PCC {mode}", "max|err|", "flags"]
        rows = [head]
        first = {mode: self.first_below(mode) for mode in self.modes}
        for i, r in enumerate(self.layers):
            row = [str(i), r.layer, r.rewriter, "x".join(map(str, r.shape))]
            for mode in self.modes:
                m = r.metrics[mode]
                flags = [f"{m.nan} NaN" if m.nan else "", f"{m.inf} Inf" if m.inf else "",
                         "<- first below" if first[mode] is r else ""]
                row += [f"{m.pcc:.6f}", f"{m.max_abs_error:.4g}", " ".join(f for f in flags if f)]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + ["", self.summary()])

    def summary(self) -> str:
        parts = [f"{self.model}: {len(self.layers)} device layers against torch fp32, threshold PCC {self.threshold}"]
        for mode in self.modes:
            first, bad = self.first_below(mode), self.non_finite(mode)
            worst = min((r.metrics[mode].pcc for r in self.layers), default=float("nan"))
            parts.append(f"{mode}: lowest PCC {worst:.6f}; first below threshold: {first.layer if first else 'none'}"
                         + (f"; NaN/Inf in {len(bad)} layer(s), first {bad[0].layer}" if bad else ""))
        if self.output_pcc is not None:
            parts.append("model output PCC: " + ", ".join(f"{v:.6f}" for v in self.output_pcc))
        parts.append(f"compared in {self.seconds:.1f} s")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        first = {mode: self.first_below(mode) for mode in self.modes}
        return {
            "model": self.model,
            "threshold": self.threshold,
            "modes": list(self.modes),
            "seconds": self.seconds,
            "output_pcc": [_json_float(v) for v in self.output_pcc] if self.output_pcc is not None else None,
            "first_below": {mode: r.layer if r else None for mode, r in first.items()},
            "non_finite": {mode: [r.layer for r in self.non_finite(mode)] for mode in self.modes},
            "layers": [
                {"layer": r.layer, "rewriter": r.rewriter, "node": r.node, "shape": list(r.shape),
                 **{mode: {"pcc": _json_float(m.pcc), "max_abs_error": _json_float(m.max_abs_error),
                           "nan": m.nan, "inf": m.inf} for mode, m in r.metrics.items()}}
                for r in self.layers
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str | Path) -> Path:
        """PCC by layer, one line per mode, the threshold dashed: a PNG at ``path``."""
        try:
            from matplotlib.figure import Figure  # no pyplot: no GUI backend is chosen or needed
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install 'ttswap[dev]'") from None
        n = len(self.layers)
        fig = Figure(figsize=(min(max(8.0, 0.12 * n), 30.0), 5.0))
        ax = fig.add_subplot()
        for mode in self.modes:
            values = [r.metrics[mode].pcc for r in self.layers]
            ax.plot(range(n), values, marker=".", linewidth=1, label=mode)
            first = self.first_below(mode)
            if first is not None:
                ax.axvline(self.layers.index(first), linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
        ax.axhline(self.threshold, linestyle="--", color="gray", linewidth=1, label=f"threshold {self.threshold}")
        ax.set_xticks(range(n), [r.layer for r in self.layers], rotation=90, fontsize=5 if n > 60 else 7)
        ax.set_ylabel("PCC against torch fp32")
        ax.set_title(f"{self.model}: per-layer PCC")
        ax.legend(loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


# -- running -----------------------------------------------------------------------------------------


def compare(model: nn.Module, converted: ConvertedModel, x: torch.Tensor, *, modes: Sequence[str] = MODES,
            threshold: float = 0.99) -> Comparison:
    """Compare every device layer of ``converted`` with ``model`` (the model it was converted from) on
    input ``x``; see the module docstring for the modes."""
    start = time.perf_counter()
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if tuple(x.shape) != tuple(converted.input_shape):
        raise ValueError(f"x has shape {list(x.shape)}; the model was converted for {list(converted.input_shape)}")
    if getattr(converted.backend, "mock", False):
        warnings.warn("ttnn mock mode computes nothing (every value reads back as zero): these PCCs are meaningless",
                      stacklevel=2)
    if converted.source is not None and weights_digest(model) != converted.source.fingerprint.weights:
        warnings.warn("model's weights differ from the ones that were converted: expect low PCCs", stacklevel=2)

    gm = converted.graph_module
    device_nodes = [n for n in gm.graph.nodes if _module(gm, n, TTModule)]
    for node in device_nodes:
        if "original_node" not in node.meta:
            raise ValueError(f"{node.name} does not record the node it replaces: convert the model again with this ttswap")
    defaults = converted.recipe.defaults
    inputs = {n: [_original(gm, a, defaults) for a in n.all_input_nodes] for n in device_nodes}
    wanted = {n.meta["original_node"] for n in device_nodes} | {name for names in inputs.values() for name, _ in names}
    reference, ref_output = _reference(model, x, wanted)

    rows = []
    for node in device_nodes:
        module = gm.get_submodule(node.target)
        name = node.meta["original_node"]
        if name not in reference:
            raise ValueError(f"layer {module.layer!r} replaces node {name!r}, which tracing the given model does not "
                             "produce: pass the model that was converted")
        rows.append(LayerComparison(module.layer, module.info.rewriter, name, tuple(reference[name].shape)))

    output_pcc = None
    with torch.no_grad():
        if "propagated" in modes:
            captured, output = _run_chain(gm, converted, x, set(device_nodes))
            for node, row in zip(device_nodes, rows):
                row.metrics["propagated"] = _metrics(captured[node], reference[row.node], row.layer)
            output_pcc = [pcc(a, b) for a, b in zip(_leaves(output), _leaves(ref_output))]
        if "isolated" in modes:
            for node, row in zip(device_nodes, rows):
                module = gm.get_submodule(node.target)
                device_inputs = [converted.backend.upload(reference[name], cfg, layer=f"{row.layer} input")
                                 for name, cfg in inputs[node]]
                out = converted.backend.download(module(*device_inputs), layer=row.layer)
                row.metrics["isolated"] = _metrics(out, reference[row.node], row.layer)
    return Comparison(type(model).__name__, threshold, modes, rows, output_pcc, time.perf_counter() - start)


def _module(gm: fx.GraphModule, node: fx.Node, kind: type) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, kind) else None


def _original(gm: fx.GraphModule, node: fx.Node, defaults: OpConfig) -> tuple[str, OpConfig]:
    """The traced node of the original model whose value ``node`` carries, and the config of the
    layer or upload that puts it on the device in the chain."""
    upload = _module(gm, node, Upload)
    if upload is not None:
        return _original(gm, node.args[0], defaults)[0], upload.cfg
    if _module(gm, node, Download) is not None:
        return _original(gm, node.args[0], defaults)
    device = _module(gm, node, TTModule)
    if device is not None:
        return node.meta["original_node"], device.info.config or defaults
    return node.name, defaults


def _reference(model: nn.Module, x: torch.Tensor, wanted: set[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """The fp32 values of the ``wanted`` traced nodes of ``model`` on ``x``, and its output."""
    gm = trace(copy.deepcopy(model).eval(), None)  # the same tracer as convert, so the same node names
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in wanted and isinstance(result, torch.Tensor):
                values[n.name] = result.detach().float()
            return result

    with torch.no_grad():
        output = Recorder(gm).run(x)
    return values, output


def _run_chain(gm: fx.GraphModule, converted: ConvertedModel, x: torch.Tensor,
               capture: set[fx.Node]) -> tuple[dict[fx.Node, torch.Tensor], Any]:
    """Run the converted graph, downloading each captured device output as it is produced (before a
    later op may free it)."""
    captured: dict[fx.Node, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in capture:
                if not isinstance(result, DeviceTensor):
                    raise TypeError(f"device layer {n.target} returned {type(result).__name__}, not a DeviceTensor")
                captured[n] = converted.backend.download(result, layer=str(n.target))
            return result

    output = Capture(gm).run(x)
    return captured, output


def _metrics(device: torch.Tensor, reference: torch.Tensor, layer: str) -> Metrics:
    if device.numel() != reference.numel():
        raise ValueError(f"layer {layer!r}: device output has shape {list(device.shape)}, torch {list(reference.shape)}")
    device = device.reshape(reference.shape).float()
    nan, inf = int(device.isnan().sum()), int(device.isinf().sum())
    return Metrics(pcc(device, reference), float((device - reference).abs().max()), nan, inf)


def _leaves(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return []


__all__ = ["Comparison", "LayerComparison", "MODES", "Metrics", "compare"]
