"""The auto recipe against the shipped hand-tuned recipes: estimated throughput and accuracy.

    python benchmarks/auto_recipe.py [--models ese_vovnet19b_dw yolov4-320 yolov4-640 | all]

Models: any of timm's ESE-VoVNet / VoVNet family at 224 (ese_vovnet19b_dw, ese_vovnet19b_slim,
ese_vovnet19b_slim_dw, ese_vovnet39b, ese_vovnet57b, ese_vovnet99b, vovnet39a, vovnet57a; shipped
recipe ese_vovnet) and YOLOv4 at 320 or 640 (shipped recipe yolov4); by default ese_vovnet19b_dw and
both YOLOv4 sizes, "all" for every one.

For each model (realistic weights: BatchNorm recalibrated on scikit-image's sample photos), tunes the
auto recipe on its default samples (YOLOv4, which takes [0, 1] pixels: a varied batch of those),
converts with it and with the shipped recipe on the emulated backend, and prints the cost model's
device FPS (and the auto recipe's ratio to the shipped one) and the PCC of every output against torch
fp32 (YOLOv4: one per head, "/"-separated): on the sample photos, and on shifted crops of them. A "torch bf16" row gives the floor:
the model itself in torch bfloat16 (weights and inputs), its outputs against fp32 on the same inputs.
The last column is the auto recipe's tuning time (wall seconds; CPU seconds in the per-model line).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import ttswap
from ttswap.calibration import SAMPLE_IMAGES, recalibrate_batchnorm, sample_batch, varied_batch
from ttswap.tuning import AutoRecipe, estimate, tune
from ttswap.metrics import pcc
from ttswap.models.yolov4 import YOLOv4

VOVNETS = ("ese_vovnet19b_dw", "ese_vovnet19b_slim", "ese_vovnet19b_slim_dw", "ese_vovnet39b", "ese_vovnet57b",
           "ese_vovnet99b", "vovnet39a", "vovnet57a")
MODELS = {  # key -> (builder, shipped recipe, input size, ImageNet-normalised inputs)
    **{name: (name, "ese_vovnet", 224, True) for name in VOVNETS},
    "yolov4-320": ("yolov4", "yolov4", 320, False),
    "yolov4-640": ("yolov4", "yolov4", 640, False),
}
DEFAULT = ["ese_vovnet19b_dw", "yolov4-320", "yolov4-640"]


def build(name: str, size: int, normalize: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "yolov4":
        model = YOLOv4().eval()
    else:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
    return recalibrate_batchnorm(model, sample_batch((size, size), normalize=normalize))


def outputs(value) -> list[torch.Tensor]:
    return [v.float() for v in value] if isinstance(value, (tuple, list)) else [value.float()]


def reference(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return outputs(model(x))


def pccs(converted, x: torch.Tensor, want: list[torch.Tensor]) -> list[float]:
    """PCC of each output of ``converted`` on ``x`` (run at its batch size) against ``want``."""
    batch = converted.input_shape[0]
    got = [outputs(converted(x[i:i + batch])) for i in range(0, len(x), batch)]
    return [pcc(torch.cat(parts), ref) for parts, ref in zip(zip(*got), want)]


def bf16_pccs(model, x: torch.Tensor, want: list[torch.Tensor]) -> list[float]:
    """The floor: PCC of each output of the model in torch bfloat16 against fp32."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    return [pcc(got, ref) for got, ref in zip(reference(half, x.to(torch.bfloat16)), want)]


def measure(key: str) -> list[tuple]:
    """Table rows for one model: the shipped recipe, the auto recipe and torch bf16."""
    name, shipped, size, normalize = MODELS[key]
    model = build(name, size, normalize)
    shape = (1, 3, size, size)
    names = SAMPLE_IMAGES if normalize else SAMPLE_IMAGES[:2]  # YOLOv4 at 640 is slow to emulate
    samples = sample_batch((size, size), names, normalize=normalize)
    held_out = sample_batch((size, size), names, normalize=normalize, crops=2)[1::2]  # the shifted crops
    want = reference(model, samples), reference(model, held_out)
    start, cpu = time.perf_counter(), time.process_time()
    # ImageNet models tune on the auto recipe's default samples; YOLOv4 takes [0, 1] pixels, so its own
    tuning_samples = None if normalize else varied_batch((size, size), 6, seed=0, normalize=False)
    tuning = tune(model, shape, AutoRecipe(samples=tuning_samples))
    tuned_s, tuned_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\n{key}: {tuning.recipe.description} (tuned in {tuned_s:.0f} s, {tuned_cpu:.0f} CPU s)", flush=True)
    rows, shipped_fps = [], None
    for label, recipe in (("shipped " + shipped, shipped), ("auto", tuning.recipe)):
        converted = ttswap.convert(model, recipe, input_shape=shape, backend="emulated", cache=False)
        report = estimate(converted)
        shipped_fps = shipped_fps or report.fps
        rows.append((key, label, report.fps, report.fps / shipped_fps, report.device_seconds * 1e3,
                     pccs(converted, samples, want[0]), pccs(converted, held_out, want[1]),
                     tuned_s if label == "auto" else None))
    rows.append((key, "torch bf16", None, None, None, bf16_pccs(model, samples, want[0]),
                 bf16_pccs(model, held_out, want[1]), None))
    return rows


def show(values: list[float]) -> str:
    return "/".join(f"{v:.4f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT, choices=[*MODELS, "all"])
    args = parser.parse_args()
    keys = list(MODELS) if "all" in args.models else args.models
    rows = [row for key in keys for row in measure(key)]
    print(f"\n{'model':22s} {'recipe':18s} {'est. FPS':>8s} {'ratio':>6s} {'device ms':>9s} {'PCC samples':>21s} "
          f"{'PCC held-out':>21s} {'tune s':>6s}")
    for key, label, fps, ratio, ms, p_in, p_out, tuned_s in rows:
        numbers = f"{fps:8.1f} {ratio:6.3f} {ms:9.3f}" if fps else f"{'-':>8s} {'-':>6s} {'-':>9s}"
        tuned = f"{tuned_s:6.0f}" if tuned_s is not None else f"{'':6s}"
        print(f"{key:22s} {label:18s} {numbers} {show(p_in):>21s} {show(p_out):>21s} {tuned}")


if __name__ == "__main__":
    main()
