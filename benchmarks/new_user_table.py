"""Common timm CNNs converted the way a new user would, ``ttswap.convert(model, "auto")``, measured on
inputs and BatchNorm statistics the tuning never saw.

    python benchmarks/new_user_table.py                    # a quick subset
    python benchmarks/new_user_table.py --models all       # every family (slow: run it once)
    python benchmarks/new_user_table.py --models resnet18 rexnet_100 --size 160

Each model is built with ``pretrained=False`` and its BatchNorm statistics recalibrated on one image
set ("training": crops of scikit-image photos the auto recipe never tunes on, seed 100), the auto
recipe tunes on its own default samples (other photos and textures, synthetic 1/f images,
augmentations), and both are measured on a third set ("held-out": other images again, seed 200).
Beside "auto", the accurate recipe (bf16 weights, HiFi4, fp32 accumulation, ``shard = "auto"``) on the
same input, and torch's own ``torch.autocast("cpu", torch.bfloat16)``: the floor any bf16 device faces,
since random weights with recalibrated BatchNorm amplify rounding layer by layer.

Columns: nodes swapped, torch fallbacks; held-out PCC against torch fp32 (pooled over the held-out
images, and the worst image) for auto, accurate and torch bf16; whether auto meets the bar
(PCC_auto >= min(0.99, PCC_accurate), or 1 - PCC_auto <= 1.5 (1 - PCC_accurate)); the cost model's
estimated speed-up of auto over accurate on a Wormhole n150; tuning wall seconds and device layers
(the search is linear in them). Rows print as they finish; a failure prints its error.
"""

from __future__ import annotations

import argparse
import time

import torch

import ttswap
from ttswap.calibration import OTHER_IMAGES, recalibrate_batchnorm, varied_batch
from ttswap.config import DType, Fidelity, OpConfig, ShardLayout
from ttswap.metrics import pcc
from ttswap.recipe import Recipe
from ttswap.tuning import AutoRecipe, estimate, tune

MODELS = {  # timm name -> family
    "resnet18": "ResNet (basic blocks)",
    "resnet50": "ResNet (bottlenecks)",
    "resnet18d": "ResNet-D (avg-pool shortcuts)",
    "resnet34d": "ResNet-D, deeper",
    "resnetv2_50": "ResNetV2 (pre-activation)",
    "seresnet18": "SE-ResNet",
    "mobilenetv2_100": "MobileNetV2",
    "mobilenetv3_large_100": "MobileNetV3",
    "mobilenetv3_small_100": "MobileNetV3 small (hard-swish)",
    "efficientnet_b0": "EfficientNet",
    "efficientnetv2_rw_t": "EfficientNetV2 (fused-MBConv)",
    "ghostnet_100": "GhostNet",
    "regnetx_002": "RegNetX",
    "regnety_002": "RegNetY (SE)",
    "densenet121": "DenseNet",
    "repvgg_a0": "RepVGG",
    "vgg11_bn": "VGG",
    "convnext_nano": "ConvNeXt",
    "inception_v3": "Inception",
    "rexnet_100": "ReXNet (228-channel depthwise)",
    "mnasnet_100": "MnasNet",
    "cspresnet50": "CSPResNet",
    "dla34": "DLA",
    # issue 14: channel slices, ConvNeXt blocks, TF "same" padding, ConvMlp heads, split attention
    "cspdarknet53": "CSPDarkNet (split, contiguous)",
    "cs3darknet_m": "CSPDarkNet3 (chunk)",
    "res2next50": "Res2NeXt (hierarchical splits)",
    "mixnet_m": "MixNet (mixed-kernel split convs)",
    "dpn92": "DPN (dual-path channel slices)",
    "resnest26d": "ResNeSt (split attention)",
    "convnextv2_nano": "ConvNeXtV2 (global response norm)",
    "tf_efficientnet_b0": "EfficientNet, TF same padding",
    "tf_mobilenetv3_large_100": "MobileNetV3, TF same padding",
    "regnety_016": "RegNetY (SE)",
}
QUICK = ("resnet18", "mobilenetv3_small_100", "rexnet_100")
TRAINING_IMAGES, HELD_OUT_IMAGES = OTHER_IMAGES[:4], OTHER_IMAGES[4:]  # neither is what "auto" tunes on
NOTES: list[str] = []  # what each tuning says of itself, printed after the table
ACCURATE = Recipe(name="accurate", defaults=OpConfig(shard=ShardLayout.AUTO, weight_dtype=DType.BF16,
                                                     fidelity=Fidelity.HIFI4, fp32_acc=True))


