"""Decode, NMS, matching, letterbox and drawing, against plain-Python references and hand-computed boxes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ttswap.coco import COCO_CLASSES
from ttswap.detection import (
    YOLOV4_ANCHORS,
    decode,
    draw_detections,
    letterbox,
    match_detections,
    postprocess,
)

ROOT = Path(__file__).resolve().parents[1]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def reference_decode(maps, num_classes, anchors, strides, scale_xy):
    """Darknet's [yolo] decoding written out element by element: per image a list of (box, scores)."""
    per_image = []
    for n in range(maps[0].shape[0]):
        out = []
        for head, (pred, stride, sxy) in enumerate(zip(maps, strides, scale_xy)):
            p = pred[n].double().tolist()
            h, w = pred.shape[2], pred.shape[3]
            for a in range(3):
                aw, ah = anchors[3 * head + a]
                base = a * (5 + num_classes)
                for y in range(h):
                    for x in range(w):
                        v = [p[base + k][y][x] for k in range(5 + num_classes)]
                        cx = (x + _sigmoid(v[0]) * sxy - (sxy - 1) / 2) * stride
                        cy = (y + _sigmoid(v[1]) * sxy - (sxy - 1) / 2) * stride
                        bw, bh = math.exp(v[2]) * aw, math.exp(v[3]) * ah
                        obj = _sigmoid(v[4])
                        scores = [obj * _sigmoid(c) for c in v[5:]]
                        out.append(((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), scores))
        per_image.append(out)
    return per_image


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_postprocess(decoded, conf, iou, width, height):
    """Best class per box, threshold, clip, then greedy NMS separately within each class."""
    candidates = []
    for box, scores in decoded:
        best = max(range(len(scores)), key=lambda c: scores[c])
        if scores[best] > conf:
            x1, y1, x2, y2 = box
            clipped = (min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height))
            candidates.append((clipped, scores[best], best))
    candidates.sort(key=lambda c: -c[1])
    kept = []
    for cand in candidates:
        if all(k[2] != cand[2] or _iou(k[0], cand[0]) <= iou for k in kept):
            kept.append(cand)
    return kept, len(candidates)


def random_maps(num_classes=3, size=(64, 96), batch=2, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3 * (5 + num_classes), size[0] // s, size[1] // s, generator=g) * spread for s in (8, 16, 32)
    ]


