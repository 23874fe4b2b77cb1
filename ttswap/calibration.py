"""Realistic weights and varied inputs without downloads: recalibrate BatchNorm running statistics on
real images, and build calibration batches (photo crops at several scales, synthetic natural-spectrum
images, photometric augmentations) for tuning and measuring.

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
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # colour photos
TEXTURES = ("grass", "gravel", "brick")  # grey natural textures
# Other images scikit-image ships, kept apart from the two sets above: benchmarks calibrate BatchNorm
# and measure on these, so that neither shares a source with what the auto recipe tunes on.
OTHER_IMAGES = ("stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins",
                "clock", "moon", "colorwheel")
ALL_IMAGES = SAMPLE_IMAGES + TEXTURES + OTHER_IMAGES


def sample_image(name: str) -> np.ndarray:
    """An HxWx3 uint8 image shipped with scikit-image (no download); grey ones repeated over RGB."""
    from skimage import data

    if name not in ALL_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose from {', '.join(ALL_IMAGES)}")
    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def image_to_tensor(image: np.ndarray, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """uint8 HxWx3 -> float 1x3xHxW resized to ``size`` (bilinear), ImageNet-normalised if asked."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return _normalize(x) if normalize else x


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


def natural_spectrum_images(count: int, size: tuple[int, int], generator: torch.Generator,
                            alpha: tuple[float, float] = (0.8, 1.6), normalize: bool = True) -> torch.Tensor:
    """``count`` synthetic images whose power falls as 1/f^(2 alpha), as natural images' does (alpha
    near 1): random phases, channels that share most of their structure (as colour channels do), each
    stretched to [0, 1] between its 1st and 99th percentile, then ImageNet-normalised if asked."""
    h, w = size
    fy = torch.fft.fftfreq(h).view(h, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    radius = (fy * fy + fx * fx).sqrt().clamp_min(1.0 / max(h, w))
    images = []
    for _ in range(count):
        a = float(alpha[0] + (alpha[1] - alpha[0]) * torch.rand((), generator=generator))
        spectrum = torch.randn(4, h, w // 2 + 1, 2, generator=generator)
        fields = torch.fft.irfft2(torch.view_as_complex(spectrum) / radius**a, s=(h, w))
        mix = torch.rand(3, generator=generator) * 0.5  # per-channel share of its own field
        x = (1 - mix).view(3, 1, 1) * fields[0] + mix.view(3, 1, 1) * fields[1:]
        low, high = torch.quantile(x.flatten(1), torch.tensor([0.01, 0.99]), dim=1)
        x = ((x - low.view(3, 1, 1)) / (high - low).view(3, 1, 1)).clamp(0, 1)
        images.append(x[None])
    x = torch.cat(images)
    return _normalize(x) if normalize else x


def photo_crops(names: Sequence[str], size: tuple[int, int], count: int, generator: torch.Generator,
                scale: tuple[float, float] = (0.2, 1.0), normalize: bool = True) -> torch.Tensor:
    """``count`` random crops of the named images (cycling through them), covering ``scale`` of each
    image's area, resized to ``size`` and flipped left-right half of the time."""
    images = []
    for i in range(count):
        image = sample_image(names[i % len(names)])
        h, w = image.shape[:2]
        area = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
        ch, cw = max(8, int(h * area**0.5)), max(8, int(w * area**0.5))
        y = int(torch.randint(0, h - ch + 1, (), generator=generator))
        x = int(torch.randint(0, w - cw + 1, (), generator=generator))
        crop = image[y:y + ch, x:x + cw]
        if torch.rand((), generator=generator) < 0.5:
            crop = crop[:, ::-1]
        images.append(image_to_tensor(crop, size, normalize=False))
    x = torch.cat(images)
    return _normalize(x) if normalize else x


def augment(x: torch.Tensor, generator: torch.Generator, normalized: bool = True) -> torch.Tensor:
    """Photometric jitter of a batch: per image contrast x0.6-1.4, brightness +-0.15 and Gaussian noise
    of 0-0.05, on [0, 1] pixel values (``normalized``: ImageNet-normalised in and out)."""
    x = _denormalize(x) if normalized else x
    n = x.shape[0]
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.3 * torch.rand(n, 1, 1, 1, generator=generator) - 0.15
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness + noise).clamp(0, 1)
    return _normalize(x) if normalized else x


def varied_batch(size: tuple[int, int], count: int, seed: int = 0, photos: Sequence[str] = SAMPLE_IMAGES + TEXTURES,
                 normalize: bool = True) -> torch.Tensor:
    """A varied calibration batch of ``count`` images: half random crops of ``photos`` at several
    scales, a quarter synthetic natural-spectrum (1/f) images, a quarter augmented copies of crops
    (contrast, brightness, noise). The same ``seed`` gives the same batch."""
    generator = torch.Generator().manual_seed(seed)
    synthetic = count // 4
    augmented = count // 4
    crops = count - synthetic - augmented
    parts = [photo_crops(photos, size, crops, generator, normalize=False)]
    if synthetic:
        parts.append(natural_spectrum_images(synthetic, size, generator, normalize=False))
    if augmented:
        parts.append(augment(photo_crops(photos[::-1], size, augmented, generator, normalize=False), generator,
                             normalized=False))
    x = torch.cat(parts)
    return _normalize(x) if normalize else x


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


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
def make_batchnorm_ill_conditioned(model: nn.Module, every: int = 16, var: float = 1e-7,
                                   gamma_scale: float = 0.1) -> nn.Module:
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
