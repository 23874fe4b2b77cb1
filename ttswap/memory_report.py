"""Per-layer L1 and DRAM use of a converted model, as ttnn itself records it.

``memory_report(converted)`` runs one forward pass on the ttnn backend (a device, or mock mode, where
allocation is real and only the computation is skipped) with ttnn's graph capture
(``ttnn.graph.begin_graph_capture(RunMode.NORMAL)``) around each top-level layer: every device layer,
upload and download the converted graph calls. Before each layer it reads the allocator's view of L1
(``ttnn.get_memory_view``): the bytes per core that live tensors already hold, and the largest free
block, which falls below the free total when L1 is fragmented. It then walks the layer's captured
allocations in order (buffers and circular buffers, allocated and freed) from that starting point,
which gives the layer's peak per core.

ttnn's own ``extract_resource_usage_per_core`` is not used for the peak: it counts from zero at the
start of a capture, so a layer that frees a tensor allocated before it (a conv with
``deallocate=True``) drives its count below zero, and the unsigned result wraps to about 2**64.

A layer's peak is what ttnn's allocator must fit at once: ttnn rejects a layer whose circular buffers
reach the lowest L1 buffer, so a peak near the bank size, or a largest free block much smaller than
the free total, marks the layers to give a smaller ``act_block_h`` first. Capturing one layer at a
time keeps each capture small, and a layer that fails is marked (``LayerMemory.error``) with the
layers after it left out, instead of losing the whole report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ttswap.modules import Download, TTModule, Upload

if TYPE_CHECKING:
    from ttswap.converter import ConvertedModel


@dataclass
class LayerMemory:
    """One layer's allocations. Sizes per core are per L1 bank (one bank per worker core)."""

    layer: str
    kind: str  # the rewriter that made the layer, or "upload" / "download"
    rules: tuple[str, ...]  # the recipe rules that configured it
    resident_l1_per_core: int  # held by other live tensors when the layer started
    largest_free_l1_per_core: int  # the largest free L1 block when it started
    l1_allocated_per_core: int = 0  # L1 buffers the layer allocated (outputs, halos, reshards), summed
    dram_allocated: int = 0  # DRAM the layer allocated (e.g. prepared weights on a first call), all banks
    peak_cb_per_core: int = 0  # circular buffers, at their peak
    peak_per_core: int = 0  # L1 buffers (resident ones included) and circular buffers at their joint peak
    # programs whose circular buffers the capture did not record (ttnn 0.81.1 records none for its
    # matmul and tilize programs: 1x1 convs, uploads): for those layers the CB peak is a lower bound
    programs_without_cbs: int = 0
    error: str | None = None  # why the layer failed, when it did


