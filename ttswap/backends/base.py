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
# What ttnn can actually allocate per core once firmware, the l1_small region (32 KiB, as TtnnBackend
# opens the device) and its other reservations are taken: the bank size ttnn reports. Mock-mode runs
# failed every conv whose estimate reached 1.38 MB and ran one at 1.354 MB, so budgets use this.
L1_ALLOCATABLE_BYTES = 1_360_544

# Activations ttnn 0.81.1 fuses into conv2d, and into add (found by dispatching each in mock mode);
# any other activation runs as a separate eltwise op after the conv or add.
CONV_FUSED_ACTIVATIONS = frozenset({"relu", "relu6", "silu", "sigmoid", "hardsigmoid", "gelu"})
ELTWISE_FUSED_ACTIVATIONS = CONV_FUSED_ACTIVATIONS | {"leaky_relu", "hardswish"}


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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
