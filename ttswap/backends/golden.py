"""``backend="golden"``: the ttnn backend's own code, with every ttnn op computed on the CPU by ttnn's
reference for it, ``ttnn.get_golden_function(op)``.

Mock mode validates what the ttnn backend asks of ttnn but computes nothing, so it cannot say whether
the backend asks for the right numbers: weights laid out as conv2d expects, concatenations in the
right order, padding to tiles undone, reshapes that keep each image's rows together. This backend
answers that without a device. :class:`GoldenBackend` inherits every method of
:class:`~ttswap.backends.ttnn_backend.TtnnBackend` unchanged (the same calls, arguments, weight and
bias preparation, reshapes, slices, concat order, padding and un-padding) and swaps only the object
those methods call ttnn through, ``self.ttnn``, for :class:`GoldenTtnn`:

* **compute ops** (conv2d, the pools, upsample, concat, add, multiply, the unary activations, mean,
  linear, layer_norm, slice) compute with ttnn's golden function for the op. In ttnn 0.81.1 the max_pool2d and
  avg_pool2d goldens import ``tests.sweep_framework``, which the wheel does not ship; for those two
  the reference here is written in torch following the goldens' own source (reshape the
  [1, 1, N*H*W, C] input to NCHW, torch's pool with the same arguments, back to [1, 1, N*H*W, C]).
* **values are stored as ttnn stores them**: every tensor holds float32 values already rounded to
  its dtype by ttnn's own host conversion (``golden_to_output_dtype``, the function ttnn's goldens
  use: bfloat16 rounds to nearest even; bfloat8_b goes through ttnn's tilize-and-pack on the host,
  16-value shared-exponent blocks along the last dimension of the tensor as it is shaped). Conv2d
  weights are prepared as ttnn prepares them: one [kh*kw*C_in, C_out] matrix (a grouped conv's
  expanded block-diagonally), and the bias as a [1, C_out] row, both in ``weights_dtype``.
* **data movement and memory configs** (to_memory_config, sharded_to_interleaved, to_layout,
  typecast, reshape, from_torch, to_torch) act on the logical values and keep the dtype, layout and
  ``ttnn.MemoryConfig`` the real op reports, so the backend's placement logic runs unchanged. Where a
  compute op chooses its own output placement (conv2d and the pools shard their output themselves),
  the placement is the one :mod:`ttswap.backends.l1` models, which ``tests/test_mock_models.py``
  cross-checks against ttnn in mock mode.
* type, enum and config constructors (MemoryConfig, ShardSpec, CoreRangeSet, Conv2dConfig,
  WormholeComputeKernelConfig, UnaryWithParam, dtypes, layouts) are ttnn's own: they are host-only.
  Any other ttnn name raises, so an op the ttnn backend starts calling fails here until it has a
  golden.

The goldens compute in float32 at full precision: math fidelity, fp32 or bf16 accumulation and the
packer's rounding are not modelled (that is the emulated backend's job). Golden versus emulated
therefore measures the emulator's modelled loss plus any place where the two compute different
things; golden versus torch measures the ttnn path's code plus ttnn's storage rounding.

No device and no mock mode are needed: ``import ttnn`` works as it is. Packing bfloat8_b on the host
does need tt-metal's cluster descriptor (tt-metal sizes tiles through its cluster context), so when
no Tenstorrent device is present the first conversion points tt-metal at the Wormhole n150
descriptor ttswap ships, with the same environment variables ``ttswap.mock`` sets (no compiler, no
JIT cache is used).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import ttnn
from ttnn.operations.golden_common import golden_to_output_dtype

from ttswap.backends import l1
from ttswap.backends.device import tenstorrent_device_present
from ttswap.backends.base import TILE, round_up
from ttswap.backends.ttnn_backend import _MEMORY_LAYOUTS, _SHARD_LAYOUT_OF, TtnnBackend, _row_wise_cores, memory_spec_of
from ttswap.config import Conv2dSpec, ShardLayout

# ttnn names GoldenTtnn hands through unchanged: host-only types, enums, constants and constructors.
HOST_ONLY_NAMES = frozenset({
    "bfloat16", "bfloat8_b", "float32", "DataType",
    "TILE_LAYOUT", "ROW_MAJOR_LAYOUT", "Layout",
    "L1_MEMORY_CONFIG", "DRAM_MEMORY_CONFIG", "MemoryConfig", "TensorMemoryLayout", "BufferType",
    "ShardSpec", "ShardOrientation", "CoreRangeSet", "CoreRange", "CoreCoord", "num_cores_to_corerangeset",
    "Conv2dConfig", "WormholeComputeKernelConfig", "MathFidelity", "UnaryWithParam", "UnaryOpType",
})


class _GoldenDevice:
    """Stands for the device in ``device=`` arguments: a tensor created with it is on the "device"."""

    def __repr__(self) -> str:
        return "<golden CPU device>"


GOLDEN_DEVICE = _GoldenDevice()


def _ensure_host_packing() -> None:
    """tt-metal needs a cluster descriptor before it packs a block-float tensor, even on the host."""
    if tenstorrent_device_present():
        return
    from ttswap.mock import CLUSTER_DESCRIPTOR, mock_dir

    cache = mock_dir() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    # the values ensure_mock_mode sets, so that a ttnn backend opened later in this process agrees
    os.environ.setdefault("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(CLUSTER_DESCRIPTOR))
    os.environ.setdefault("TT_METAL_CACHE", f"{cache}/")


def stored(values: torch.Tensor, dtype: Any) -> torch.Tensor:
    """``values`` as a ttnn tensor of ``dtype`` holds them (float32), rounded by ttnn's host conversion.
    bfloat8_b blocks run along the last dimension of ``values`` as shaped, as in ttnn's tiles."""
    values = values.detach().float().contiguous()
    if dtype == ttnn.float32:
        return values
    if dtype == ttnn.bfloat8_b:
        _ensure_host_packing()
    elif dtype != ttnn.bfloat16:
        raise ValueError(f"golden backend: unsupported dtype {dtype}")
    return golden_to_output_dtype(values, dtype).float()


