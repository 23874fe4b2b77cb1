"""YOLOv4 (CSPDarknet53 + SPP + PAN) in plain PyTorch, state-dict compatible with pytorch-YOLOv4.

Module names follow the public pytorch-YOLOv4 checkpoint (``down1.conv1.conv.0.weight``,
``down2.resblock.module_list.0.1.conv.1.running_var``, ``neck.conv4...``, ``head.conv2.conv.0.bias``) so its
``.pth`` loads by name. Convolutions are registered in Darknet's ``yolov4.cfg`` order: pytorch-YOLOv4 numbers
them that way, and ``ttswap.weights`` relies on it to read Darknet ``.weights`` files.

``forward`` returns the three raw head maps, stride 8, 16, 32, each ``(N, 3 * (5 + num_classes), H/s, W/s)``;
decoding and NMS live in ``ttswap.detection`` so the converted model and this one share them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("mish", "leaky", "linear")  # Darknet's names for the three used here


class ConvBnAct(nn.Module):
    """Conv2d -> BatchNorm2d -> activation, held in ``self.conv`` (a Sequential) for checkpoint keys.

    Without BatchNorm the conv carries a bias instead; that is only the three detection-head outputs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        activation: str = "mish",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=not batch_norm)
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        if activation == "mish":
            layers.append(nn.Mish())
        elif activation == "leaky":
            layers.append(nn.LeakyReLU(0.1))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResBlock(nn.Module):
    """``num_blocks`` residual units, each ``x + conv3x3(conv1x1(x))``, all at ``channels`` wide."""

    def __init__(self, channels: int, num_blocks: int) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(
            nn.ModuleList([ConvBnAct(channels, channels, 1), ConvBnAct(channels, channels, 3)])
            for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.module_list:
            h = x
            for conv in unit:
                h = conv(h)
            x = x + h
        return x


class DownSample1(nn.Module):
    """Stem plus the first CSP stage; unlike later stages its residual unit narrows to 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(3, 32, 3)
        self.conv2 = ConvBnAct(32, 64, 3, stride=2)
        self.conv3 = ConvBnAct(64, 64, 1)  # CSP bypass
        self.conv4 = ConvBnAct(64, 64, 1)
        self.conv5 = ConvBnAct(64, 32, 1)
        self.conv6 = ConvBnAct(32, 64, 3)
        self.conv7 = ConvBnAct(64, 64, 1)
        self.conv8 = ConvBnAct(128, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self.conv2(self.conv1(x))
        bypass = self.conv3(x2)
        x4 = self.conv4(x2)
        x6 = x4 + self.conv6(self.conv5(x4))
        x7 = self.conv7(x6)
        return self.conv8(torch.cat([x7, bypass], dim=1))


class CSPDownSample(nn.Module):
    """A CSP stage: stride-2 conv, then half the channels through residual units, half bypassing."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.conv1 = ConvBnAct(in_channels, out_channels, 3, stride=2)
        self.conv2 = ConvBnAct(out_channels, half, 1)  # CSP bypass
        self.conv3 = ConvBnAct(out_channels, half, 1)
        self.resblock = ResBlock(half, num_blocks)
        self.conv4 = ConvBnAct(half, half, 1)
        self.conv5 = ConvBnAct(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        bypass = self.conv2(x1)
        x4 = self.conv4(self.resblock(self.conv3(x1)))
        return self.conv5(torch.cat([x4, bypass], dim=1))


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Neck(nn.Module):
    """SPP on the stride-32 features, then the top-down PAN path to stride 16 and stride 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(1024, 512, 1, activation="leaky")
        self.conv2 = ConvBnAct(512, 1024, 3, activation="leaky")
        self.conv3 = ConvBnAct(1024, 512, 1, activation="leaky")
        self.maxpool1 = nn.MaxPool2d(5, stride=1, padding=2)
        self.maxpool2 = nn.MaxPool2d(9, stride=1, padding=4)
        self.maxpool3 = nn.MaxPool2d(13, stride=1, padding=6)
        self.conv4 = ConvBnAct(2048, 512, 1, activation="leaky")
        self.conv5 = ConvBnAct(512, 1024, 3, activation="leaky")
        self.conv6 = ConvBnAct(1024, 512, 1, activation="leaky")
        self.conv7 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv8 = ConvBnAct(512, 256, 1, activation="leaky")  # lateral from down4
        self.conv9 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv10 = ConvBnAct(256, 512, 3, activation="leaky")
        self.conv11 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv12 = ConvBnAct(256, 512, 3, activation="leaky")
        self.conv13 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv14 = ConvBnAct(256, 128, 1, activation="leaky")
        self.conv15 = ConvBnAct(256, 128, 1, activation="leaky")  # lateral from down3
        self.conv16 = ConvBnAct(256, 128, 1, activation="leaky")
        self.conv17 = ConvBnAct(128, 256, 3, activation="leaky")
        self.conv18 = ConvBnAct(256, 128, 1, activation="leaky")
        self.conv19 = ConvBnAct(128, 256, 3, activation="leaky")
        self.conv20 = ConvBnAct(256, 128, 1, activation="leaky")

    def forward(
        self, down5: torch.Tensor, down4: torch.Tensor, down3: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x3 = self.conv3(self.conv2(self.conv1(down5)))
        # Darknet's SPP route order: largest pool first, the unpooled map last
        spp = torch.cat([self.maxpool3(x3), self.maxpool2(x3), self.maxpool1(x3), x3], dim=1)
        x6 = self.conv6(self.conv5(self.conv4(spp)))
        up = _upsample2x(self.conv7(x6))
        x8 = torch.cat([self.conv8(down4), up], dim=1)
        x13 = self.conv13(self.conv12(self.conv11(self.conv10(self.conv9(x8)))))
        up = _upsample2x(self.conv14(x13))
        x15 = torch.cat([self.conv15(down3), up], dim=1)
        x20 = self.conv20(self.conv19(self.conv18(self.conv17(self.conv16(x15)))))
        return x20, x13, x6


class Head(nn.Module):
    """The bottom-up PAN path with one raw detection map per scale (stride 8, 16, 32)."""

    def __init__(self, num_classes: int = 80) -> None:
        super().__init__()
        out = 3 * (5 + num_classes)
        self.conv1 = ConvBnAct(128, 256, 3, activation="leaky")
        self.conv2 = ConvBnAct(256, out, 1, activation="linear", batch_norm=False)
        self.conv3 = ConvBnAct(128, 256, 3, stride=2, activation="leaky")
        self.conv4 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv5 = ConvBnAct(256, 512, 3, activation="leaky")
        self.conv6 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv7 = ConvBnAct(256, 512, 3, activation="leaky")
        self.conv8 = ConvBnAct(512, 256, 1, activation="leaky")
        self.conv9 = ConvBnAct(256, 512, 3, activation="leaky")
        self.conv10 = ConvBnAct(512, out, 1, activation="linear", batch_norm=False)
        self.conv11 = ConvBnAct(256, 512, 3, stride=2, activation="leaky")
        self.conv12 = ConvBnAct(1024, 512, 1, activation="leaky")
        self.conv13 = ConvBnAct(512, 1024, 3, activation="leaky")
        self.conv14 = ConvBnAct(1024, 512, 1, activation="leaky")
        self.conv15 = ConvBnAct(512, 1024, 3, activation="leaky")
        self.conv16 = ConvBnAct(1024, 512, 1, activation="leaky")
        self.conv17 = ConvBnAct(512, 1024, 3, activation="leaky")
        self.conv18 = ConvBnAct(1024, out, 1, activation="linear", batch_norm=False)

    def forward(
        self, x20: torch.Tensor, x13: torch.Tensor, x6: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out8 = self.conv2(self.conv1(x20))
        x3 = torch.cat([self.conv3(x20), x13], dim=1)
        x8 = self.conv8(self.conv7(self.conv6(self.conv5(self.conv4(x3)))))
        out16 = self.conv10(self.conv9(x8))
        x11 = torch.cat([self.conv11(x8), x6], dim=1)
        x17 = self.conv17(self.conv16(self.conv15(self.conv14(self.conv13(self.conv12(x11))))))
        out32 = self.conv18(x17)
        return out8, out16, out32


class YOLOv4(nn.Module):
    """YOLOv4 for ``(N, 3, H, W)`` RGB input scaled to [0, 1], with H and W multiples of 32."""

    def __init__(self, num_classes: int = 80) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.down1 = DownSample1()
        self.down2 = CSPDownSample(64, 128, num_blocks=2)
        self.down3 = CSPDownSample(128, 256, num_blocks=8)
        self.down4 = CSPDownSample(256, 512, num_blocks=8)
        self.down5 = CSPDownSample(512, 1024, num_blocks=4)
        self.neck = Neck()
        self.head = Head(num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d3 = self.down3(self.down2(self.down1(x)))
        d4 = self.down4(d3)
        d5 = self.down5(d4)
        x20, x13, x6 = self.neck(d5, d4, d3)
        return self.head(x20, x13, x6)


def conv_layers(model: nn.Module) -> list[tuple[str, ConvBnAct]]:
    """Every ConvBnAct in registration order, which for ``YOLOv4`` is Darknet's cfg order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConvBnAct)]
