"""The auto recipe against the shipped hand-tuned recipes: estimated throughput and accuracy.

    python benchmarks/auto_recipe.py [--models vovnet yolov4-320 yolov4-640]

For each model (realistic weights: BatchNorm recalibrated on scikit-image's sample photos), tunes the
auto recipe on the sample photos, converts with it and with the shipped recipe on the emulated
backend, and prints the cost model's device FPS and the PCC against torch fp32: on the photos the
auto recipe tuned on, and on shifted crops of them it never saw (every output; YOLOv4's worst head).
"""

from __future__ import annotations

import argparse
import time

import torch

import ttswap
from ttswap.auto_recipe import AutoRecipe, tune
from ttswap.calibration import SAMPLE_IMAGES, recalibrate_batchnorm, sample_batch
from ttswap.cost import estimate
from ttswap.metrics import pcc
from ttswap.models.yolov4 import YOLOv4

MODELS = {  # name -> (builder, shipped recipe, input size, ImageNet-normalised inputs)
    "vovnet": ("ese_vovnet19b_dw", "ese_vovnet", 224, True),
    "yolov4-320": ("yolov4", "yolov4", 320, False),
    "yolov4-640": ("yolov4", "yolov4", 640, False),
}


def build(name: str, size: int, normalize: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "yolov4":
        model = YOLOv4().eval()
    else:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
    return recalibrate_batchnorm(model, sample_batch((size, size), normalize=normalize))


def outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def worst_pcc(converted, model, x: torch.Tensor) -> float:
    batch = converted.input_shape[0]
    got = [outputs(converted(x[i:i + batch])) for i in range(0, len(x), batch)]
    with torch.no_grad():
        want = outputs(model(x))
    return min(pcc(torch.cat(parts), ref) for parts, ref in zip(zip(*got), want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    rows = []
    for key in args.models:
        name, shipped, size, normalize = MODELS[key]
        model = build(name, size, normalize)
        shape = (1, 3, size, size)
        names = SAMPLE_IMAGES if normalize else SAMPLE_IMAGES[:2]  # YOLOv4 at 640 is slow to emulate
        samples = sample_batch((size, size), names, normalize=normalize)
        held_out = sample_batch((size, size), names, normalize=normalize, crops=2)[1::2]  # the shifted crops
        start = time.process_time()
        tuning = tune(model, shape, AutoRecipe(samples=samples))
        tuned_s = time.process_time() - start
        print(f"\n{key}: {tuning.recipe.description} (tuned in {tuned_s:.0f} CPU s)")
        for label, recipe in (("shipped " + shipped, shipped), ("auto", tuning.recipe)):
            converted = ttswap.convert(model, recipe, input_shape=shape, backend="emulated", cache=False)
            report = estimate(converted)
            rows.append((key, label, report.fps, report.device_seconds * 1e3, worst_pcc(converted, model, samples),
                         worst_pcc(converted, model, held_out)))
    print(f"\n{'model':11s} {'recipe':20s} {'est. FPS':>8s} {'device ms':>9s} {'PCC samples':>11s} "
          f"{'PCC held-out':>12s}")
    for key, label, fps, ms, p_in, p_out in rows:
        print(f"{key:11s} {label:20s} {fps:8.0f} {ms:9.3f} {p_in:11.4f} {p_out:12.4f}")


if __name__ == "__main__":
    main()
