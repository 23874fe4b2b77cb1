"""CNN families beyond the project's tables, converted with a plain accurate recipe (issue 14).

    python benchmarks/cnn_families.py [--models cspdarknet53 convnext_nano ...]

Each timm model is built with ``pretrained=False``, its BatchNorm statistics calibrated on three sample
photos (two crops each), converted on the emulated backend with every layer at bfloat16 weights and
activations, HiFi4, fp32 accumulation, and measured on four images calibration never saw: the share of
traced nodes on the device, the torch fallbacks, host transfers per forward (counted while running),
the PCC of the logits against torch fp32, and the PCC of ``torch.autocast("cpu", torch.bfloat16)`` on
the same inputs (the floor any bf16 device faces). "meets" is PCC >= min(0.99, torch bf16's PCC).
Rows print as they finish; a failed conversion prints its error.
"""

from __future__ import annotations

import argparse
import time

import torch

import ttswap
from ttswap.calibration import image_to_tensor, recalibrate_batchnorm, sample_batch
from ttswap.config import DType, Fidelity, OpConfig
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

MODELS = {  # timm name -> what it adds to the device's repertoire
    "cspdarknet53": "CSPDarkNet (split, contiguous)",
    "cs3darknet_m": "CSPDarkNet3 (chunk)",
    "res2next50": "Res2NeXt (hierarchical splits)",
    "mixnet_m": "MixNet (mixed-kernel split convs)",
    "dpn92": "DPN (dual-path channel slices)",
    "resnest26d": "ResNeSt (split attention)",
    "convnext_nano": "ConvNeXt (LayerNorm2d, layer scale)",
    "convnextv2_nano": "ConvNeXtV2 (GRN, drawn at random)",
    "tf_efficientnet_b0": "EfficientNet, TF same padding",
    "tf_mobilenetv3_large_100": "MobileNetV3, TF same padding",
    "vgg11_bn": "VGG (ConvMlp head)",
    "regnety_016": "RegNetY (SE)",
}
INPUT = (1, 3, 224, 224)
ACCURATE = Recipe(name="accurate", description="bf16 weights and activations, HiFi4, fp32 accumulation",
                  defaults=OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True))
# Layout rules where the plain recipe's AUTO layouts do not fit L1: model -> (glob, shard, why). The rule also
# sets packer_l1_acc, so that the K-blocks a width-sharded conv splits its sum into add up in fp32 partials.
LAYOUTS = {
    "dpn92": ("features.conv[45]_*.c1x1_*.conv", "width",
              "block-sharded, conv4's 1x1 convs (1,100-1,400 input channels at 14x14) need ~1.33 MB of L1 per "
              "core, 1.06 MB of it weights; width-sharded, 0.23 MB"),
}
CALIBRATION = ("astronaut", "coffee", "rocket")  # as benchmarks/accuracy.py
HELD_OUT = ("chelsea", "hubble_deep_field", "immunohistochemistry", "retina")


def held_out() -> torch.Tensor:
    from skimage import data

    return torch.cat([image_to_tensor(getattr(data, name)(), INPUT[2:], True) for name in HELD_OUT])


def randomize_grn(model: torch.nn.Module) -> None:
    """ConvNeXt-V2's global response norms start as the identity (zero gamma and beta), which would
    leave them unmeasured: draw them at random, as training leaves them nonzero."""
    from timm.layers.grn import GlobalResponseNorm

    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, GlobalResponseNorm):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def row(name: str) -> str:
    import timm

    start = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    recalibrate_batchnorm(model, sample_batch(INPUT[2:], names=CALIBRATION, crops=2))
    randomize_grn(model)
    inputs = held_out()
    recipe = ACCURATE
    if name in LAYOUTS:
        glob, shard, _ = LAYOUTS[name]
        recipe = recipe.override(glob, shard=shard, packer_l1_acc=True)
    converted = ttswap.convert(model, recipe, input_shape=INPUT, backend="emulated", cache=False)
    report = converted.report
    fallbacks = [r for r in report.records if r.replacement == "torch"]
    with torch.no_grad():
        want = model(inputs)
        with torch.autocast("cpu", torch.bfloat16):
            floor = model(inputs).float()
    converted.transfer_counter.reset()
    got = torch.cat([converted(inputs[i:i + 1]) for i in range(len(inputs))])
    uploads, downloads = (n / len(inputs) for n in (converted.transfer_counter.uploads,
                                                    converted.transfer_counter.downloads))
    ours, bf16 = pcc(got, want), pcc(floor, want)
    kinds = sorted({r.op.split()[0] for r in fallbacks})
    return (f"| {name} | {MODELS.get(name, '')} | {report.swapped_fraction:.0%} | {len(fallbacks)}"
            f"{' (' + ', '.join(kinds) + ')' if kinds else ''} | {uploads:g} + {downloads:g} | {ours:.4f} | "
            f"{bf16:.4f} | {'yes' if ours >= min(0.99, bf16) else 'no'} | {time.perf_counter() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    print(f"recipe {ACCURATE.name!r} ({ACCURATE.description}), input {list(INPUT)}, emulated backend\n")
    print("| model | family | nodes on device | fallbacks | uploads + downloads | PCC (held-out) | torch bf16 PCC | "
          "meets | wall s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        try:
            print(row(name), flush=True)
        except Exception as error:  # noqa: BLE001 - a table row per model, failures included
            print(f"| {name} | {MODELS.get(name, '')} | failed: {type(error).__name__}: {str(error)[:200]} |",
                  flush=True)
    for name in args.models:
        if name in LAYOUTS:
            glob, shard, why = LAYOUTS[name]
            print(f"\n{name}: shard={shard!r}, packer_l1_acc=true on {glob} ({why})")


if __name__ == "__main__":
    main()
