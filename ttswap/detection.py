"""YOLOv4 detection pipeline around the raw head maps: letterbox, decode, NMS, compare, draw.

Decoding follows Darknet's ``[yolo]`` layer, which pytorch-YOLOv4 reproduces, including the
"grid sensitivity" factor ``scale_x_y`` (1.2, 1.1, 1.05 for stride 8, 16, 32 in ``yolov4.cfg``):

    cx = (sigmoid(tx) * scale_x_y - (scale_x_y - 1) / 2 + grid_x) * stride
    w  = exp(tw) * anchor_w                       (anchors in input pixels)
    score[c] = sigmoid(objectness) * sigmoid(class_c)

The published weights were trained with that factor, so leaving it out shifts every box centre.
Each head map's channels are 3 anchors x (x, y, w, h, objectness, classes...), anchor-major.
Each box keeps only its best class (pytorch-YOLOv4's convention; Darknet itself may report a box once
per class above the threshold).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import batched_nms, box_iou

# COCO anchors (width, height) in input pixels; anchors 0-2 go with stride 8, 3-5 with 16, 6-8 with 32
YOLOV4_ANCHORS: tuple[tuple[int, int], ...] = (
    (12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110), (192, 243), (459, 401),
)  # fmt: skip
YOLOV4_STRIDES: tuple[int, ...] = (8, 16, 32)
YOLOV4_SCALE_XY: tuple[float, ...] = (1.2, 1.1, 1.05)


def _input_size(
    head_maps: Sequence[torch.Tensor], strides: Sequence[int], input_size: tuple[int, int] | None
) -> tuple[int, int]:
    if input_size is not None:
        return (int(input_size[0]), int(input_size[1]))
    return (head_maps[0].shape[2] * strides[0], head_maps[0].shape[3] * strides[0])


def decode(
    head_maps: Sequence[torch.Tensor],
    num_classes: int = 80,
    anchors: Sequence[tuple[float, float]] = YOLOV4_ANCHORS,
    strides: Sequence[int] = YOLOV4_STRIDES,
    input_size: tuple[int, int] | None = None,
    scale_xy: Sequence[float] = YOLOV4_SCALE_XY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head maps -> ``boxes (N, M, 4)`` as x1, y1, x2, y2 in input pixels and ``scores (N, M, C)``.

    M runs over heads, then anchors, then grid rows, then columns. ``input_size`` (H, W) defaults to
    the first map's size times its stride; every map must agree with it.
    """
    if not len(head_maps) == len(strides) == len(scale_xy) or len(anchors) % len(head_maps):
        raise ValueError(
            f"{len(head_maps)} head maps need as many strides ({len(strides)}) and scale_xy ({len(scale_xy)}) "
            f"values and a multiple of that many anchors ({len(anchors)})"
        )
    input_size = _input_size(head_maps, strides, input_size)
    per_head = len(anchors) // len(head_maps)
    all_boxes, all_scores = [], []
    for i, (pred, stride, sxy) in enumerate(zip(head_maps, strides, scale_xy)):
        n, channels, h, w = pred.shape
        if channels != per_head * (5 + num_classes):
            raise ValueError(
                f"head {i}: {channels} channels, expected {per_head} anchors x (5 + {num_classes} classes)"
            )
        if (h * stride, w * stride) != tuple(input_size):
            raise ValueError(f"head {i}: a {h}x{w} map at stride {stride} does not cover input {input_size}")
        pred = pred.float().reshape(n, per_head, 5 + num_classes, h, w).permute(0, 1, 3, 4, 2)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, device=pred.device), torch.arange(w, device=pred.device), indexing="ij"
        )
        anchor_wh = torch.tensor(anchors[i * per_head : (i + 1) * per_head], dtype=torch.float32, device=pred.device)
        anchor_wh = anchor_wh.view(1, per_head, 1, 1, 2)

        offset = torch.sigmoid(pred[..., 0:2]) * sxy - (sxy - 1) / 2
        centre = (offset + torch.stack([grid_x, grid_y], dim=-1)) * stride
        size = torch.exp(pred[..., 2:4]) * anchor_wh
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
        scores = torch.sigmoid(pred[..., 4:5]) * torch.sigmoid(pred[..., 5:])
        all_boxes.append(boxes.reshape(n, -1, 4))
        all_scores.append(scores.reshape(n, -1, num_classes))
    return torch.cat(all_boxes, dim=1), torch.cat(all_scores, dim=1)


