"""Classify a sample image with a converted ESE-VoVNet.

    python examples/classify_vovnet.py [--model ese_vovnet19b_dw] [--weights FILE | --pretrained] [--image coffee]
                                       [--backend auto|emulated|ttnn]

With --weights (a local .safetensors or .pth state dict for the timm model, read without unpickling)
or --pretrained (timm's download) the labels mean something. Without, the model has random weights with BatchNorm recalibrated on the sample images:
the pipeline runs and the converted model is compared with torch, but the classes are arbitrary.
"""

from __future__ import annotations

import argparse
import logging

import timm
import torch

import ttswap
from ttswap.calibration import SAMPLE_IMAGES, image_to_tensor, recalibrate_batchnorm, sample_batch, sample_image
from ttswap.metrics import pcc
from ttswap.weights import load_state_dict_strict, read_state_dict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ese_vovnet19b_dw")
    parser.add_argument("--weights", help="local state dict (.safetensors or .pth) for the timm model")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads them)")
    parser.add_argument("--image", default="coffee", choices=SAMPLE_IMAGES)
    parser.add_argument("--backend", default="auto", choices=("auto", "emulated", "ttnn"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    if args.pretrained:
        print(f"using timm's pretrained {args.model}")
    elif args.weights:
        load_state_dict_strict(model, read_state_dict(args.weights))
        print(f"loaded weights from {args.weights}")
    else:
        print("NOTE: no --weights given: using random weights with BatchNorm recalibrated on sample images; "
              "the predicted classes are meaningless")
        recalibrate_batchnorm(model, sample_batch((224, 224), crops=2))

    converted = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 224, 224), backend=args.backend)
    print(converted.report.summary())
    x = image_to_tensor(sample_image(args.image), (224, 224))
    with torch.no_grad():
        ref = model(x)
    out = converted(x)
    info = timm.data.ImageNetInfo()
    for name, logits in (("torch fp32", ref), (f"ttswap/{converted.backend.name}", out)):
        probs = logits.softmax(-1)[0]
        top = probs.topk(3)
        labels = ", ".join(f"{info.index_to_description(int(i))} ({float(p):.1%})" for p, i in zip(top.values, top.indices))
        print(f"{name:>18}: {labels}")
    print(f"logits PCC vs torch fp32: {pcc(out, ref):.5f}")


if __name__ == "__main__":
    main()
