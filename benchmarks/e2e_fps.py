"""End-to-end FPS by model, resolution, board and mode, against tt-metal's published figures.

    python benchmarks/e2e_fps.py            # fit the end-to-end constants, print the table
    python benchmarks/e2e_fps.py --no-auto  # without the "auto" recipe (tuning takes minutes)

Each model is converted three ways on the emulated backend and its ops observed once:

* **tt-metal's config**: the shipped recipe's sharding with the numerics tt-metal's hand-written models
  run (bfloat8_b activations and weights, LoFi, no fp32 accumulation: ``test_e2e_performant``'s
  parameters and the models' conv configs). tt-metal's VoVNet also leaves every Conv+BN+ReLU in NCHW
  (``models/experimental/vovnet/tt/common.py``: sharded_to_interleaved, permute, to_layout, a separate
  batch_norm and relu after each conv, a permute back before the next) and its eSE runs on that NCHW
  tensor: those ops are priced on top (:func:`ttmetal_vovnet_layout_ops`). Its inputs are padded to 16
  channels, YOLOv4's 255-channel heads to 256.
* **ttswap shipped**: the shipped recipe as is.
* **ttswap auto**: ``"auto"``.

The device constants (op launch, matrix-engine efficiency) and the end-to-end ones of
``ttswap.tuning.e2e.Deployment`` are then fitted on the published points (minimising the worst ratio),
and every row is priced with them. Rows: model, input, board, mode; estimated FPS of tt-metal's config
beside its published figure and their ratio; estimated FPS of ttswap's shipped and auto recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass

import torch

import ttswap
from ttswap.backends.base import TILE, DeviceTensor, round_up
from ttswap.config import Activation, DType, Layout
from ttswap.models.yolov4 import YOLOv4
from ttswap.tuning import N150, WormholeN150, cost_report
from ttswap.tuning.e2e import BOARDS, DEPLOYMENT, MODES, Deployment, Profile, fps, transfer_bytes
from ttswap.tuning.pricing import OpCost, eltwise_cost, reshard_cost
from ttswap.tuning.recording import observe

TTMETAL_NUMERICS = dict(fidelity="LoFi", weight_dtype="bfp8_b", act_dtype="bfp8_b", fp32_acc=False)
MODELS = [("ese_vovnet19b_dw", "ese_vovnet", 224), ("yolov4", "yolov4", 320), ("yolov4", "yolov4", 640)]


@dataclass(frozen=True)
class Published:
    model: str
    size: int
    board: str
    mode: str  # "trace+2CQ" (end to end) or "device" (sum of device kernel times)
    fps: float
    protocol: str  # how the end-to-end figure was measured (ttswap.tuning.e2e.PROTOCOLS)
    source: str


PUBLISHED = [
    Published("yolov4", 320, "n150", "trace+2CQ", 166, "serial", "yolov4 tests/perf/test_e2e_performant.py"),
    Published("yolov4", 640, "n150", "trace+2CQ", 74, "serial", "yolov4 tests/perf/test_e2e_performant.py"),
    Published("yolov4", 320, "n300", "trace+2CQ", 254, "serial", "test_e2e_performant_dp"),
    Published("yolov4", 640, "n300", "trace+2CQ", 123, "serial", "test_e2e_performant_dp"),
    Published("yolov4", 640, "n150", "device", 114, "serial", "yolov4 tests/perf/test_perf.py"),
    Published("ese_vovnet19b_dw", 224, "n150", "trace+2CQ", 127, "no_readback", "vovnet README, test_e2e_performant"),
    Published("ese_vovnet19b_dw", 224, "n300", "trace+2CQ", 245, "no_readback", "vovnet README"),
    Published("ese_vovnet19b_dw", 224, "n150", "device", 159, "no_readback", "vovnet tests/perf/test_perf.py"),
]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "yolov4":
        return YOLOv4().eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def _nchw(t: DeviceTensor) -> DeviceTensor:
    """``t`` as tt-metal's VoVNet holds it between convs: NCHW, interleaved, each channel's H x W plane
    padded to whole tiles (a 7x7 plane fills a 32x32 tile)."""
    rows = t.n * t.c * round_up(t.h, TILE)
    return DeviceTensor(None, 1, rows, 1, round_up(t.w, TILE), DType.BF16, Layout.TILE)


def ttmetal_vovnet_layout_ops(calls, hw: WormholeN150) -> list[OpCost]:
    """The device ops tt-metal's VoVNet runs that a conversion does not: around each dense conv, its
    output to interleaved, a permute to NCHW, a tilize, batch_norm and relu, and a permute back to NHWC
    before the next conv; in each eSE, the fc output to interleaved and permuted, the hard sigmoid and
    the scaling multiply on the NCHW tensor."""
    ops: list[OpCost] = []
    relu = Activation("relu")
    for call in calls:
        if call.op != "conv2d":
            continue
        spec, out = call.args["spec"], call.output
        if spec.groups != 1:  # depthwise: its output stays NHWC for the pointwise conv after it
            continue
        if (out.h, out.w) == (1, 1):  # the eSE fc
            ops += [reshard_cost(out, None, hw, "sharded_to_interleaved"), eltwise_cost(_nchw(out), 1, None, hw, "permute"),
                    eltwise_cost(_nchw(out), 1, Activation("hardsigmoid"), hw, "hardsigmoid")]
            continue
        nchw = _nchw(out)
        ops += [reshard_cost(out, None, hw, "sharded_to_interleaved"), eltwise_cost(nchw, 1, None, hw, "permute"),
                eltwise_cost(nchw, 1, None, hw, "to_layout"), eltwise_cost(nchw, 3, None, hw, "batch_norm"),
                eltwise_cost(nchw, 1, relu, hw, "relu"), eltwise_cost(nchw, 1, None, hw, "permute back")]
    # the eSE multiply runs on the NCHW image: priced at that size on top of the converted one
    for call in calls:
        if call.op == "multiply":
            ops.append(eltwise_cost(_nchw(call.args["a"]), 2, None, hw, "multiply (NCHW)"))
    return ops


@dataclass
class Variant:
    """One conversion of one model: its observed ops, priced under any device constants."""

    label: str
    converted: object
    calls: list
    input_bytes: int
    output_bytes: int
    extra: object = None  # calls, hw -> extra OpCosts

    def profile(self, hw: WormholeN150) -> tuple[Profile, int]:
        """The profile, and how many of its ops are tt-metal layout ops (priced on top, see fit)."""
        report = cost_report(self.converted, self.calls, hw)
        extra = self.extra(self.calls, hw) if self.extra else ()
        return Profile.of(report, self.input_bytes, self.output_bytes, extra), len(extra)


def variants(name: str, recipe: str, size: int, auto: bool) -> dict[str, Variant]:
    model, shape = build(name), (1, 3, size, size)
    found: dict[str, Variant] = {}
    recipes = {"tt-metal": ttswap.Recipe.load(recipe).override(**TTMETAL_NUMERICS), "shipped": recipe}
    if auto:
        recipes["auto"] = "auto"
    for label, chosen in recipes.items():
        start = time.perf_counter()
        converted = ttswap.convert(model, chosen, input_shape=shape, backend="emulated")
        calls = observe(converted)
        up, down = transfer_bytes(converted)
        extra = None
        if label == "tt-metal":
            up = up // 3 * 16  # tt-metal pads the input to 16 channels on the host
            if name == "yolov4":
                down = down // 255 * 256
            else:
                extra = ttmetal_vovnet_layout_ops
        found[label] = Variant(label, converted, calls, up, down, extra)
        print(f"  converted {name} at {size} ({label}) in {time.perf_counter() - start:.0f} s", flush=True)
    return found


LAUNCH = [2e-6, 4e-6, 6e-6, 8e-6, 12e-6]
EFFICIENCY = [0.1, 0.125, 0.15, 0.2, 0.3]


def device_grid() -> list[WormholeN150]:
    return [dataclasses.replace(N150, op_launch_s=a, matmul_efficiency=b) for a in LAUNCH for b in EFFICIENCY]


def price_all(models, hws) -> dict:
    """(model, size, label, hw) -> (profile, layout ops): every variant priced under every device."""
    return {(name, size, label, hw): variant.profile(hw)
            for (name, size), found in models.items() for label, variant in found.items() for hw in hws}


def estimate(priced: dict, name: str, size: int, label: str, board: str, mode: str, dep: Deployment,
             layout_op_s: float, protocol: str = "pipeline") -> float:
    profile, layout_ops = priced[(name, size, label, dep.device)]
    profile = dataclasses.replace(profile, kernel_s=profile.kernel_s + layout_ops * layout_op_s)
    if mode == "device":
        return 1.0 / profile.kernel_s
    return fps(profile, BOARDS[board], mode, dep, protocol)


def worst_ratio(priced: dict, dep: Deployment, layout_op_s: float) -> float:
    worst = 1.0
    for p in PUBLISHED:
        est = estimate(priced, p.model, p.size, "tt-metal", p.board, p.mode, dep, layout_op_s, p.protocol)
        worst = max(worst, est / p.fps, p.fps / est)
    return worst


def fit(priced: dict, hws) -> tuple[Deployment, float]:
    """Grid search of the fitted constants, minimising the worst ratio over the published points:
    the device's op launch and matrix-engine efficiency, the trace's gap between ops, the two remote-chip
    constants, and the time of one of tt-metal VoVNet's NCHW layout ops (no per-op figure is published
    for them). The assumed constants stay as shipped."""
    best, best_r = (DEPLOYMENT, 0.0), math.inf
    for device in hws:
        for gap, remote, sync, layout in itertools.product(
                [1e-6, 2e-6, 4e-6, 6e-6, 8e-6, 10e-6], [0.0, 0.5, 1.0, 2.0], [0.0, 0.5e-3, 1e-3, 1.5e-3, 2e-3],
                [0.0, 5e-6, 10e-6, 15e-6, 20e-6, 25e-6, 30e-6, 40e-6]):
            dep = DEPLOYMENT.replace(device=device, trace_op_gap_s=gap, remote_transfer_factor=remote,
                                     remote_sync_s=sync)
            r = worst_ratio(priced, dep, layout)
            if r < best_r:
                best, best_r = (dep, layout), r
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-auto", action="store_true", help="skip the auto recipe (its tuning takes minutes)")
    parser.add_argument("--save", metavar="PATH", help="save the priced profiles (then --load skips converting)")
    parser.add_argument("--load", metavar="PATH", help="load profiles saved with --save instead of converting")
    args = parser.parse_args()
    hws = device_grid()
    if args.load:
        priced = load(args.load, hws)
    else:
        models = {}
        for name, recipe, size in MODELS:
            models[(name, size)] = variants(name, recipe, size, auto=not args.no_auto)
        priced = price_all(models, hws)
        if args.save:
            save(args.save, priced, hws)
    dep, layout_op_s = fit(priced, hws)
    d = dep.device
    print(f"\nfitted: op_launch_s={d.op_launch_s:g} matmul_efficiency={d.matmul_efficiency:g} "
          f"trace_op_gap_s={dep.trace_op_gap_s:g} remote_transfer_factor={dep.remote_transfer_factor:g} "
          f"remote_sync_s={dep.remote_sync_s:g} tt-metal VoVNet layout op={layout_op_s:g} s")
    print(f"assumed: host_dispatch_s={d.host_dispatch_s:g} host_frame_s={dep.host_frame_s:g} "
          f"host_bytes_per_s={dep.host_bytes_per_s:g} pcie_bytes_per_s={dep.pcie_bytes_per_s:g}\n")
    published = {(p.model, p.size, p.board, p.mode): p for p in PUBLISHED}
    labels = {label for (_, _, label, _) in priced}
    head = ("model", "input", "board", "mode", "tt-metal est", "published", "est/pub", "ttswap shipped", "ttswap auto")
    rows = [head]
    for name, _, size in MODELS:
        for board, mode in itertools.product(BOARDS, (*MODES, "device")):
            if mode == "device" and board != "n150":
                continue
            p = published.get((name, size, board, mode))
            ours = estimate(priced, name, size, "tt-metal", board, mode, dep, layout_op_s, p.protocol if p else "pipeline")
            shipped = estimate(priced, name, size, "shipped", board, mode, dep, 0.0)
            auto = estimate(priced, name, size, "auto", board, mode, dep, 0.0) if "auto" in labels else None
            rows.append((name, str(size), board, mode, f"{ours:.0f}", f"{p.fps:g}" if p else "",
                         f"{ours / p.fps:.2f}" if p else "", f"{shipped:.0f}", f"{auto:.0f}" if auto else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(v.rjust(w) if j >= 4 else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nmodes: plain = op by op from Python; trace+2CQ = converted.pipeline(); device = sum of device op times. "
          "tt-metal rows use each published figure's own measurement protocol, ttswap rows ttswap's pipeline.")
    print(f"calibration: worst ratio {worst_ratio(priced, dep, layout_op_s):.2f} over {len(PUBLISHED)} published points")


def save(path: str, priced: dict, hws) -> None:
    rows = [[name, size, label, [hw.op_launch_s, hw.matmul_efficiency], dataclasses.asdict(profile), layout]
            for (name, size, label, hw), (profile, layout) in priced.items()]
    with open(path, "w") as f:
        json.dump(rows, f)


def load(path: str, hws) -> dict:
    """Profiles saved by --save, for the device constants of ``hws`` (the grid this script fits over)."""
    with open(path) as f:
        rows = json.load(f)
    by_constants = {(hw.op_launch_s, hw.matmul_efficiency): hw for hw in hws}
    return {(name, size, label, by_constants[tuple(c)]): (Profile(**profile), layout)
            for name, size, label, c, profile, layout in rows}


if __name__ == "__main__":
    main()
