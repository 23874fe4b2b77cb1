"""The op layer every ttswap module calls: one interface, two implementations.

``EmulatedBackend`` models TT-NN numerics and layouts in pure torch; ``TtnnBackend`` calls the real
library (on a device, or in mock mode). ttswap modules never import ``ttnn`` themselves.

Tensor convention (TT-NN's): an activation on the device is NHWC flattened to ``[1, 1, N*H*W, C]``.
``DeviceTensor`` carries the logical N, H, W, C next to the backend's payload, because the flattened
shape alone cannot say where one image row ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ttswap.config import Activation, Conv2dSpec, DType, Layout, OpConfig, Pool2dSpec, ShardLayout

TILE = 32
GRID = (8, 8)  # Wormhole n150 worker grid (x, y)
L1_BYTES_PER_CORE = 1_499_136  # physical L1 per Wormhole worker core
# What one core's buffers and circular buffers may fill: L1 less the firmware region, the l1_small
# region (32 KiB, as TtnnBackend opens the device) and ttnn's other reservations; the bank size
# ttnn 0.81.1 reports. Mock-mode runs failed every conv whose estimate (backends/l1.py) reached
# 1.38 MB and ran one at 1.354 MB, so budgets use this.
L1_ALLOCATABLE_BYTES = 1_360_544

# Activations ttnn 0.81.1 fuses into conv2d, and into add (found by dispatching each in mock mode);
# any other activation runs as a separate eltwise op after the conv or add.
CONV_FUSED_ACTIVATIONS = frozenset({"relu", "relu6", "silu", "sigmoid", "hardsigmoid", "gelu"})
ELTWISE_FUSED_ACTIVATIONS = CONV_FUSED_ACTIVATIONS | {"leaky_relu", "hardswish"}


def mesh_shape(mesh: "Sequence[int] | None") -> tuple[int, int]:
    """``mesh`` as (rows, cols) of chips; None is one chip. Anything else is an error."""
    shape = tuple(mesh) if mesh is not None else (1, 1)
    if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ValueError(f"mesh must be (rows, cols) of positive integers, got {mesh!r}")
    return shape  # type: ignore[return-value]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tiles(n: int) -> int:
    """Whole tiles along a dimension of ``n`` elements."""
    return -(-n // TILE)


def largest_divisor(value: int, limit: int) -> int:
    """The largest divisor of ``value`` not above ``limit``: how many cores share ``value`` tiles evenly."""
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


@dataclass(frozen=True)
class MemorySpec:
    """Where a tensor lives: interleaved, or sharded over a core grid with a per-core shard shape."""

    layout: ShardLayout = ShardLayout.INTERLEAVED
    buffer: str = "L1"  # L1 or DRAM
    grid: tuple[int, int] | None = None  # (x, y) cores used by a sharded tensor
    num_cores: int | None = None
    shard_shape: tuple[int, int] | None = None  # (rows, cols) per core

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.value,
            "buffer": self.buffer,
            "grid": list(self.grid) if self.grid else None,
            "num_cores": self.num_cores,
            "shard_shape": list(self.shard_shape) if self.shard_shape else None,
        }


@dataclass
class DeviceTensor:
    """A backend-resident activation. ``payload`` is the backend's own object."""

    payload: Any
    n: int
    h: int
    w: int
    c: int
    dtype: DType = DType.BF16
    layout: Layout = Layout.TILE
    memory: MemorySpec = field(default_factory=MemorySpec)

    @property
    def nhw(self) -> int:
        return self.n * self.h * self.w

    @property
    def padded_shape(self) -> tuple[int, int, int, int]:
        """The flattened shape with tile padding, as ttnn reports ``padded_shape``."""
        if self.layout is Layout.TILE:
            return (1, 1, round_up(self.nhw, TILE), round_up(self.c, TILE))
        return (1, 1, self.nhw, self.c)

    def describe(self) -> str:
        return f"[{self.n},{self.h},{self.w},{self.c}] {self.dtype.value} {self.layout.value} {self.memory.layout.value}"


class L1BudgetError(RuntimeError):
    """A layer's sharded tensors and working buffers do not fit in one core's L1."""

    def __init__(self, layer: str, needed: int, available: int = L1_ALLOCATABLE_BYTES, detail: str = ""):
        self.layer, self.needed, self.available = layer, needed, available
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"layer {layer!r} needs ~{needed:,} B of L1 per core but only {available:,} B exist{extra}; "
            "try a smaller act_block_h, a different shard layout, or bfp8_b activations in the recipe"
        )


