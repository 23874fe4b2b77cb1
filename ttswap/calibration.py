"""Realistic weights without downloads: recalibrate BatchNorm running statistics on real images.

Random init leaves running_mean=0 and running_var=1, which makes every BatchNorm a near no-op and
activations drift in scale through the network. Real checkpoints have per-channel statistics that
fold into widely varying conv scales, which is what stresses bfloat8_b weights. Running a few
real images through the network in train mode reproduces that.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


def sample_image(name: str) -> np.ndarray:
    """An HxWx3 uint8 image shipped with scikit-image (no download)."""
    from skimage import data

    if name not in SAMPLE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose from {', '.join(SAMPLE_IMAGES)}")
    return getattr(data, name)()


def image_to_tensor(image: np.ndarray, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """uint8 HxWx3 -> float 1x3xHxW resized to ``size`` (bilinear), ImageNet-normalised if asked."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if normalize:
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x


def sample_batch(size: tuple[int, int], names=SAMPLE_IMAGES, normalize: bool = True, crops: int = 1) -> torch.Tensor:
    """The sample images as one batch; ``crops`` > 1 adds shifted crops for more calibration data."""
    images = []
    for name in names:
        image = sample_image(name)
        h, w = image.shape[:2]
        for i in range(crops):
            dy, dx = (i * h) // (4 * crops), (i * w) // (4 * crops)
            images.append(image_to_tensor(image[dy:h - dy, dx:w - dx], size, normalize))
    return torch.cat(images)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor | Sequence[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact average over ``images`` (one batch or a
    list of batches), in place. Only the norms switch to train mode, so dropout stays off.
    Returns the model in eval mode."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, so the result does not depend on batch order
        m.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return model


@torch.no_grad()
def make_batchnorm_ill_conditioned(model: nn.Module, every: int = 16, var: float = 1e-7, gamma_scale: float = 0.1) -> nn.Module:
    """Give one channel in ``every`` of each BatchNorm a near-zero running variance, as trained nets
    have for channels that barely vary (in place). With ``gamma_scale`` the channel's output stays
    moderate, but its folded conv weights become ~``gamma_scale / sqrt(eps)`` times larger than its
    neighbours', so a shared bfloat8_b exponent leaves those neighbours few mantissa bits."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_var[::every] = var
            if m.weight is not None:
                m.weight[::every] *= gamma_scale
    return model
