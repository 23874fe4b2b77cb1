"""Typed per-op configuration: the knobs a recipe sets for one layer.

Modelled on tt-metal's ``tt_cnn`` configuration dataclasses: plain frozen data, no behaviour beyond
validation, so a config can be printed, hashed, compared and written to JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class ShardLayout(str, Enum):
    HEIGHT = "height"
    BLOCK = "block"
    WIDTH = "width"
    INTERLEAVED = "interleaved"
    AUTO = "auto"  # resolved per layer from N*H*W versus C (see resolve_auto_shard)


class DType(str, Enum):
    BF16 = "bf16"
    BFP8_B = "bfp8_b"
    FLOAT32 = "fp32"


class Fidelity(str, Enum):
    """Wormhole matrix-engine fidelity: how many mantissa phases each multiply takes."""

    LOFI = "LoFi"
    HIFI2 = "HiFi2"
    HIFI3 = "HiFi3"
    HIFI4 = "HiFi4"


class Layout(str, Enum):
    TILE = "tile"
    ROW_MAJOR = "row_major"


@dataclass(frozen=True)
class OpConfig:
    """What a recipe rule may set for one layer. Every field has a safe default."""

    shard: ShardLayout = ShardLayout.AUTO
    act_dtype: DType = DType.BF16
    weight_dtype: DType = DType.BFP8_B
    fidelity: Fidelity = Fidelity.LOFI
    fp32_acc: bool = False
    act_block_h: int | None = None  # rows of the im2col block per core; None lets the backend choose
    deallocate: bool = True  # free the op's input once consumed
    # ttnn's packer_l1_acc: the packer adds each K-block's sums into the partials buffer in L1 instead of
    # reloading them into Dst; a conv's partials then stay fp32 (with fp32_acc) or bfloat16, not the
    # output dtype, at the price of an L1 buffer of their own (docs/numerics.md, "K-blocks")
    packer_l1_acc: bool = False

    def __post_init__(self) -> None:
        if self.act_block_h is not None and (self.act_block_h <= 0 or self.act_block_h % 32):
            raise ValueError(f"act_block_h must be a positive multiple of 32, got {self.act_block_h}")

    def replace(self, **changes: Any) -> "OpConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard.value,
            "act_dtype": self.act_dtype.value,
            "weight_dtype": self.weight_dtype.value,
            "fidelity": self.fidelity.value,
            "fp32_acc": self.fp32_acc,
            "act_block_h": self.act_block_h,
            "deallocate": self.deallocate,
            "packer_l1_acc": self.packer_l1_acc,
        }


# ttnn's conv guidance: HEIGHT when N*H*W >> C, BLOCK when comparable, WIDTH when C >> N*H*W.
# "Much greater" is taken as a factor of 8: that is where the thinner dimension stops filling
# one tile-row per core on the 64-core grid.
AUTO_SHARD_RATIO = 8.0


def resolve_auto_shard(nhw: int, channels: int, ratio: float = AUTO_SHARD_RATIO) -> ShardLayout:
    if nhw >= ratio * channels:
        return ShardLayout.HEIGHT
    if channels >= ratio * nhw:
        return ShardLayout.WIDTH
    return ShardLayout.BLOCK


@dataclass(frozen=True)
class Activation:
    """An elementwise activation, fused into the producing op where the backend allows."""

    kind: str  # relu, relu6, leaky_relu, mish, silu, sigmoid, hardsigmoid, hardswish, gelu
    param: float | None = None  # leaky_relu's negative slope

    KINDS = ("relu", "relu6", "leaky_relu", "mish", "silu", "sigmoid", "hardsigmoid", "hardswish", "gelu")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unsupported activation {self.kind!r}; supported: {', '.join(self.KINDS)}")
        if self.kind == "leaky_relu" and self.param is None:
            raise ValueError("leaky_relu needs its negative slope as param")

    def __str__(self) -> str:
        return f"{self.kind}({self.param:g})" if self.param is not None else self.kind


@dataclass(frozen=True)
class Conv2dSpec:
    """The geometry of one convolution, in torch terms."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.padding, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @classmethod
    def from_torch(cls, conv: "nn.Conv2d") -> "Conv2dSpec":
        """The geometry of a torch ``Conv2d``; ValueError for one the device cannot run as written."""
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; "
                             "only explicit zero padding runs on device")
        return cls(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride),
                   _pair(conv.padding), _pair(conv.dilation), conv.groups)


@dataclass(frozen=True)
class Pool2dSpec:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    @classmethod
    def from_torch(cls, pool: "nn.MaxPool2d | nn.AvgPool2d") -> "Pool2dSpec":
        """The window of a torch ``MaxPool2d`` or ``AvgPool2d`` (no stride: the kernel's); ValueError for
        what the device does not return. AvgPool2d's divisor options stay with the avgpool layer."""
        if getattr(pool, "return_indices", False):
            raise ValueError("max pool with return_indices=True")
        stride = pool.stride if pool.stride not in (None, [], ()) else pool.kernel_size
        return cls(_pair(pool.kernel_size), _pair(stride), _pair(pool.padding),
                   _pair(getattr(pool, "dilation", 1)), bool(pool.ceil_mode))

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.padding, self.dilation):
            span = size + 2 * p - d * (k - 1) - 1
            n = (-(-span // s) if self.ceil_mode else span // s) + 1
            # torch's rule: the last window must start inside the input or its left padding
            if self.ceil_mode and (n - 1) * s >= size + p:
                n -= 1
            out.append(n)
        return out[0], out[1]


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """torch's int-or-pair argument as a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))
