"""The main job (`make demo`): convert ESE-VoVNet and YOLOv4, run them on sample images, print the
conversion reports, and write the YOLOv4 detections as a PNG.

    python -m ttswap.demo [--backend auto|emulated|ttnn] [--out out/]

There are no trained weights offline, so both networks get realistic random weights: timm/torch
init with BatchNorm statistics recalibrated on scikit-image's sample images. Classes and boxes are
therefore meaningless; what the demo shows is the converted model agreeing with torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import timm
import torch

import ttswap
from ttswap.calibration import SAMPLE_IMAGES, recalibrate_batchnorm, sample_batch, sample_image
from ttswap.coco import COCO_CLASSES
from ttswap.detection import draw_detections, letterbox, match_detections, postprocess
from ttswap.metrics import pcc, top1_agreement
from ttswap.models.yolov4 import YOLOv4


def classify(backend: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("ese_vovnet19b_dw", pretrained=False).eval()
    recalibrate_batchnorm(model, sample_batch((224, 224), crops=2))
    converted = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 224, 224), backend=backend)
    print(converted.report.table(), "\n")
    images = sample_batch((224, 224))
    out = torch.cat([converted(images[i:i + 1]) for i in range(len(images))])
    with torch.no_grad():
        ref = model(images)
    for name, a, b in zip(SAMPLE_IMAGES, out, ref):
        print(f"  {name:10s} class {int(a.argmax()):4d} (torch {int(b.argmax()):4d})  logits PCC {pcc(a, b):.4f}")
    print(f"ese_vovnet19b_dw: logits PCC {pcc(out, ref):.4f}, top-1 agreement {top1_agreement(out, ref):.0%}\n")


def detect(backend: str, out_dir: Path, size: int = 320) -> None:
    torch.manual_seed(0)
    model = YOLOv4().eval()
    recalibrate_batchnorm(model, sample_batch((size, size), normalize=False, crops=2))
    converted = ttswap.convert(model, "yolov4", input_shape=(1, 3, size, size), backend=backend)
    image = sample_image("astronaut")
    x, placement = letterbox(image, size)
    maps = converted(x)
    with torch.no_grad():
        ref = model(x)
    print("YOLOv4 head PCC vs torch fp32: " + ", ".join(f"stride {s} {pcc(a, b):.4f}" for s, a, b in zip((8, 16, 32), maps, ref)))
    ours = placement.boxes_to_image(postprocess(maps)[0])
    theirs = placement.boxes_to_image(postprocess(ref)[0])
    same = match_detections(ours, theirs)
    print(f"detections: {len(ours)} converted, {len(theirs)} torch; same set (class + IoU >= 0.9): {bool(same)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "detections.png"
    draw_detections(image, ours, COCO_CLASSES).save(path)
    print(f"wrote {path} (random weights: the boxes are noise, drawn to show the pipeline end to end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=("auto", "emulated", "ttnn"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    classify(args.backend)
    detect(args.backend, args.out)


if __name__ == "__main__":
    main()
