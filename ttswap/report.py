"""The conversion report: for every traced node, what replaced it and with which config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ttswap.config import OpConfig


@dataclass
class Transfers:
    """Host<->device crossings per forward."""

    uploads: int = 0
    downloads: int = 0

    @property
    def total(self) -> int:
        return self.uploads + self.downloads

    def __str__(self) -> str:
        return f"{self.uploads} upload(s) + {self.downloads} download(s) per forward"


@dataclass
class NodeRecord:
    node: str  # FX node name
    op: str  # what the traced node computes, e.g. "Conv2d stem.0.conv" or "cat"
    replacement: str  # "conv", "concat", ... ; "torch" for a fallback; "input"/"output"
    layer: str | None = None  # the replacement's module path (shared by all nodes it absorbs)
    config: OpConfig | None = None
    rules: tuple[str, ...] = ()
    l1_bytes: int | None = None
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op": self.op,
            "replacement": self.replacement,
            "layer": self.layer,
            "config": self.config.to_dict() if self.config else None,
            "rules": list(self.rules),
            "l1_bytes_per_core": self.l1_bytes,
            "fallback_reason": self.fallback_reason,
            "notes": self.notes,
        }


@dataclass
class ConversionReport:
    model: str
    recipe: str
    backend: str
    input_shape: tuple[int, ...]
    records: list[NodeRecord] = field(default_factory=list)
    transfers: Transfers = field(default_factory=Transfers)
    seconds: float = 0.0

    @property
    def fallbacks(self) -> list[str]:
        return [r.node for r in self.records if r.replacement == "torch"]

    @property
    def layers(self) -> list[str]:
        """Module paths of the replacements, in graph order, each once."""
        return list(dict.fromkeys(r.layer for r in self.records if r.layer))

    @property
    def swapped_fraction(self) -> float:
        compute = [r for r in self.records if r.replacement not in ("input", "output")]
        return sum(r.replacement != "torch" for r in compute) / max(len(compute), 1)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for layer_rewriter in dict.fromkeys((r.layer, r.replacement) for r in self.records if r.layer):
            counts[layer_rewriter[1]] = counts.get(layer_rewriter[1], 0) + 1
        made = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"{self.model} with recipe {self.recipe!r} on {self.backend}, input {list(self.input_shape)}: "
                f"{len(self.layers)} device layers ({made}); {len(self.fallbacks)} fallback(s); {self.transfers}; "
                f"converted in {self.seconds:.2f} s")

    def table(self) -> str:
        head = ("node", "op", "replacement", "layer", "shard", "act", "weights", "fidelity", "L1/core",
                "notes / fallback")
        rows = [head]
        for r in self.records:
            c = r.config
            rows.append((
                r.node, r.op, r.replacement, r.layer or "",
                c.shard.value if c else "", c.act_dtype.value if c else "", c.weight_dtype.value if c else "",
                c.fidelity.value if c else "", f"{r.l1_bytes / 1024:.0f} KiB" if r.l1_bytes else "",
                r.fallback_reason or "; ".join(r.notes),
            ))
        widths = [min(max(len(str(row[i])) for row in rows), 48) for i in range(len(head) - 1)]
        lines = []
        for i, row in enumerate(rows):
            cells = [str(v)[:w].ljust(w) for v, w in zip(row, widths)]
            lines.append("  ".join(cells + [str(row[-1])]).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
        return "\n".join(lines + ["", self.summary()])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "backend": self.backend,
            "input_shape": list(self.input_shape),
            "seconds": self.seconds,
            "transfers": {"uploads": self.transfers.uploads, "downloads": self.transfers.downloads},
            "fallbacks": self.fallbacks,
            "nodes": [r.to_dict() for r in self.records],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
