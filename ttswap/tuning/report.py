"""The cost report: a converted model's recorded backend calls, priced and grouped by the layer that
issued them, with totals (device time, FPS with and without host dispatch, time by bound).

    report = estimate(converted)   # one forward pass on zeros, observed and priced
    print(report.table())
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ttswap.config import OpConfig
from ttswap.modules import Download, TTModule, Upload
from ttswap.tuning.hardware import N150, WormholeN150
from ttswap.tuning.pricing import BOUNDS, OpCost, price
from ttswap.tuning.recording import OpCall, observe, top_level_modules

if TYPE_CHECKING:
    from ttswap.converter import ConvertedModel


@dataclass
class LayerCost:
    """The estimated device time of one device layer (or one host transfer)."""

    key: str  # the layer's graph target (unique)
    layer: str  # its name, as recipes match it
    rewriter: str  # the rewriter that made it; "transfer" for uploads and downloads
    ops: list[OpCost] = field(default_factory=list)
    l1_bytes: int | None = None
    config: OpConfig | None = None

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.ops)

    @property
    def bound(self) -> str:
        """What bounds the layer: the bound of its slowest op."""
        return max(self.ops, key=lambda o: o.seconds).bound if self.ops else "launch"

    @property
    def cores(self) -> int:
        return max((o.cores for o in self.ops), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "layer": self.layer, "rewriter": self.rewriter, "seconds": self.seconds,
                "bound": self.bound,
                "cores": self.cores, "l1_bytes_per_core": self.l1_bytes,
                "config": self.config.to_dict() if self.config else None, "ops": [o.to_dict() for o in self.ops]}


@dataclass
class CostReport:
    """Per-layer estimates and totals for one converted model. ``fps`` is device throughput (what
    trace and two command queues approach); ``fps_end_to_end`` adds host dispatch of every op, not
    overlapped with the device, and the host transfers."""

    model: str
    recipe: str
    input_shape: tuple[int, ...]
    layers: list[LayerCost]
    transfers: list[LayerCost]
    fallbacks: int  # traced nodes left to torch; their host time is not modelled
    hw: WormholeN150 = N150

    @property
    def device_seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    @property
    def device_ops(self) -> int:
        return sum(len(layer.ops) for layer in self.layers)

    @property
    def transfer_seconds(self) -> float:
        return sum(t.seconds for t in self.transfers)

    @property
    def dispatch_seconds(self) -> float:
        return self.device_ops * self.hw.host_dispatch_s

    @property
    def fps(self) -> float:
        return 1.0 / self.device_seconds if self.device_seconds else float("inf")

    @property
    def end_to_end_seconds(self) -> float:
        return max(self.device_seconds, self.dispatch_seconds) + self.transfer_seconds

    @property
    def fps_end_to_end(self) -> float:
        return 1.0 / self.end_to_end_seconds

    def by_key(self) -> dict[str, LayerCost]:
        return {layer.key: layer for layer in self.layers}

    def bound_seconds(self) -> dict[str, float]:
        """Device time by what bounds each op."""
        totals = dict.fromkeys(BOUNDS[:4], 0.0)
        for layer in self.layers:
            for o in layer.ops:
                totals[o.bound] += o.seconds
        return totals

    def summary(self) -> str:
        split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in self.bound_seconds().items())
        return (f"{self.model} with recipe {self.recipe!r}, input {list(self.input_shape)}: "
                f"{len(self.layers)} device layers, {self.device_ops} device ops, "
                f"device {self.device_seconds * 1e3:.2f} ms ({self.fps:.0f} FPS; ms by bound: {split}); "
                f"end to end without trace {self.end_to_end_seconds * 1e3:.2f} ms ({self.fps_end_to_end:.0f} FPS; "
                f"{len(self.transfers)} transfer(s), {self.fallbacks} torch fallback node(s) not priced)")

    def table(self) -> str:
        head = ("layer", "rewriter", "us", "%", "bound", "cores", "ops", "fidelity", "weights", "L1/core")
        total = self.device_seconds or 1.0
        rows = [head]
        for layer in self.layers + self.transfers:
            c = layer.config
            rows.append((layer.layer, layer.rewriter, f"{layer.seconds * 1e6:.1f}",
                         f"{100 * layer.seconds / total:.1f}" if layer.rewriter != "transfer" else "",
                         layer.bound, str(layer.cores), str(len(layer.ops)), c.fidelity.value if c else "",
                         c.weight_dtype.value if c else "",
                         f"{layer.l1_bytes / 1024:.0f} KiB" if layer.l1_bytes else ""))
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(head))]
        lines = ["  ".join(str(v)[:w].ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + ["", self.summary()])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "recipe": self.recipe, "input_shape": list(self.input_shape),
            "device_seconds": self.device_seconds, "fps": self.fps,
            "end_to_end_seconds": self.end_to_end_seconds, "fps_end_to_end": self.fps_end_to_end,
            "device_ops": self.device_ops, "fallbacks": self.fallbacks,
            "seconds_by_bound": self.bound_seconds(), "hw": dataclasses.asdict(self.hw),
            "layers": [layer.to_dict() for layer in self.layers],
            "transfers": [t.to_dict() for t in self.transfers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)



def estimate(converted: "ConvertedModel", x: torch.Tensor | None = None, hw: WormholeN150 = N150) -> CostReport:
    """Estimate the device time of every layer of ``converted`` on a Wormhole n150.

    Runs one forward pass on ``x`` (default: zeros of the converted input shape) to observe the ops;
    shapes and placements do not depend on the values."""
    return cost_report(converted, observe(converted, x), hw)


def cost_report(converted: "ConvertedModel", calls: Sequence[OpCall], hw: WormholeN150 = N150) -> CostReport:
    """Price recorded calls and group them by the layer that issued them, in graph order."""
    layers: dict[str, LayerCost] = {}
    for key, module in top_level_modules(converted).items():
        if isinstance(module, TTModule):
            layers[key] = LayerCost(key, module.layer, module.info.rewriter, l1_bytes=module.l1_bytes,
                                    config=module.info.config)
        else:
            layers[key] = LayerCost(key, _label(module), "transfer")
    for call in calls:
        layers[call.key].ops.extend(price(call, hw))
    report = converted.report
    return CostReport(report.model, report.recipe, tuple(report.input_shape),
                      [v for v in layers.values() if v.rewriter != "transfer"],
                      [v for v in layers.values() if v.rewriter == "transfer"], len(report.fallbacks), hw)


def _label(module: Upload | Download) -> str:
    return f"{'upload' if isinstance(module, Upload) else 'download'} {module.name}"


__all__ = ["CostReport", "LayerCost", "cost_report", "estimate"]