def test_decode_matches_elementwise_reference():
    maps = random_maps()
    boxes, scores = decode(maps, num_classes=3)
    assert boxes.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 4) and scores.shape == boxes.shape[:2] + (3,)
    for n, ref in enumerate(reference_decode(maps, 3, YOLOV4_ANCHORS, (8, 16, 32), (1.2, 1.1, 1.05))):
        ref_boxes = torch.tensor([b for b, _ in ref], dtype=torch.float64)
        ref_scores = torch.tensor([s for _, s in ref], dtype=torch.float64)
        torch.testing.assert_close(boxes[n].double(), ref_boxes, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(scores[n].double(), ref_scores, rtol=1e-5, atol=1e-6)


def test_decode_hand_computed_box():
    maps = [torch.full((1, 3 * 6, 64 // s, 64 // s), -20.0) for s in (8, 16, 32)]
    # stride 8, anchor 1 (19 x 36), cell row 2 column 3: tx = ty = 0 puts the centre mid-cell because
    # sigmoid(0) * 1.2 - 0.1 = 0.5; tw = log 2 doubles the anchor width
    channel = 1 * 6
    maps[0][0, channel + 0, 2, 3] = 0.0
    maps[0][0, channel + 1, 2, 3] = 0.0
    maps[0][0, channel + 2, 2, 3] = math.log(2.0)
    maps[0][0, channel + 3, 2, 3] = 0.0
    maps[0][0, channel + 4, 2, 3] = 20.0
    maps[0][0, channel + 5, 2, 3] = 20.0
    boxes, scores = decode(maps, num_classes=1)
    index = 1 * 8 * 8 + 2 * 8 + 3  # anchor-major, then row, then column
    torch.testing.assert_close(boxes[0, index], torch.tensor([28.0 - 19.0, 20.0 - 18.0, 28.0 + 19.0, 20.0 + 18.0]))
    assert scores[0, index, 0] > 0.999
    assert scores[0].max() == scores[0, index, 0] and (scores[0] > 1e-6).sum() == 1


def test_decode_scale_xy_reaches_beyond_the_cell():
    maps = [torch.full((1, 18, 32 // s, 32 // s), 0.0) for s in (8, 16, 32)]
    maps[0][0, 0, 0, 0] = 30.0  # sigmoid -> 1: centre x = (1 * 1.2 - 0.1) * 8 = 8.8, past the cell edge at 8
    boxes, _ = decode(maps, num_classes=1)
    centre_x = (boxes[0, 0, 0] + boxes[0, 0, 2]) / 2
    assert centre_x.item() == pytest.approx(8.8, abs=1e-5)
    boxes, _ = decode(maps, num_classes=1, scale_xy=(1.0, 1.0, 1.0))
    assert ((boxes[0, 0, 0] + boxes[0, 0, 2]) / 2).item() == pytest.approx(8.0, abs=1e-5)


def test_decode_rejects_inconsistent_maps():
    maps = random_maps()
    with pytest.raises(ValueError, match="head 0: 24 channels, expected 3 anchors x \\(5 \\+ 80 classes\\)"):
        decode(maps)
    with pytest.raises(ValueError, match="head 2: a 1x3 map at stride 32 does not cover input \\(64, 96\\)"):
        decode(maps[:2] + [maps[2][:, :, :1]], num_classes=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_postprocess_matches_reference_nms(seed):
    maps = random_maps(seed=seed, spread=1.5)
    results = postprocess(maps, conf_threshold=0.3, iou_threshold=0.45, num_classes=3)
    for n, decoded in enumerate(reference_decode(maps, 3, YOLOV4_ANCHORS, (8, 16, 32), (1.2, 1.1, 1.05))):
        expected, candidates = reference_postprocess(decoded, 0.3, 0.45, width=96, height=64)
        assert 0 < len(expected) < candidates  # NMS had something to suppress
        got = results[n]
        assert got.shape == (len(expected), 6)
        assert got[:, 5].tolist() == [float(c) for _, _, c in expected]
        torch.testing.assert_close(got[:, 4].double(), torch.tensor([s for _, s, _ in expected]).double())
        torch.testing.assert_close(
            got[:, :4].double(), torch.tensor([b for b, _, _ in expected]).double(), rtol=1e-5, atol=1e-3
        )


def _one_box_maps(cells, num_classes=2):
    """Stride-8 maps (64 x 64 input) with anchor 2 (40 x 28) firing at ``cells``: (row, col, class, logit)."""
    maps = [torch.full((1, 3 * (5 + num_classes), 64 // s, 64 // s), -30.0) for s in (8, 16, 32)]
    base = 2 * (5 + num_classes)
    for row, col, cls, logit in cells:
        maps[0][0, base : base + 4, row, col] = 0.0
        maps[0][0, base + 4, row, col] = 30.0
        maps[0][0, base + 5 + cls, row, col] = logit
    return maps


def test_nms_is_class_aware_hand_made():
    # cells (2, 3) and (2, 4): 40 x 28 boxes centred at x = 28 and 36, IoU = 32 / 48 = 0.67
    same_class = postprocess(_one_box_maps([(2, 3, 0, 2.0), (2, 4, 0, 1.0)]), num_classes=2)[0]
    assert same_class.tolist() == [[8.0, 6.0, 48.0, 34.0, pytest.approx(_sigmoid(2.0)), 0.0]]
    other_class = postprocess(_one_box_maps([(2, 3, 0, 2.0), (2, 4, 1, 1.0)]), num_classes=2)[0]
    assert other_class[:, 5].tolist() == [0.0, 1.0]
    assert other_class[1, :4].tolist() == [16.0, 6.0, 56.0, 34.0]
    # the same pair with the NMS threshold above their IoU: both survive
    loose = postprocess(_one_box_maps([(2, 3, 0, 2.0), (2, 4, 0, 1.0)]), iou_threshold=0.7, num_classes=2)[0]
    assert len(loose) == 2


def test_postprocess_clips_to_input_and_caps_count():
    maps = _one_box_maps([(0, 0, 0, 5.0)])
    maps[0][0, 2 * 7 + 2, 0, 0] = math.log(4.0)  # 160 px wide box centred at x = 4
    (dets,) = postprocess(maps, num_classes=2)
    assert dets[0, :4].tolist() == [0.0, 0.0, 64.0, 18.0]  # unclipped: -76, -10, 84, 18
    many = postprocess(random_maps(seed=3), conf_threshold=0.05, num_classes=3, max_detections=7)
    assert all(len(d) == 7 for d in many)


def _dets(rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def test_match_detections():
    a = _dets([[10, 10, 50, 50, 0.9, 1], [60, 60, 100, 120, 0.8, 2]])
    near = _dets([[61, 60, 100, 121, 0.5, 2], [10, 10, 50, 51, 0.7, 1]])  # reordered, IoU > 0.95
    result = match_detections(a, near)
    assert result and sorted(m[:2] for m in result.matched) == [(0, 1), (1, 0)]
    relabelled = near.clone()
    relabelled[1, 5] = 3
    result = match_detections(a, relabelled)
    assert not result and result.unmatched_a == [0] and result.unmatched_b == [1]
    shifted = near.clone()
    shifted[0, :4] += torch.tensor([8.0, 0, 8.0, 0])  # IoU 32 / 48 with its partner
    assert not match_detections(a, shifted)
    assert match_detections(a, shifted, iou=0.6)
    assert not match_detections(a, a[:1])
    assert match_detections(_dets([]), _dets([]))


def test_letterbox_places_and_maps_back():
    image = np.zeros((200, 300, 3), dtype=np.uint8)
    image[50:150, 120:240] = 255
    x, placement = letterbox(image, 96)
    assert x.shape == (1, 3, 96, 96)
    assert (placement.pad_x, placement.pad_y) == (0, 16)  # 300 -> 96 wide, 200 -> 64 tall, centred
    assert torch.all(x[:, :, :16] == 0.5) and torch.all(x[:, :, 80:] == 0.5)
    bright = torch.nonzero(x[0, 0] > 0.5)
    (y1, x1), (y2, x2) = bright.min(0).values.tolist(), (bright.max(0).values + 1).tolist()
    back = placement.boxes_to_image(torch.tensor([[x1, y1, x2, y2, 0.9, 0.0]]))[0]
    assert back[:4].tolist() == pytest.approx([120, 50, 240, 150], abs=300 / 96 + 0.5)
    assert back[4:].tolist() == pytest.approx([0.9, 0.0])
    with pytest.raises(ValueError, match="uint8"):
        letterbox(image.astype(np.float32), 96)


def test_draw_detections_marks_the_box_only():
    image = np.full((120, 160, 3), 40, dtype=np.uint8)
    drawn = np.asarray(draw_detections(image, _dets([[30, 40, 110, 100, 0.87, 16]]), COCO_CLASSES))
    assert drawn.shape == image.shape
    changed = np.any(drawn != image, axis=2)
    assert changed[70, 30] and changed[100, 70]  # left edge and bottom edge of the box
    assert not changed[70, 70] and not changed[5, 150]  # inside the box, far outside it
    assert changed[30:40, 31:60].any()  # the "dog 0.87" label sits above the box


def test_example_detect_is_postprocess_in_image_pixels():
    spec = importlib.util.spec_from_file_location("detect_yolov4", ROOT / "examples" / "detect_yolov4.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    maps = random_maps(num_classes=80, size=(64, 64), batch=1, seed=4, spread=3.0)
    seen = []

    def fake_model(x):
        seen.append(x)
        return maps

    dets = example.detect(fake_model, image, 64)
    x, placement = letterbox(image, 64)
    assert torch.equal(seen[0], x)
    expected = placement.boxes_to_image(postprocess(maps)[0])
    assert len(dets) > 0 and torch.equal(dets, expected)
    assert dets[:, 2].max() <= 80 and dets[:, 3].max() <= 48
    assert example.class_names(80) is COCO_CLASSES and example.class_names(2) == ["class 0", "class 1"]