@dataclass(eq=False)
class GoldenTensor:
    """A ttnn tensor for the golden backend: its values, and what ttnn reports about it."""

    values: torch.Tensor  # float32, in the tensor's ttnn shape, rounded to ``dtype``
    dtype: Any  # ttnn.DataType
    layout: Any  # ttnn.Layout
    memory: Any = None  # ttnn.MemoryConfig on the device; None on the host
    allocated: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        shape = self.shape
        if self.layout != ttnn.TILE_LAYOUT or len(shape) < 2:
            return shape
        return (*shape[:-2], round_up(shape[-2], TILE), round_up(shape[-1], TILE))

    def memory_config(self) -> Any:
        return self.memory

    def is_allocated(self) -> bool:
        return self.allocated


def _memory_config(grid: l1.ShardGrid) -> Any:
    """The ttnn.MemoryConfig of an L1 tensor sharded as ``grid`` (what ``memory_spec_of`` reads back)."""
    if grid.layout is ShardLayout.BLOCK:
        end = ttnn.CoreCoord(grid.col_cores - 1, grid.row_cores - 1)
        cores = ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(0, 0), end)})
    else:
        cores = _row_wise_cores(grid.num_cores)
    spec = ttnn.ShardSpec(cores, (grid.shard_rows, grid.shard_cols), ttnn.ShardOrientation.ROW_MAJOR)
    return ttnn.MemoryConfig(_MEMORY_LAYOUTS[grid.layout], ttnn.BufferType.L1, spec)


