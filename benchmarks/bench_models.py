"""Conversion time and emulated forward time of the shipped recipes' models, against torch eager fp32.

    python benchmarks/bench_models.py [--models ese_vovnet19b_dw,yolov4-320,...] [--repeats 3]

Prints one row per model: conversion time without and with the weight cache (after one untimed
conversion, so imports and first-call costs are not counted), emulated forward time as a ratio of
torch eager fp32 measured in the same run (timings on shared machines are noisy; the ratio is what
to quote), fallbacks and transfers. Weights are realistic (BatchNorm recalibrated on sample
images): with raw random init, activations decay into float32 denormals, which slow torch's CPU
kernels by an order of magnitude and would flatter the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import ttswap
from ttswap.calibration import recalibrate_batchnorm, sample_batch
from ttswap.models.yolov4 import YOLOv4

VOVNETS = ["ese_vovnet19b_dw", "ese_vovnet19b_slim", "ese_vovnet19b_slim_dw", "ese_vovnet39b", "ese_vovnet57b",
           "ese_vovnet99b", "vovnet39a", "vovnet57a"]
DEFAULT = [*VOVNETS, "yolov4-320", "yolov4-640"]


def build(name: str) -> tuple[torch.nn.Module, str, tuple[int, int, int, int]]:
    torch.manual_seed(0)
    if name.startswith("yolov4-"):
        size = int(name.split("-")[1])
        model = recalibrate_batchnorm(YOLOv4(), sample_batch((size, size), normalize=False))
        return model, "yolov4", (1, 3, size, size)
    model = recalibrate_batchnorm(timm.create_model(name, pretrained=False), sample_batch((224, 224)))
    return model, "ese_vovnet", (1, 3, 224, 224)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    header = f"{'model':24} {'convert s':>10} {'cached s':>9} {'emulated/eager':>14} {'fallbacks':>9}  transfers"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        model, recipe, shape = build(name)
        x = sample_batch(shape[2:], names=("chelsea",), normalize=recipe != "yolov4").expand(shape).contiguous()
        ttswap.convert(model, recipe, input_shape=shape, backend="emulated", cache=False)
        start = time.perf_counter()
        ttswap.convert(model, recipe, input_shape=shape, backend="emulated", cache=False)
        cold = time.perf_counter() - start
        ttswap.convert(model, recipe, input_shape=shape, backend="emulated")  # fills the weight cache
        start = time.perf_counter()
        converted = ttswap.convert(model, recipe, input_shape=shape, backend="emulated")
        warm = time.perf_counter() - start
        converted(x)  # warm-up
        with torch.no_grad():
            model(x)
            eager = median_time(lambda: model(x), args.repeats)
        emulated = median_time(lambda: converted(x), args.repeats)
        t = converted.report.transfers
        print(f"{name:24} {cold:10.2f} {warm:9.2f} {emulated / eager:13.2f}x {len(converted.report.fallbacks):9d}  "
              f"{t.uploads} up + {t.downloads} down", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
