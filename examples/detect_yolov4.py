"""Detect objects in an image with YOLOv4 converted by ttswap, and draw them.

    python examples/detect_yolov4.py [IMAGE] [--weights FILE] [--size 320|640]
                                     [--backend auto|emulated|ttnn] [--out detections.png]

IMAGE defaults to scikit-image's astronaut. --weights takes a pytorch-YOLOv4 ``.pth``, a
``.safetensors`` state dict or Darknet's ``yolov4.weights``; without it the network has random
weights, which run the whole pipeline but detect nothing meaningful.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import ttswap
from ttswap.coco import COCO_CLASSES
from ttswap.detection import draw_detections, letterbox, postprocess
from ttswap.calibration import recalibrate_batchnorm
from ttswap.models.yolov4 import YOLOv4
from ttswap.weights import load_yolov4

PRINT_AT_MOST = 25
RANDOM_WEIGHTS_WARNING = """
**********************************************************************************
*  NO --weights GIVEN: YOLOv4 HAS RANDOM WEIGHTS, BatchNorm statistics measured  *
*  on this image. The pipeline runs end to end, but the boxes and labels are     *
*  NOISE, not detections. Pass --weights yolov4.pth or yolov4.weights for real.  *
**********************************************************************************
"""

def load_image(path: str | None) -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB image: the file at ``path``, or scikit-image's astronaut."""
    if path is None:
        from skimage import data

        return data.astronaut()
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def build_model(weights: str | None, image: np.ndarray, size: int) -> YOLOv4:
    if weights:
        return load_yolov4(weights)
    print(RANDOM_WEIGHTS_WARNING)
    torch.manual_seed(0)
    model = YOLOv4().eval()
    recalibrate_batchnorm(model, [letterbox(image, size)[0]])
    return model


def detect(
    run_model: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    image: np.ndarray,
    size: int,
    num_classes: int = 80,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
) -> torch.Tensor:
    """Letterbox ``image``, run the network, decode and NMS; ``(K, 6)`` detections in image pixels."""
    x, placement = letterbox(image, size)
    with torch.no_grad():
        head_maps = run_model(x)
    detections = postprocess(head_maps, conf_threshold, iou_threshold, num_classes=num_classes)[0]
    return placement.boxes_to_image(detections)


def class_names(num_classes: int) -> Sequence[str]:
    return COCO_CLASSES if num_classes == len(COCO_CLASSES) else [f"class {i}" for i in range(num_classes)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", help="image file (default: scikit-image's astronaut)")
    parser.add_argument("--weights", help=".pth, .safetensors or Darknet .weights (default: random weights)")
    parser.add_argument("--size", type=int, choices=(320, 640), default=320, help="network input size")
    parser.add_argument("--backend", choices=("auto", "emulated", "ttnn"), default="auto")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold")
    parser.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--out", type=Path, default=Path("detections.png"))
    args = parser.parse_args(argv)

    image = load_image(args.image)
    model = build_model(args.weights, image, args.size)
    converted = ttswap.convert(model, "yolov4", input_shape=(1, 3, args.size, args.size), backend=args.backend)
    print(converted.report)

    detections = detect(converted, image, args.size, model.num_classes, args.conf, args.iou)
    names = class_names(model.num_classes)
    print(f"{len(detections)} detections (score > {args.conf}, NMS IoU {args.iou}):")
    for x1, y1, x2, y2, score, cls in detections[:PRINT_AT_MOST].tolist():
        print(f"  {names[int(cls)]:>14s} {score:.3f}  ({x1:6.1f}, {y1:6.1f}) - ({x2:6.1f}, {y2:6.1f})")
    if len(detections) > PRINT_AT_MOST:
        print(f"  ... and {len(detections) - PRINT_AT_MOST} more (all are drawn)")
    draw_detections(image, detections, names).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
