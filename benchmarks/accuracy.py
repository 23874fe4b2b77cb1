"""Accuracy of the shipped recipes on held-out inputs, beside torch's own bfloat16.

    python benchmarks/accuracy.py [--models ese_vovnet19b_dw,yolov4-320,...] [--set packer_l1_acc=true ...]
                                  [--backend emulated|golden]

Random-weight networks amplify rounding far more than trained ones (YOLOv4's heads lose more to one
bfloat16 rounding of their input than a trained detector does through the whole network), so a PCC
alone says little. Each row states two numbers per output: the PCC against torch fp32 of ttswap's
conversion, and of ``torch.autocast("cpu", torch.bfloat16)`` on the same input, the floor any bf16
device faces. BatchNorm statistics are calibrated on one set of photos and every number is measured
on others (other photos, other crops, a synthetic natural-spectrum image), as a user's inputs would
be; the table gives the mean over those inputs and the worst input's gap to torch bf16.

``--set FIELD=VALUE`` sets a field on every layer (a last rule, so it wins), to see what one numerics
lever is worth.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import timm
import torch

import ttswap
from ttswap.calibration import image_to_tensor, recalibrate_batchnorm, sample_batch
from ttswap.metrics import pcc
from ttswap.models.yolov4 import YOLOv4
from ttswap.recipe import Recipe

VOVNETS = ["ese_vovnet19b_dw", "ese_vovnet19b_slim", "ese_vovnet19b_slim_dw", "ese_vovnet39b", "ese_vovnet57b",
           "ese_vovnet99b", "vovnet39a", "vovnet57a"]
DEFAULT = [*VOVNETS, "yolov4-320", "yolov4-640"]
CALIBRATION = ("astronaut", "coffee", "rocket")  # BatchNorm statistics come from these (two crops each)
HELD_OUT = ("chelsea", "hubble_deep_field", "immunohistochemistry", "retina")  # never seen by calibration


def held_out_inputs(size: tuple[int, int], normalize: bool, seed: int = 1) -> list[torch.Tensor]:
    """Photos calibration never saw, plus a 1/f-spectrum noise image (the statistics of natural images
    without their content)."""
    from skimage import data

    inputs = [image_to_tensor(getattr(data, name)(), size, normalize) for name in HELD_OUT]
    gen = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size[0])[:, None]
    fx = torch.fft.rfftfreq(size[1])[None, :]
    amplitude = 1.0 / (fy**2 + fx**2).sqrt().clamp_min(1.0 / max(size))
    spectrum = amplitude * torch.randn(3, *amplitude.shape, dtype=torch.complex64, generator=gen)
    noise = torch.fft.irfft2(spectrum, s=size)
    noise = (noise - noise.mean()) / noise.std() * 0.25 + 0.45  # a photo's mean and spread in [0, 1]
    noise = noise.clamp(0, 1)[None]
    if normalize:
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        noise = (noise - mean) / std
    return [*inputs, noise]


def build(name: str) -> tuple[torch.nn.Module, str, tuple[int, int], bool]:
    torch.manual_seed(0)
    if name.startswith("yolov4-"):
        size = int(name.split("-")[1])
        model, recipe, normalize = YOLOv4(), "yolov4", False
    else:
        size = 224
        model, recipe, normalize = timm.create_model(name, pretrained=False), "ese_vovnet", True
    recalibrate_batchnorm(model, sample_batch((size, size), names=CALIBRATION, normalize=normalize, crops=2))
    return model, recipe, (size, size), normalize


def outputs(result) -> list[torch.Tensor]:
    return [t.float() for t in (result if isinstance(result, (list, tuple)) else [result])]


def parse_settings(settings: list[str]) -> dict[str, object]:
    raw: dict[str, object] = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        raw[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    return raw


def measure(name: str, settings: list[str], backend: str) -> list[str]:
    model, recipe_name, size, normalize = build(name)
    recipe = Recipe.load(recipe_name)
    if settings:
        recipe = recipe.override(**parse_settings(settings))
    converted = ttswap.convert(model, recipe, input_shape=(1, 3, *size), backend=backend, cache=False)
    ours, floor = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for x in held_out_inputs(size, normalize):
            ref = outputs(model(x))
            with torch.autocast("cpu", torch.bfloat16):
                bf16 = outputs(model(x))
            ours.append([pcc(a, r) for a, r in zip(outputs(converted(x)), ref)])
            floor.append([pcc(a, r) for a, r in zip(bf16, ref)])
    seconds = time.perf_counter() - start
    ours_a, floor_a = np.array(ours), np.array(floor)
    rows = []
    for head in range(ours_a.shape[1]):
        label = name if ours_a.shape[1] == 1 else f"{name} head {head + 1}"
        gap = (ours_a[:, head] - floor_a[:, head]).min()
        rows.append(f"| {label} | {ours_a[:, head].mean():.4f} | {floor_a[:, head].mean():.4f} | "
                    f"{ours_a[:, head].min():.4f} | {gap:+.4f} | {seconds:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--backend", default="emulated")
    args = parser.parse_args(argv)
    print(f"held-out inputs: {', '.join(HELD_OUT)}, 1/f noise; BatchNorm calibrated on {', '.join(CALIBRATION)}"
          + (f"; overrides {' '.join(args.set)}" if args.set else ""))
    print("| model | PCC ttswap (mean) | PCC torch bf16 (mean) | PCC ttswap (worst) | worst gap to bf16 | s |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in measure(name, args.set, args.backend):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