class Backend(ABC):
    """One implementation of the op layer. Every op takes ``layer``, the module path it serves, so
    that errors and reports name the layer."""

    name: str
    # Data parallel over a mesh of chips (rows, cols): weights on every chip, the batch split between
    # them (see check_batch). (1, 1): one chip.
    mesh: tuple[int, int] = (1, 1)

    @property
    def chips(self) -> int:
        return self.mesh[0] * self.mesh[1]

    @property
    def grid(self) -> tuple[int, int]:
        """Each chip's worker grid (x, y): GRID unless the backend knows its device's."""
        return GRID

    def check_batch(self, n: int, layer: str) -> int:
        """The images per chip when a batch of ``n`` is split over the mesh; a batch the chips cannot
        share evenly is an error naming the layer."""
        if n % self.chips:
            raise ValueError(f"layer {layer!r}: a batch of {n} cannot be split evenly over the {self.chips} chips of "
                             f"mesh {self.mesh}; use a batch that is a multiple of {self.chips}")
        return n // self.chips

    # -- transfers -------------------------------------------------------------------------------
    @abstractmethod
    def upload(self, x: torch.Tensor, cfg: OpConfig, layer: str = "input") -> DeviceTensor:
        """NCHW float host tensor -> device tensor in the [1,1,N*H*W,C] convention."""

    @abstractmethod
    def download(self, t: DeviceTensor, layer: str = "output") -> torch.Tensor:
        """Device tensor -> NCHW float32 host tensor, channel padding removed."""

    # -- weights ---------------------------------------------------------------------------------
    @abstractmethod
    def prepare_conv(
        self, weight: torch.Tensor, bias: torch.Tensor | None, spec: Conv2dSpec, cfg: OpConfig, layer: str
    ) -> Any:
        """Turn fp32 torch weights (already BN-folded) into whatever ``conv2d`` consumes."""

    @abstractmethod
    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, cfg: OpConfig, layer: str) -> Any:
        ...

    # -- compute ---------------------------------------------------------------------------------
    @abstractmethod
    def conv2d(
        self,
        x: DeviceTensor,
        weights: Any,
        spec: Conv2dSpec,
        cfg: OpConfig,
        layer: str,
        activation: Activation | None = None,
    ) -> DeviceTensor:
        ...

    @abstractmethod
    def max_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str) -> DeviceTensor:
        ...

    @abstractmethod
    def avg_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str, count_include_pad: bool = True,
                   divisor_override: int | None = None) -> DeviceTensor:
        """torch's ``avg_pool2d`` (no dilation); placed like ``max_pool2d``."""

    @abstractmethod
    def upsample_nearest(self, x: DeviceTensor, scale: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        ...

    @abstractmethod
    def concat(self, xs: Sequence[DeviceTensor], cfg: OpConfig, layer: str) -> DeviceTensor:
        """Concatenate along channels."""

    @abstractmethod
    def add(
        self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str, activation: Activation | None = None
    ) -> DeviceTensor:
        ...

    @abstractmethod
    def multiply(self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        """Elementwise product; ``b`` may be [N,1,1,C] and is then broadcast over H and W."""

    @abstractmethod
    def activation(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        ...

    @abstractmethod
    def mean_hw(self, x: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        """Mean over H and W: [N,H,W,C] -> [N,1,1,C]."""

    @abstractmethod
    def linear(self, x: DeviceTensor, weights: Any, cfg: OpConfig, layer: str) -> DeviceTensor:
        """x: [N,1,1,K] -> [N,1,1,out]."""

    # -- memory and layout -----------------------------------------------------------------------
    @abstractmethod
    def to_memory(self, x: DeviceTensor, layout: ShardLayout, layer: str) -> DeviceTensor:
        """Sharded <-> interleaved, or reshard to another layout."""

    @abstractmethod
    def to_layout(self, x: DeviceTensor, layout: Layout, layer: str) -> DeviceTensor:
        """Tile <-> row-major."""

    def close(self) -> None:
        """Release the device, if any."""

    # -- channel slices, four-sided conv padding, LayerNorm over channels ------------------------
    @abstractmethod
    def slice_channels(self, x: DeviceTensor, start: int, stop: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        """Channels [start, stop) of ``x``, every pixel kept. The values move unchanged, in ``x``'s dtype
        (bfloat8_b cut inside a tile's channels comes back bfloat16, which holds its values exactly). A
        height-sharded tiled ``x`` cut at tile boundaries stays on its cores; otherwise the slice reads
        from L1 interleaved."""

    @abstractmethod
    def conv2d_padded(self, x: DeviceTensor, weights: Any, spec: Conv2dSpec, padding: tuple[int, int, int, int],
                      cfg: OpConfig, layer: str, activation: Activation | None = None) -> DeviceTensor:
        """``conv2d`` with zero padding (top, bottom, left, right), as TensorFlow's "same" convs pad;
        ``spec.padding`` must be (0, 0). ``weights`` come from ``prepare_conv`` with that spec."""

    @abstractmethod
    def prepare_layer_norm(self, weight: torch.Tensor | None, bias: torch.Tensor | None, cfg: OpConfig,
                           layer: str) -> Any:
        """A LayerNorm's per-channel affine parameters, as ``layer_norm`` consumes them."""

    @abstractmethod
    def layer_norm(self, x: DeviceTensor, weights: Any, eps: float, cfg: OpConfig, layer: str) -> DeviceTensor:
        """LayerNorm over each pixel's channels (ConvNeXt's ``LayerNorm2d``); the output is L1 interleaved."""

    @abstractmethod
    def global_response_norm(self, x: DeviceTensor, weights: Any, eps: float, cfg: OpConfig,
                             layer: str) -> DeviceTensor:
        """ConvNeXt-V2's GRN on each image: g = the L2 norm of each channel over H and W, then
        ``x * (1 + gamma * g / (mean_c(g) + eps)) + beta``; ``weights`` from ``prepare_layer_norm``.
        The output is L1 interleaved."""