def build(name: str, size: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return recalibrate_batchnorm(model, varied_batch((size, size), 16, seed=100, photos=TRAINING_IMAGES))


def held_out(size: int, count: int = 8) -> torch.Tensor:
    return varied_batch((size, size), count, seed=200, photos=HELD_OUT_IMAGES)


def accuracy(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(pooled PCC, worst image's PCC)."""
    return pcc(got, want), min(pcc(g, w) for g, w in zip(got, want))


def meets_bar(auto: float, accurate: float) -> bool:
    return auto >= min(0.99, accurate) or 1 - auto <= 1.5 * (1 - accurate)


def row(name: str, size: int, evaluations: int) -> str:
    shape = (1, 3, size, size)
    model = build(name, size)
    images = held_out(size)
    tuning = tune(model, shape, AutoRecipe(max_evaluations=evaluations))
    auto = ttswap.convert(model, tuning.recipe, input_shape=shape, backend="emulated", cache=False)
    accurate = ttswap.convert(model, ACCURATE, input_shape=shape, backend="emulated", cache=False)
    with torch.no_grad():
        want = model(images)
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = model(images).float()
        got = {c: torch.cat([c(x[None]) for x in images]) for c in (auto, accurate)}
    (auto_pcc, auto_worst), (acc_pcc, acc_worst) = (accuracy(got[c], want) for c in (auto, accurate))
    bf16_pcc, bf16_worst = accuracy(bf16, want)
    speedup = estimate(accurate).device_seconds / estimate(auto).device_seconds
    report = auto.report
    verdict = "yes" if meets_bar(auto_pcc, acc_pcc) else "**no**"
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in tuning.phases.items())
    NOTES.append(f"{name}: {tuning.recipe.description}; tuning phases: {phases}")
    return (f"| {name} | {MODELS.get(name, '')} | {report.swapped_fraction:.0%} | {len(report.fallbacks)} | "
            f"{auto_pcc:.4f} / {auto_worst:.4f} | {acc_pcc:.4f} / {acc_worst:.4f} | "
            f"{bf16_pcc:.4f} / {bf16_worst:.4f} | "
            f"{verdict} | {speedup:.2f}x | {tuning.seconds:.0f} | {len(tuning.choices)} | {tuning.undone} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(QUICK), help="timm names, or 'all'")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--evaluations", type=int, default=AutoRecipe.max_evaluations,
                        help="the auto recipe's evaluations per model")
    args = parser.parse_args()
    names = list(MODELS) if args.models == ["all"] else args.models
    print(f"input [1, 3, {args.size}, {args.size}], emulated backend; PCC against torch fp32 on "
          f"{len(held_out(8))} held-out images (pooled / worst image)\n")
    print("| model | family | nodes swapped | fallbacks | auto PCC | accurate PCC | torch bf16 PCC | meets bar | "
          "est. speed-up | tuning s | layers | moves undone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    start = time.perf_counter()
    for name in names:
        try:
            print(row(name, args.size, args.evaluations), flush=True)
        except Exception as error:  # noqa: BLE001 - a table row per model, failures included
            failure = f"{type(error).__name__}: {str(error)[:200]}".replace("\n", " ")
            print(f"| {name} | {MODELS.get(name, '')} | failed: {failure} |", flush=True)
    print(f"\n{len(names)} model(s) in {time.perf_counter() - start:.0f} s\n")
    for note in NOTES:
        print(f"- {note}")


if __name__ == "__main__":
    main()