def postprocess(
    head_maps: Sequence[torch.Tensor],
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    num_classes: int = 80,
    anchors: Sequence[tuple[float, float]] = YOLOV4_ANCHORS,
    strides: Sequence[int] = YOLOV4_STRIDES,
    input_size: tuple[int, int] | None = None,
    scale_xy: Sequence[float] = YOLOV4_SCALE_XY,
    max_detections: int = 300,
) -> list[torch.Tensor]:
    """Decode, keep boxes whose best class score exceeds ``conf_threshold``, clip them to the input, and
    run class-aware NMS (a box is dropped when it overlaps a better one of its class by IoU >
    ``iou_threshold``). Per image a ``(K, 6)`` tensor of x1, y1, x2, y2, score, class, best first."""
    height, width = _input_size(head_maps, strides, input_size)
    boxes, scores = decode(head_maps, num_classes, anchors, strides, (height, width), scale_xy)
    results = []
    for image_boxes, image_scores in zip(boxes, scores):
        best, label = image_scores.max(dim=1)
        keep = best > conf_threshold
        kept_boxes = image_boxes[keep]
        kept_boxes[:, 0::2] = kept_boxes[:, 0::2].clamp(0, width)
        kept_boxes[:, 1::2] = kept_boxes[:, 1::2].clamp(0, height)
        best, label = best[keep], label[keep]
        order = batched_nms(kept_boxes, best, label, iou_threshold)[:max_detections]
        results.append(torch.cat([kept_boxes[order], best[order, None], label[order, None].float()], dim=1))
    return results


@dataclass
class DetectionMatch:
    """How two detection sets pair up; truthy when every detection on both sides found a partner."""

    matched: list[tuple[int, int, float]] = field(default_factory=list)  # (index in a, index in b, IoU)
    unmatched_a: list[int] = field(default_factory=list)
    unmatched_b: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.unmatched_a and not self.unmatched_b

    def __str__(self) -> str:
        worst = min((m[2] for m in self.matched), default=float("nan"))
        return (
            f"{len(self.matched)} matched (lowest IoU {worst:.3f}), {len(self.unmatched_a)} only in a "
            f"{self.unmatched_a}, {len(self.unmatched_b)} only in b {self.unmatched_b}"
        )


def match_detections(a: torch.Tensor, b: torch.Tensor, iou: float = 0.9) -> DetectionMatch:
    """Pair detections ``(K, 6)`` of the same class whose boxes overlap by at least ``iou``, greedily by
    highest IoU first. Scores are not compared: a converted model's scores move with its numerics."""
    result = DetectionMatch()
    for cls in torch.cat([a[:, 5], b[:, 5]]).unique():
        ia = torch.nonzero(a[:, 5] == cls).flatten()
        ib = torch.nonzero(b[:, 5] == cls).flatten()
        overlaps = box_iou(a[ia, :4].double(), b[ib, :4].double())
        free_a, free_b = set(range(len(ia))), set(range(len(ib)))
        for flat in torch.argsort(overlaps.flatten(), descending=True, stable=True).tolist():
            r, c = divmod(flat, len(ib))
            if overlaps[r, c] < iou:
                break
            if r in free_a and c in free_b:
                result.matched.append((int(ia[r]), int(ib[c]), float(overlaps[r, c])))
                free_a.discard(r)
                free_b.discard(c)
        result.unmatched_a += [int(ia[r]) for r in sorted(free_a)]
        result.unmatched_b += [int(ib[c]) for c in sorted(free_b)]
    result.unmatched_a.sort()
    result.unmatched_b.sort()
    return result


@dataclass(frozen=True)
class Letterbox:
    """Where a letterboxed image sits inside the network input, to map boxes back to the image."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    image_height: int
    image_width: int

    def boxes_to_image(self, detections: torch.Tensor) -> torch.Tensor:
        """Map ``(K, 4+)`` input-pixel boxes onto the original image (other columns pass through)."""
        out = detections.clone().float()
        out[:, 0:4:2] = ((out[:, 0:4:2] - self.pad_x) / self.scale_x).clamp(0, self.image_width)
        out[:, 1:4:2] = ((out[:, 1:4:2] - self.pad_y) / self.scale_y).clamp(0, self.image_height)
        return out


def letterbox(image: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> tuple[torch.Tensor, Letterbox]:
    """Fit an ``H x W x 3`` uint8 RGB image into a ``size`` square (or (H, W)) network input without
    distortion, padding with 0.5 grey as Darknet does. Returns ``(1, 3, H, W)`` floats in [0, 1]."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    pixels = torch.as_tensor(np.asarray(image))
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {tuple(pixels.shape)} {pixels.dtype}")
    h, w = pixels.shape[:2]
    scale = min(out_h / h, out_w / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    x = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    pad_y, pad_x = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas = torch.full((1, 3, out_h, out_w), 0.5)
    canvas[:, :, pad_y : pad_y + new_h, pad_x : pad_x + new_w] = x
    return canvas, Letterbox(new_w / w, new_h / h, pad_x, pad_y, h, w)


def _class_colour(index: int) -> tuple[int, int, int]:
    # golden-ratio hue steps keep neighbouring class ids far apart in colour
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray | torch.Tensor, detections: torch.Tensor, class_names: Sequence[str]
) -> Image.Image:
    """Draw ``(K, 6)`` detections in image pixels onto an ``H x W x 3`` uint8 image, labelled
    ``name score``."""
    canvas = Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, canvas.height // 40))
    line = max(1, canvas.height // 250)
    for x1, y1, x2, y2, score, cls in detections.tolist():
        colour = _class_colour(int(cls))
        name = class_names[int(cls)] if 0 <= int(cls) < len(class_names) else f"class {int(cls)}"
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        text_top = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle((x1, text_top, x1 + right - left + 4, text_top + bottom - top + 2), fill=colour)
        draw.text((x1 + 2, text_top - (top - y1)), label, fill=(0, 0, 0), font=font)
    return canvas
