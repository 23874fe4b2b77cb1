"""A value check of the ttnn path: the golden backend against the emulated one, layer by layer.

    python benchmarks/golden_check.py [--models ese_vovnet19b_dw,yolov4-320] [--threshold 0.999] [--all]

``backend="golden"`` runs the ttnn backend's own code with every ttnn op computed by ttnn's CPU
reference (see ttswap/backends/golden.py). For each model, with its shipped recipe, BatchNorm
statistics calibrated on sample photos and a held-out photo as input, this prints per device layer:

* ``g~e iso`` / ``g~e prop``: PCC of the golden layer output against the emulated one. One conversion
  runs on both backends in lockstep (``ttswap.crosscheck.LockstepBackend``, which also checks that
  both report the same shape, dtype, layout and placement for every op); ``iso``: the layer fed
  torch's values of its inputs, so only its own op differs; ``prop``: the two chains as they run,
  where the emulator's modelled rounding compounds;
* ``gold``/``emu`` ``iso``/``prop``: each backend's PCC against torch fp32 from ``ttswap.compare``;

then each model output's PCC against torch fp32 for golden, emulated, and torch's own
``torch.autocast("cpu", torch.bfloat16)`` (the floor any bf16 device faces).

A layer is flagged when, in isolation, golden and emulated disagree or either is far from torch. If
golden is far from torch while emulated is close, the ttnn path computes something else (weight
layout, concat order, padding); if golden is close to torch and the emulator is not, the emulator
does. Golden does not model math fidelity, accumulation precision or the kernels' intermediate
roundings, so the two differ in isolation by the emulator's modelled loss and no more. Only flagged
layers are printed unless ``--all``.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import ttswap
from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.golden import GoldenBackend
from ttswap.calibration import image_to_tensor, recalibrate_batchnorm, sample_batch
from ttswap.compare import compare
from ttswap.crosscheck import LockstepBackend
from ttswap.metrics import pcc
from ttswap.models.yolov4 import YOLOv4
from ttswap.modules import TTModule

CALIBRATION = ("astronaut", "coffee", "rocket")  # BatchNorm statistics come from these (two crops each)
HELD_OUT = "chelsea"  # the measured input: a photo calibration never saw


def build(name: str) -> tuple[torch.nn.Module, str, tuple[int, int, int, int], torch.Tensor]:
    """The model with calibrated realistic weights, its shipped recipe, input shape and input."""
    torch.manual_seed(0)
    if name.startswith("yolov4-"):
        size, normalize = int(name.split("-")[1]), False
        model, recipe = YOLOv4(), "yolov4"
    else:
        size, normalize = 224, True
        model, recipe = timm.create_model(name, pretrained=False), "ese_vovnet"
    recalibrate_batchnorm(model, sample_batch((size, size), names=CALIBRATION, normalize=normalize, crops=2))
    x = sample_batch((size, size), names=(HELD_OUT,), normalize=normalize)
    return model.eval(), recipe, (1, 3, size, size), x


def leaves(value) -> list[torch.Tensor]:
    return [t.float() for t in (value if isinstance(value, (list, tuple)) else [value])]


def lockstep_compare(model, recipe, shape, x, threshold: float):
    """The model converted once for both backends (``LockstepBackend``: every op on emulated and on
    golden), compared with torch by ``ttswap.compare``. Returns the emulated side's comparison, per
    layer and mode the PCC of golden's output against emulated's, and every op whose metadata the
    two backends report differently."""
    backend = LockstepBackend(EmulatedBackend(), GoldenBackend(), stop_at_first=False)
    converted = ttswap.convert(model, recipe, input_shape=shape, backend=backend, cache=False)
    gm = converted.graph_module
    # propagated runs download each layer under its graph node's name, isolated ones under the layer's
    node_of = {gm.get_submodule(n.target).layer: str(n.target) for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TTModule)}
    agreement: dict[str, dict[str, float]] = {"propagated": {}, "isolated": {}}
    comparisons = {}
    for mode in ("propagated", "isolated"):
        backend.downloads.clear()  # each download of a layer records (emulated, golden)
        comparisons[mode] = compare(model, converted, x, modes=(mode,), threshold=threshold)
        for row in comparisons[mode].layers:
            emulated, golden = backend.downloads[node_of[row.layer] if mode == "propagated" else row.layer]
            agreement[mode][row.layer] = pcc(golden, emulated)
    emulated = comparisons["isolated"]
    for mine, propagated in zip(emulated.layers, comparisons["propagated"].layers):
        mine.metrics["propagated"] = propagated.metrics["propagated"]
    emulated.output_pcc = comparisons["propagated"].output_pcc
    return emulated, agreement, [check.describe() for check in backend.checks if not check.agrees]


def check_model(name: str, threshold: float, show_all: bool) -> list[str]:
    model, recipe, shape, x = build(name)
    start = time.perf_counter()
    emulated, agreement, mismatches = lockstep_compare(model, recipe, shape, x, threshold)
    golden = compare(model, ttswap.convert(model, recipe, input_shape=shape, backend="golden", cache=False), x,
                     threshold=threshold)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        bf16 = leaves(model(x))
    with torch.no_grad():
        fp32 = leaves(model(x))
    seconds = time.perf_counter() - start

    head = ["#", "layer", "op", "shape", "g~e iso", "g~e prop", "gold iso", "emu iso", "gold prop", "emu prop", ""]
    rows, flagged = [], 0
    for i, (g, e) in enumerate(zip(golden.layers, emulated.layers)):
        agree_iso, agree_prop = agreement["isolated"][g.layer], agreement["propagated"][g.layer]
        gi, ei = g.metrics["isolated"].pcc, e.metrics["isolated"].pcc
        flag = suspect(agree_iso, gi, ei, threshold)
        flagged += bool(flag)
        if flag or show_all:
            rows.append([str(i), g.layer, g.rewriter, "x".join(map(str, g.shape)), f"{agree_iso:.6f}",
                         f"{agree_prop:.6f}", f"{gi:.6f}", f"{ei:.6f}", f"{g.metrics['propagated'].pcc:.6f}",
                         f"{e.metrics['propagated'].pcc:.6f}", flag])
    lines = [f"## {name} ({recipe} recipe, input {HELD_OUT} {'x'.join(map(str, shape))}): "
             f"{len(golden.layers)} device layers, {flagged} flagged (isolated PCC below {threshold}), "
             f"{len(mismatches)} ops with differing metadata ({seconds:.0f} s)"]
    for mode in ("isolated", "propagated"):
        values = agreement[mode]
        lowest = min(values, key=values.get)
        lines.append(f"{mode}: lowest golden~emulated {values[lowest]:.6f} ({lowest}); lowest against torch: "
                     f"golden {min(r.metrics[mode].pcc for r in golden.layers):.6f}, "
                     f"emulated {min(r.metrics[mode].pcc for r in emulated.layers):.6f}")
    if rows:
        lines += table(head, rows)
    lines += mismatches
    out_head = ["output", "golden vs fp32", "emulated vs fp32", "torch bf16 vs fp32"]
    out_rows = [[str(i), f"{gp:.6f}", f"{ep:.6f}", f"{pcc(b, f):.6f}"]
                for i, (gp, ep, b, f) in enumerate(zip(golden.output_pcc, emulated.output_pcc, bf16, fp32))]
    return lines + [""] + table(out_head, out_rows) + [""]


def suspect(agree: float, golden_isolated: float, emulated_isolated: float, threshold: float) -> str:
    """Which side a layer low in isolation points at (from the same inputs, so its own op): golden is
    ttnn's reference, so golden far from torch means the ttnn path computes something else; golden
    close to torch but far from the emulator, the emulator."""
    if agree >= threshold and golden_isolated >= threshold:
        return ""
    if golden_isolated < threshold <= emulated_isolated:
        return "<- ttnn path?"
    if golden_isolated >= threshold:
        return "<- emulator?"
    return "<- both?"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ese_vovnet19b_dw,yolov4-320")
    parser.add_argument("--threshold", type=float, default=0.999, help="flag layers below this PCC")
    parser.add_argument("--all", action="store_true", help="print every layer, not only flagged ones")
    args = parser.parse_args()
    for name in args.models.split(","):
        print("\n".join(check_model(name, args.threshold, args.all)), flush=True)


if __name__ == "__main__":
    main()
