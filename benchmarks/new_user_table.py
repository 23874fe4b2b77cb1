"""Common timm CNNs converted the way a new user would: ``ttswap.convert(model, "auto")``.

    python benchmarks/new_user_table.py [--models resnet18 ...] [--recipe auto|ese_vovnet|...]

Each model is built with ``pretrained=False`` and its BatchNorm statistics recalibrated on
scikit-image's sample photos (realistic folded weights without a download), converted on the emulated
backend, and measured: share of traced nodes swapped, torch fallbacks, host transfers per forward,
PCC of the logits against torch fp32 on shifted crops of the photos (images the auto recipe's PCC
guard did not see), the same PCC for the model run by torch itself in bfloat16 (weights and inputs
cast, logits back to float: the floor any bf16 implementation faces, since random weights with
recalibrated BatchNorm amplify rounding layer by layer), the cost model's device FPS on a Wormhole
n150, and the conversion's CPU time (for "auto", tuning included; CPU rather than wall time, which a
shared machine distorts). Rows print as they finish; a failed conversion prints its error.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import ttswap
from ttswap.auto_recipe import AutoRecipe
from ttswap.calibration import recalibrate_batchnorm, sample_batch
from ttswap.cost import estimate
from ttswap.metrics import pcc

MODELS = {  # timm name -> family
    "resnet18": "ResNet (basic blocks)",
    "resnet50": "ResNet (bottlenecks)",
    "resnet18d": "ResNet-D (avg-pool shortcuts)",
    "resnetv2_50": "ResNetV2 (pre-activation)",
    "seresnet18": "SE-ResNet",
    "mobilenetv2_100": "MobileNetV2",
    "mobilenetv3_large_100": "MobileNetV3",
    "efficientnet_b0": "EfficientNet",
    "ghostnet_100": "GhostNet",
    "regnetx_002": "RegNetX",
    "densenet121": "DenseNet",
    "repvgg_a0": "RepVGG",
    "vgg11_bn": "VGG",
    "convnext_nano": "ConvNeXt",
}
INPUT = (1, 3, 224, 224)


def row(name: str, recipe: str, evaluations: int) -> str:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    recalibrate_batchnorm(model, sample_batch(INPUT[2:], crops=2))
    held_out = sample_batch(INPUT[2:], crops=2)[1::2]  # the shifted crops
    chosen = AutoRecipe(max_evaluations=evaluations) if recipe == "auto" else recipe
    start = time.process_time()
    converted = ttswap.convert(model, chosen, input_shape=INPUT, backend="emulated", cache=False)
    seconds = time.process_time() - start
    report = converted.report
    with torch.no_grad():
        want = model(held_out)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(held_out.to(torch.bfloat16)).float()
    got = torch.cat([converted(held_out[i:i + 1]) for i in range(len(held_out))])
    cost = estimate(converted)
    return (f"| {name} | {MODELS.get(name, '')} | {report.swapped_fraction:.0%} | {len(report.fallbacks)} | "
            f"{report.transfers.total} | {pcc(got, want):.4f} | {pcc(bf16, want):.4f} | {cost.fps:.0f} | "
            f"{seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--recipe", default="auto", help="recipe for every model (default: auto)")
    parser.add_argument("--evaluations", type=int, default=AutoRecipe.max_evaluations,
                        help="the auto recipe's PCC evaluations per model")
    args = parser.parse_args()
    print(f"recipe {args.recipe!r}, input {list(INPUT)}, emulated backend\n")
    print("| model | family | nodes swapped | fallbacks | transfers | PCC (held-out) | torch bf16 PCC | est. FPS | "
          "convert CPU s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        try:
            print(row(name, args.recipe, args.evaluations), flush=True)
        except Exception as error:  # noqa: BLE001 - a table row per model, failures included
            failure = f"{type(error).__name__}: {str(error)[:200]}"
            print(f"| {name} | {MODELS.get(name, '')} | failed: {failure} |", flush=True)


if __name__ == "__main__":
    main()