@dataclass
class MemoryReport:
    model: str
    recipe: str
    input_shape: tuple[int, ...]
    l1_bank_bytes: int  # what ttnn can allocate per core (its L1 bank size)
    mock: bool  # mock mode: allocation is real, nothing is computed
    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def peak(self) -> LayerMemory:
        """The layer with the highest peak per core."""
        return max(self.layers, key=lambda m: m.peak_per_core)

    @property
    def failed(self) -> list[LayerMemory]:
        return [m for m in self.layers if m.error is not None]

    def summary(self) -> str:
        top = self.peak
        where = "mock mode" if self.mock else "device"
        text = (f"{self.model} at {list(self.input_shape)} with recipe {self.recipe!r} ({where}): {len(self.layers)} "
                f"layers; peak {top.peak_per_core:,} B of {self.l1_bank_bytes:,} B L1 per core "
                f"({top.peak_per_core / self.l1_bank_bytes:.0%}) in {top.layer}; "
                f"{sum(m.dram_allocated for m in self.layers):,} B DRAM allocated")
        if self.failed:
            bad = self.failed[0]
            text += (f"; FAILED at {bad.layer} (configured by {', '.join(bad.rules) or 'recipe defaults'}): "
                     f"{bad.error}")
        return text

    def table(self) -> str:
        head = ("layer", "kind", "resident", "largest free", "L1 alloc", "CB peak", "peak/core", "of L1", "DRAM alloc")
        rows = [head] + [self._row(m) for m in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = []
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [v.rjust(w) for v, w in zip(row[2:len(head)], widths[2:])]
            lines.append("  ".join(cells + list(row[len(head):])).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        note = ("KiB per core (L1: one bank per core) or in all (DRAM); resident and largest free: when the layer "
                "started; *: a lower bound, the capture recorded no circular buffers for some of its programs")
        return "\n".join([*lines, "", note, self.summary()])

    def _row(self, m: LayerMemory) -> tuple[str, ...]:
        bound = "*" if m.programs_without_cbs else ""
        cells = (m.layer, m.kind, _kib(m.resident_l1_per_core), _kib(m.largest_free_l1_per_core),
                 _kib(m.l1_allocated_per_core), _kib(m.peak_cb_per_core) + bound, _kib(m.peak_per_core) + bound,
                 f"{m.peak_per_core / self.l1_bank_bytes:.0%}", _kib(m.dram_allocated))
        return cells + ((f"FAILED: {m.error}",) if m.error else ())

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "input_shape": list(self.input_shape),
            "l1_bank_bytes": self.l1_bank_bytes,
            "mock": self.mock,
            "peak_layer": self.peak.layer,
            "peak_per_core": self.peak.peak_per_core,
            "layers": [asdict(m) for m in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _kib(size: int) -> str:
    return f"{size / 1024:,.1f}"


def memory_report(converted: "ConvertedModel", x: torch.Tensor | None = None) -> MemoryReport:
    """Run ``x`` (default: zeros of the converted input shape) through ``converted``, which must
    have been converted with ``backend="ttnn"``, capturing each layer's allocations."""
    import ttnn  # late: importing ttswap never imports ttnn

    from ttswap.backends.ttnn_backend import TtnnBackend

    backend = converted.backend
    if not isinstance(backend, TtnnBackend):
        raise TypeError(f"memory_report needs a model converted with backend='ttnn', not {backend.name!r}")
    report = converted.report
    bank = ttnn.get_memory_view(backend.device, ttnn.BufferType.L1).total_bytes_per_bank
    result = MemoryReport(report.model, report.recipe, report.input_shape, bank, backend.mock)
    if x is None:
        x = torch.zeros(converted.input_shape)
    with _capturing_each_layer(converted, backend, result.layers):
        try:
            converted(x)
        except _LayerFailed:
            pass  # recorded on the failed layer; the layers after it never ran
    return result


class _LayerFailed(Exception):
    pass


def _layers(converted: "ConvertedModel") -> Iterator[tuple[nn.Module, str, str, tuple[str, ...]]]:
    """The modules the converted graph calls, in order: composites' sub-layers run inside them."""
    gm = converted.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, TTModule):
            yield module, module.layer, module.info.rewriter, module.info.rules
        elif isinstance(module, (Upload, Download)):
            yield module, module.name, type(module).__name__.lower(), ()


class _capturing_each_layer:
    """While active, every layer's forward runs inside its own graph capture and appends a
    LayerMemory to ``into``. Forwards are patched on the instances and restored on exit."""

    def __init__(self, converted: "ConvertedModel", backend: Any, into: list[LayerMemory]):
        self.converted, self.backend, self.into = converted, backend, into
        self.patched: list[nn.Module] = []

    def __enter__(self) -> "_capturing_each_layer":
        for module, name, kind, rules in _layers(self.converted):
            module.forward = self._capture(module.forward, name, kind, rules)
            self.patched.append(module)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self.patched:
            del module.forward  # back to the class's forward

    def _capture(self, forward: Any, name: str, kind: str, rules: tuple[str, ...]) -> Any:
        import ttnn

        def captured(*args: Any) -> Any:
            view = ttnn.get_memory_view(self.backend.device, ttnn.BufferType.L1)
            entry = LayerMemory(name, kind, rules, view.total_bytes_allocated_per_bank,
                                view.largest_contiguous_bytes_free_per_bank)
            self.into.append(entry)
            # a program found in the cache is dispatched without allocating its circular buffers
            # anew, and the capture would miss them: build every layer's programs afresh
            self.backend.device.clear_program_cache()
            ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
            try:
                out = forward(*args)
            except Exception as error:
                entry.error = f"{type(error).__name__}: {error}"
                raise _LayerFailed(name) from error
            finally:
                trace = ttnn.graph.end_graph_capture()
                _read_trace(trace, entry)
            return out

        return captured


def _read_trace(trace: list[dict[str, Any]], entry: LayerMemory) -> None:
    """Replay the captured allocations from the resident L1, tracking the peak of L1 buffers plus
    the program's own circular buffers (globally allocated ones live in a buffer, counted already)."""
    import ttnn

    l1, dram = ttnn.BufferType.L1.value, ttnn.BufferType.DRAM.value
    buffers, cbs = entry.resident_l1_per_core, 0
    entry.peak_per_core = buffers
    cbs_recorded = False  # any circular buffer, own or global, since the last program's were freed
    for node in trace:
        kind, params = node["node_type"], node["params"]
        if kind in ("buffer_allocate", "buffer_deallocate"):
            sign = 1 if kind == "buffer_allocate" else -1
            if params["buffer_type"] == l1:
                buffers += sign * int(params["max_size_per_bank"])
                if sign > 0:
                    entry.l1_allocated_per_core += int(params["max_size_per_bank"])
            elif params["buffer_type"] == dram and sign > 0:
                entry.dram_allocated += int(params["size"])
        elif kind == "circular_buffer_allocate":
            cbs_recorded = True
            if params["globally_allocated"] == "0":
                cbs += int(params["size"])
                entry.peak_cb_per_core = max(entry.peak_cb_per_core, cbs)
        elif kind == "circular_buffer_deallocate_all":
            cbs, cbs_recorded = 0, False
        elif kind == "program_execution" and not cbs_recorded:
            entry.programs_without_cbs += 1
        entry.peak_per_core = max(entry.peak_per_core, buffers + cbs)