def _dense_rows(spec: Conv2dSpec) -> torch.Tensor:
    """For each (kernel position, input channel of its group, output channel): the row of ttnn's dense
    [kh*kw, C_in, C_out] weight matrix that holds it. Output channel co reads its group's inputs."""
    kh, kw = spec.kernel
    cout, cin_per_group = spec.out_channels, spec.in_channels // spec.groups
    group_start = (torch.arange(cout) // (cout // spec.groups)) * cin_per_group
    return (group_start + torch.arange(cin_per_group)[:, None]).expand(kh * kw, cin_per_group, cout)


def _unary_golden(name: str) -> Any:
    return ttnn.get_golden_function(getattr(ttnn, name))


def _apply_activation(values: torch.Tensor, activation: Any) -> torch.Tensor:
    """A fused ``ttnn.UnaryWithParam`` applied by the golden of the unary op of the same name. (The
    binary goldens' own activation table lacks relu6, hardsigmoid, hardswish and leaky_relu.)"""
    name = activation.op_type.name.lower()
    if name == "leaky_relu":
        return _unary_golden(name)(values, negative_slope=activation.params[0])
    return _unary_golden(name)(values)


class GoldenTtnn:
    """The part of ttnn's API the ttnn backend calls, computed on the CPU (see the module docstring)."""

    DEVICE = GOLDEN_DEVICE

    def __getattr__(self, name: str) -> Any:
        if name in HOST_ONLY_NAMES:
            return getattr(ttnn, name)
        raise AttributeError(f"golden backend: no CPU reference for ttnn.{name}; add one to GoldenTtnn")

    # -- tensors ---------------------------------------------------------------------------------
    @staticmethod
    def from_torch(tensor: torch.Tensor, dtype: Any = None, layout: Any = ttnn.ROW_MAJOR_LAYOUT, device: Any = None,
                   memory_config: Any = None) -> GoldenTensor:
        dtype = ttnn.float32 if dtype is None else dtype
        if dtype == ttnn.bfloat8_b and layout != ttnn.TILE_LAYOUT:
            raise RuntimeError("bfloat8_b only exists in TILE_LAYOUT")
        memory = None if device is None else (memory_config or ttnn.DRAM_MEMORY_CONFIG)
        return GoldenTensor(stored(tensor, dtype), dtype, layout, memory)

    @staticmethod
    def to_torch(tensor: GoldenTensor) -> torch.Tensor:
        return tensor.values.clone()

    @staticmethod
    def _like(tensor: GoldenTensor, values: torch.Tensor | None = None, **changes: Any) -> GoldenTensor:
        """A new tensor: ``tensor``'s metadata with ``changes``, its values re-stored in the new dtype."""
        dtype = changes.get("dtype", tensor.dtype)
        layout = changes.get("layout", tensor.layout)
        if dtype == ttnn.bfloat8_b and layout != ttnn.TILE_LAYOUT:
            raise RuntimeError("bfloat8_b only exists in TILE_LAYOUT")
        values = tensor.values if values is None else values
        return GoldenTensor(stored(values, dtype), dtype, layout, changes.get("memory", tensor.memory))

    # -- data movement: the values stay, the metadata follows ttnn ---------------------------------
    def typecast(self, tensor: GoldenTensor, dtype: Any) -> GoldenTensor:
        return self._like(tensor, dtype=dtype)

    def to_layout(self, tensor: GoldenTensor, layout: Any, dtype: Any = None) -> GoldenTensor:
        if dtype is None:
            # bfloat8_b exists only in tiles: untilizing hands back bfloat16 (which holds its values exactly)
            untiling_bfp8 = layout == ttnn.ROW_MAJOR_LAYOUT and tensor.dtype == ttnn.bfloat8_b
            dtype = ttnn.bfloat16 if untiling_bfp8 else tensor.dtype
        values = ttnn.get_golden_function(ttnn.to_layout)(tensor.values, layout)
        return self._like(tensor, values, layout=layout, dtype=dtype)

    def reshape(self, tensor: GoldenTensor, shape: Sequence[int]) -> GoldenTensor:
        return self._like(tensor, ttnn.get_golden_function(ttnn.reshape)(tensor.values, tuple(shape)))

    def to_memory_config(self, tensor: GoldenTensor, memory_config: Any) -> GoldenTensor:
        return self._like(tensor, ttnn.get_golden_function(ttnn.to_memory_config)(tensor.values), memory=memory_config)

    def sharded_to_interleaved(self, tensor: GoldenTensor, memory_config: Any) -> GoldenTensor:
        return self._like(tensor, memory=memory_config)

    # -- conv2d ----------------------------------------------------------------------------------
    def conv2d(self, *, input_tensor: GoldenTensor, weight_tensor: GoldenTensor, bias_tensor: GoldenTensor | None,
               device: Any, in_channels: int, out_channels: int, batch_size: int, input_height: int, input_width: int,
               kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               groups: int, dtype: Any, conv_config: Any, compute_config: Any = None,
               return_weights_and_bias: bool = False) -> Any:
        # padding is ttnn's: (h, w), or (top, bottom, left, right)
        pads = tuple(padding) if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])
        out_h, out_w = (
            (size + before + after - d * (k - 1) - 1) // s + 1
            for size, before, after, k, s, d in zip((input_height, input_width), pads[::2], pads[1::2], kernel_size,
                                                     stride, dilation)
        )
        # the placement model asks of the padding only whether there is any (a plain 1x1 conv is a matmul)
        spec = Conv2dSpec(in_channels, out_channels, tuple(kernel_size), tuple(stride),
                          (max(pads[:2]), max(pads[2:])), tuple(dilation), groups)
        weight, bias = self._prepare_conv_weights(weight_tensor, bias_tensor, spec, conv_config.weights_dtype)
        golden = ttnn.get_golden_function(ttnn.conv2d)
        values = golden(
            input_tensor.values, self._conv_weight_oihw(weight.values, spec),
            in_channels=in_channels, out_channels=out_channels, batch_size=batch_size, input_height=input_height,
            input_width=input_width, kernel_size=spec.kernel, stride=spec.stride, padding=pads,
            dilation=spec.dilation, groups=groups, bias_tensor=bias.values if bias is not None else None,
            conv_config=conv_config, dtype=dtype,
        )
        layout = _SHARD_LAYOUT_OF[conv_config.shard_layout]
        grid = l1.conv_shard_grid(layout, spec, batch_size * out_h * out_w, conv_config.act_block_h_override or None)
        out = GoldenTensor(stored(values, dtype), dtype, ttnn.TILE_LAYOUT, _memory_config(grid))
        if conv_config.deallocate_activation:
            input_tensor.allocated = False
        return (out, (weight, bias)) if return_weights_and_bias else out

    @staticmethod
    def _prepare_conv_weights(weight: GoldenTensor, bias: GoldenTensor | None, spec: Conv2dSpec,
                              dtype: Any) -> tuple[GoldenTensor, GoldenTensor | None]:
        """What conv2d's first call makes of fp32 host weights: the [1, 1, kh*kw*C_in, C_out] matrix
        (rows ordered kh, kw, C_in; a grouped conv's block-diagonal) and the [1, 1, 1, C_out] bias,
        tiled in ``dtype``. Weights already on the device were prepared by an earlier call."""
        if weight.memory is not None:
            return weight, bias
        cout, cin_per_group, kh, kw = weight.values.shape
        rows = weight.values.permute(2, 3, 1, 0).reshape(kh * kw, cin_per_group, cout)
        dense = rows.new_zeros(kh * kw, spec.in_channels, cout).scatter_(1, _dense_rows(spec), rows)
        matrix = dense.reshape(1, 1, kh * kw * spec.in_channels, cout)
        prepared = GoldenTensor(stored(matrix, dtype), dtype, ttnn.TILE_LAYOUT, ttnn.DRAM_MEMORY_CONFIG)
        prepared_bias = None
        if bias is not None:
            prepared_bias = GoldenTensor(stored(bias.values.reshape(1, 1, 1, cout), dtype), dtype, ttnn.TILE_LAYOUT,
                                         ttnn.DRAM_MEMORY_CONFIG)
        return prepared, prepared_bias

    @staticmethod
    def _conv_weight_oihw(matrix: torch.Tensor, spec: Conv2dSpec) -> torch.Tensor:
        """torch's [C_out, C_in/groups, kh, kw] weight read back from the prepared matrix."""
        kh, kw = spec.kernel
        cout, cin_per_group = spec.out_channels, spec.in_channels // spec.groups
        rows = matrix.reshape(kh * kw, spec.in_channels, cout).gather(1, _dense_rows(spec))
        return rows.reshape(kh, kw, cin_per_group, cout).permute(3, 2, 0, 1).contiguous()

    # -- pools -----------------------------------------------------------------------------------
    def max_pool2d(self, *, input_tensor: GoldenTensor, batch_size: int, input_h: int, input_w: int, channels: int,
                   kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   ceil_mode: bool = False, applied_shard_scheme: Any = None, dtype: Any = ttnn.bfloat16,
                   output_layout: Any = ttnn.ROW_MAJOR_LAYOUT) -> GoldenTensor:
        # ttnn's golden_maxpool2d, which imports a module the wheel lacks: NCHW, torch's pool, flat NHWC
        images = self._pool_input(input_tensor, batch_size, input_h, input_w, channels)
        pooled = F.max_pool2d(images, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode)
        return self._pool_output(input_tensor, pooled, applied_shard_scheme, dtype, output_layout)

    def avg_pool2d(self, *, input_tensor: GoldenTensor, batch_size: int, input_h: int, input_w: int, channels: int,
                   kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], ceil_mode: bool = False,
                   count_include_pad: bool = True, divisor_override: int | None = None,
                   applied_shard_scheme: Any = None, dtype: Any = ttnn.bfloat16,
                   output_layout: Any = ttnn.ROW_MAJOR_LAYOUT, compute_kernel_config: Any = None) -> GoldenTensor:
        # ttnn's golden_avg_pool2d, which imports a module the wheel lacks: NCHW, torch's pool, flat NHWC
        images = self._pool_input(input_tensor, batch_size, input_h, input_w, channels)
        pooled = F.avg_pool2d(images, list(kernel_size), list(stride), list(padding), ceil_mode, count_include_pad,
                              divisor_override)
        return self._pool_output(input_tensor, pooled, applied_shard_scheme, dtype, output_layout)

    @staticmethod
    def _pool_input(tensor: GoldenTensor, n: int, h: int, w: int, c: int) -> torch.Tensor:
        return tensor.values.reshape(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def _pool_output(tensor: GoldenTensor, pooled: torch.Tensor, scheme: Any, dtype: Any, layout: Any) -> GoldenTensor:
        n, c, h, w = pooled.shape
        rows = pooled.permute(0, 2, 3, 1).reshape(1, 1, n * h * w, c)
        # pools keep a sharded input's cores; an interleaved one they shard by ``scheme`` (see l1)
        nhw_in = tensor.values.shape[-2]
        grid = l1.grid_of(memory_spec_of(tensor)) or l1.pool_input_grid(_SHARD_LAYOUT_OF[scheme], nhw_in, n * h * w, c)
        memory = _memory_config(l1.pool_shard_grid(grid, n * h * w))
        return GoldenTensor(stored(rows, dtype), dtype, layout, memory)

    # -- other compute ops -----------------------------------------------------------------------
    def upsample(self, tensor: GoldenTensor, scale_factor: int, mode: str = "nearest",
                 memory_config: Any = None) -> GoldenTensor:
        values = ttnn.get_golden_function(ttnn.upsample)(tensor.values, scale_factor, mode=mode)
        return self._like(tensor, values, memory=memory_config or tensor.memory)

    def concat(self, tensors: Sequence[GoldenTensor], dim: int = 0, memory_config: Any = None) -> GoldenTensor:
        first = tensors[0]
        if any(t.dtype != first.dtype or t.layout != first.layout for t in tensors):
            raise RuntimeError("ttnn.concat needs inputs of one dtype and layout")
        values = ttnn.get_golden_function(ttnn.concat)([t.values for t in tensors], dim)
        dtype = first.dtype
        if first.layout == ttnn.TILE_LAYOUT and any(t.values.shape[dim] % TILE for t in tensors):
            # ragged tiles are concatenated row-major, where bfloat8_b does not exist: bfloat16 comes back
            dtype = ttnn.bfloat16 if dtype == ttnn.bfloat8_b else dtype
        return GoldenTensor(stored(values, dtype), dtype, first.layout, memory_config or first.memory)

    def add(self, a: GoldenTensor, b: GoldenTensor | float, *, dtype: Any = None, memory_config: Any = None,
            activations: Sequence[Any] = ()) -> GoldenTensor:
        values = ttnn.get_golden_function(ttnn.add)(a.values, b.values if isinstance(b, GoldenTensor) else b)
        return self._binary_output(a, values, dtype, memory_config, activations)

    def multiply(self, a: GoldenTensor, b: GoldenTensor, *, dtype: Any = None, memory_config: Any = None,
                 activations: Sequence[Any] = ()) -> GoldenTensor:
        values = ttnn.get_golden_function(ttnn.multiply)(a.values, b.values)
        return self._binary_output(a, values, dtype, memory_config, activations)

    @staticmethod
    def _binary_output(a: GoldenTensor, values: torch.Tensor, dtype: Any, memory_config: Any,
                       activations: Sequence[Any]) -> GoldenTensor:
        for activation in activations or ():
            values = _apply_activation(values, activation)  # on the float32 result, before it is stored
        dtype = a.dtype if dtype is None else dtype
        return GoldenTensor(stored(values, dtype), dtype, ttnn.TILE_LAYOUT, memory_config or a.memory)

    def _unary(self, name: str, tensor: GoldenTensor, output_tensor: GoldenTensor | None,
               **params: Any) -> GoldenTensor:
        values = stored(_unary_golden(name)(tensor.values, **params), tensor.dtype)
        if output_tensor is None:
            return GoldenTensor(values, tensor.dtype, tensor.layout, tensor.memory)
        output_tensor.values = values
        return output_tensor

    def relu(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("relu", tensor, output_tensor)

    def relu6(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("relu6", tensor, output_tensor)

    def silu(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("silu", tensor, output_tensor)

    def sigmoid(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("sigmoid", tensor, output_tensor)

    def hardsigmoid(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("hardsigmoid", tensor, output_tensor)

    def hardswish(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("hardswish", tensor, output_tensor)

    def gelu(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("gelu", tensor, output_tensor)

    def mish(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("mish", tensor, output_tensor)

    def leaky_relu(self, tensor: GoldenTensor, *, negative_slope: float = 0.01,
                   output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("leaky_relu", tensor, output_tensor, negative_slope=negative_slope)

    def slice(self, tensor: GoldenTensor, starts: Sequence[int], ends: Sequence[int], *,
              memory_config: Any = None) -> GoldenTensor:
        values = ttnn.get_golden_function(ttnn.slice)(tensor.values, starts, ends)
        return self._like(tensor, values, memory=memory_config or tensor.memory)

    def layer_norm(self, tensor: GoldenTensor, *, epsilon: float, weight: GoldenTensor | None = None,
                   bias: GoldenTensor | None = None, memory_config: Any = None,
                   compute_kernel_config: Any = None) -> GoldenTensor:
        values = ttnn.get_golden_function(ttnn.layer_norm)(
            tensor.values, epsilon=epsilon, weight=None if weight is None else weight.values,
            bias=None if bias is None else bias.values,
        )
        memory = memory_config or tensor.memory
        return GoldenTensor(stored(values, tensor.dtype), tensor.dtype, ttnn.TILE_LAYOUT, memory)

    def mean(self, tensor: GoldenTensor, dim: int, keepdim: bool = False, *, memory_config: Any = None,
             compute_kernel_config: Any = None) -> GoldenTensor:
        values = ttnn.get_golden_function(ttnn.mean)(tensor.values, dim=dim, keepdim=keepdim)
        memory = memory_config or tensor.memory
        return GoldenTensor(stored(values, tensor.dtype), tensor.dtype, ttnn.TILE_LAYOUT, memory)

    def linear(self, a: GoldenTensor, b: GoldenTensor, *, bias: GoldenTensor | None = None, memory_config: Any = None,
               dtype: Any = None, compute_kernel_config: Any = None) -> GoldenTensor:
        dtype = a.dtype if dtype is None else dtype
        values = ttnn.get_golden_function(ttnn.linear)(a.values, b.values, bias=None if bias is None else bias.values,
                                                       dtype=dtype)
        return GoldenTensor(stored(values, dtype), dtype, ttnn.TILE_LAYOUT, memory_config or a.memory)

    def sqrt(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("sqrt", tensor, output_tensor)

    def reciprocal(self, tensor: GoldenTensor, *, output_tensor: GoldenTensor | None = None) -> GoldenTensor:
        return self._unary("reciprocal", tensor, output_tensor)


class GoldenBackend(TtnnBackend):
    """The ttnn backend computed by ttnn's golden functions on the CPU: no device, no mock mode.

    It defines no op of its own: every op method is TtnnBackend's, calling :class:`GoldenTtnn`."""

    name = "golden"

    def __init__(self) -> None:  # TtnnBackend's would prepare mock mode and a device; neither is needed
        self.mock = False
        self._device = None
        self.ttnn = GoldenTtnn()

    @property
    def device(self) -> Any:
        return GOLDEN_DEVICE
