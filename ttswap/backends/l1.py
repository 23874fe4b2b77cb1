"""Where TT-NN puts a tensor on the 8x8 core grid, and how much L1 each core needs for an op.

The shard geometry reproduces what ttnn 0.81.1 chose for conv2d outputs in mock mode (rules in
docs/numerics.md); the L1 figures are estimates of the per-core buffers an op allocates (sharded inputs
and outputs, halo, im2col block, weight block, bias, and a partials buffer when its format is not the
output's), checked against the configurations that ttnn's own circular-buffer allocation accepts or
rejects. Every function returns bytes per core.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Iterable

from ttswap.backends.base import GRID, L1_ALLOCATABLE_BYTES, TILE, DeviceTensor, L1BudgetError, MemorySpec, round_up
from ttswap.backends.base import largest_divisor as _largest_divisor, tiles as _tiles  # one definition each
from ttswap.backends.numerics import packer_l1_acc_active, partials_dtype
from ttswap.config import Conv2dSpec, DType, Layout, OpConfig, Pool2dSpec, ShardLayout, resolve_auto_shard

TILE_BYTES = {DType.BF16: 2048, DType.BFP8_B: 1088, DType.FLOAT32: 4096}
ELEMENT_BYTES = {DType.BF16: 2, DType.FLOAT32: 4}  # row-major dtypes (bfloat8_b only exists in tiles)
L1_ALIGNMENT = 16  # bytes; a row-major page (one pixel's channels) is padded to it
MAX_CORES = GRID[0] * GRID[1]
STICK_ALIGN = 8  # channels of a row-major bfloat16 stick (pixel) are padded to 8: 16 B, the L1 alignment


@dataclass(frozen=True)
class ShardGrid:
    """A sharded [rows, cols] matrix: ``row_cores`` x ``col_cores`` cores, each holding one shard."""

    layout: ShardLayout
    row_cores: int
    col_cores: int
    shard_rows: int
    shard_cols: int

    @property
    def num_cores(self) -> int:
        return self.row_cores * self.col_cores

    def memory_spec(self) -> MemorySpec:
        if self.layout is ShardLayout.BLOCK:
            grid = (self.col_cores, self.row_cores)  # channels along x, rows along y (ROW_MAJOR orientation)
        else:
            grid = (min(self.num_cores, GRID[0]), -(-self.num_cores // GRID[0]))  # row-major fill of 8-wide rows
        return MemorySpec(self.layout, "L1", grid, self.num_cores, (self.shard_rows, self.shard_cols))


def split_tiles(total_tiles: int, max_cores: int, block_tiles: int | None = None) -> tuple[int, int]:
    """(cores, tiles per core) for ``total_tiles`` rows split in whole tiles over at most ``max_cores``.

    ttnn spreads the rows over as many cores as it can; an act_block_h of ``block_tiles`` raises the
    per-core height to at least one block, and to a multiple of it when the grid is already full.
    """
    total_tiles = max(total_tiles, 1)
    if block_tiles is None:
        per_core = -(-total_tiles // max_cores)
    elif -(-total_tiles // block_tiles) > max_cores:
        per_core = round_up(-(-total_tiles // max_cores), block_tiles)
    else:
        per_core = -(-total_tiles // -(-total_tiles // block_tiles))
    cores = -(-total_tiles // per_core)
    return cores, -(-total_tiles // cores)


def is_matmul_conv(spec: Conv2dSpec) -> bool:
    """A 1x1, stride-1, unpadded conv: ttnn runs it as a matmul on the input shard, without im2col."""
    return spec.kernel == (1, 1) and spec.stride == (1, 1) and spec.padding == (0, 0)


def conv_shard_grid(layout: ShardLayout, spec: Conv2dSpec, nhw_out: int, act_block_h: int | None = None) -> ShardGrid:
    """The output sharding ttnn's conv2d picks (observed in mock mode for ttnn 0.81.1).

    HEIGHT: output rows over up to 64 cores. BLOCK: rows over up to 8 grid rows; channels over the
    largest divisor (<= 8) of the output channel tiles, or for a matmul conv of the gcd of the input
    and output channel tiles (an im2col conv pads its input channels to fit the columns, a matmul
    cannot). WIDTH: output channels over up to 64 cores.
    """
    block_tiles = act_block_h // TILE if act_block_h else None
    cout_padded = round_up(spec.out_channels, TILE)
    if layout is ShardLayout.HEIGHT:
        cores, per_core = split_tiles(_tiles(nhw_out), MAX_CORES, block_tiles)
        return ShardGrid(layout, cores, 1, per_core * TILE, cout_padded)
    if layout is ShardLayout.BLOCK:
        rows, per_core = split_tiles(_tiles(nhw_out), GRID[1], block_tiles)
        channel_tiles = _tiles(spec.out_channels)
        if is_matmul_conv(spec):
            channel_tiles = math.gcd(_tiles(spec.in_channels), channel_tiles)
        cols = _largest_divisor(channel_tiles, GRID[0])
        return ShardGrid(layout, rows, cols, per_core * TILE, cout_padded // cols)
    if layout is ShardLayout.WIDTH:
        cores, per_core = split_tiles(_tiles(spec.out_channels), MAX_CORES)
        return ShardGrid(layout, 1, cores, round_up(nhw_out, TILE), per_core * TILE)
    raise ValueError(f"conv2d needs a sharded layout, got {layout.value}")


def tensor_shard_grid(layout: ShardLayout, nhw: int, channels: int, tiled: bool = True) -> ShardGrid | None:
    """How ``to_memory`` shards a plain [1,1,NHW,C] tensor (as TtnnBackend's sharded_memory_config
    asks ttnn to); None when interleaved. HEIGHT as conv2d; BLOCK: channel tiles over the largest
    divisor <= 8, rows over up to 8; WIDTH: channel tiles over the largest divisor <= 64. A row-major
    shard is as wide as the channels, a tiled one whole tiles."""
    if layout is ShardLayout.INTERLEAVED:
        return None
    if layout is ShardLayout.AUTO:
        layout = resolve_auto_shard(nhw, channels)
    if not tiled and layout is not ShardLayout.HEIGHT and channels % TILE:
        raise ValueError(
            f"{layout.value} sharding a row-major tensor needs channels in multiples of {TILE}, got {channels}"
        )
    width = round_up(channels, TILE) if tiled else channels
    if layout is ShardLayout.HEIGHT:
        cores, per_core = split_tiles(_tiles(nhw), MAX_CORES)
        return ShardGrid(layout, cores, 1, per_core * TILE, width)
    if layout is ShardLayout.BLOCK:
        rows, per_core = split_tiles(_tiles(nhw), GRID[1])
        cols = _largest_divisor(_tiles(channels), GRID[0])
        return ShardGrid(layout, rows, cols, per_core * TILE, width // cols)
    cores = _largest_divisor(_tiles(channels), MAX_CORES)
    return ShardGrid(layout, 1, cores, _tiles(nhw) * TILE, width // cores)


def pool_shard_grid(input_grid: ShardGrid, nhw_out: int) -> ShardGrid:
    """max_pool2d keeps its input's cores; its tiled output splits the rows evenly, in whole tiles."""
    rows = nhw_out if input_grid.layout is ShardLayout.WIDTH else -(-nhw_out // input_grid.row_cores)
    return dataclasses.replace(input_grid, shard_rows=round_up(rows, TILE))


def pool_input_grid(shard: ShardLayout, nhw_in: int, nhw_out: int, channels: int) -> ShardGrid:
    """How max_pool2d and avg_pool2d shard an interleaved input as the recipe's ``shard`` says (AUTO
    and INTERLEAVED: ``resolve_auto_shard`` of the input, as TtnnBackend asks ttnn): over the cores
    ``to_memory`` would give their output rows, each core taking its share of the input rows
    (counted in whole tiles, as the L1 and cost estimates count bytes).

    ttnn 0.81.1 sizes a pool's grid from its output shape, as conv2d does: its sliding-window ops split
    the output rows over the cores and give each the input rows they read. So a 27x27 input pooled
    2x2/2 to 14x14 (7 tiles of rows) runs on 7 cores, not the 23 its input rows would fill (measured
    in mock mode for HEIGHT, BLOCK and WIDTH, max and avg, ceil and floor; tests/test_generic_ops.py
    pins the cases against ttnn). ``pool_shard_grid`` of this grid gives back
    ``tensor_shard_grid(layout, nhw_out, channels)``.
    """
    layout = resolve_auto_shard(nhw_in, channels) if shard in (ShardLayout.AUTO, ShardLayout.INTERLEAVED) else shard
    by_output = tensor_shard_grid(layout, nhw_out, channels)
    return dataclasses.replace(by_output, shard_rows=round_up(-(-nhw_in // by_output.row_cores), TILE))


def grid_of(memory: MemorySpec) -> ShardGrid | None:
    """The ShardGrid a MemorySpec describes; None for an interleaved tensor."""
    if memory.layout is ShardLayout.INTERLEAVED or memory.shard_shape is None:
        return None
    rows, cols = memory.shard_shape
    if memory.layout is ShardLayout.BLOCK:
        return ShardGrid(memory.layout, memory.grid[1], memory.grid[0], rows, cols)
    if memory.layout is ShardLayout.WIDTH:
        return ShardGrid(memory.layout, 1, memory.num_cores, rows, cols)
    return ShardGrid(memory.layout, memory.num_cores, 1, rows, cols)


# -- per-core byte counts ------------------------------------------------------------------------


def tensor_bytes_per_core(grid: ShardGrid | None, nhw: int, channels: int, dtype: DType) -> int:
    """One core's share of a tiled tensor: its shard, or its pages of an interleaved L1 tensor (a
    row-major one takes at most as much)."""
    if grid is None:
        pages = _tiles(nhw) * _tiles(channels)
        return -(-pages // MAX_CORES) * TILE_BYTES[dtype]
    return _tiles(grid.shard_rows) * _tiles(grid.shard_cols) * TILE_BYTES[dtype]


def _halo_sticks(
    rows_out_per_core: int, w_out: int, kernel: tuple[int, int], stride: int, dilation: tuple[int, int], padded_w: int
) -> int:
    """Input sticks (pixels) one core gathers to compute ``rows_out_per_core`` outputs of a sliding
    window: the padded input rows its outputs span, plus the window's extra rows and columns."""
    span = -(-rows_out_per_core * stride * padded_w // w_out)
    return span + (kernel[0] - 1) * dilation[0] * padded_w + (kernel[1] - 1) * dilation[1] + 1


def resolve_conv_layout(spec: Conv2dSpec, nhw_in: int, cfg: OpConfig) -> ShardLayout:
    """The sharding a conv computes in: ``cfg.shard``, or for AUTO and INTERLEAVED (a conv always
    computes sharded) ``resolve_auto_shard`` of its input rows and channels, as TtnnBackend does."""
    if cfg.shard in (ShardLayout.AUTO, ShardLayout.INTERLEAVED):
        return resolve_auto_shard(nhw_in, spec.in_channels)
    return cfg.shard


def estimate_conv_l1(
    spec: Conv2dSpec, n: int, h: int, w: int, cfg: OpConfig, has_bias: bool = True
) -> tuple[int, dict[str, int]]:
    """Peak per-core L1 bytes of a sharded ttnn conv2d, and the buffers that make them up.

    Modelled on the circular buffers ttnn 0.81.1 allocates (read from its graph capture, matched within
    a few percent, docs/numerics.md). A conv with a window runs in two steps. The halo step turns the
    input shard into ``halo`` (input rows with their window context); the conv step holds the halo, its
    output shard, a weight block of one kernel row (kw * C_in per core x C_out per core; all kernel
    rows once the shard needs several act blocks) and the im2col block (act_block_h x kw * C_in) twice,
    row-major bfloat16 and tilized in the activation dtype. A 1x1 stride-1 conv is a matmul on the
    input shard. ``act_block_h`` None means ttnn's default, the whole output shard height.

    The partials buffer shares the output's memory when it has the output's dtype; ``packer_l1_acc``
    can give it a format (fp32 or bfloat16) and so a buffer of its own (the ``partials`` part).
    """
    h_out, w_out = spec.output_hw(h, w)
    nhw_out = n * h_out * w_out
    layout = resolve_conv_layout(spec, n * h * w, cfg)
    grid = conv_shard_grid(layout, spec, nhw_out, cfg.act_block_h)
    kh, kw = spec.kernel
    cin = round_up(spec.in_channels, STICK_ALIGN)
    # Off HEIGHT each core's input channels are whole tiles: a 32-channel input split over 2 block
    # columns still puts 32 channels, not 16, in every core's shard and halo (ttnn 0.81.1, mock mode).
    cin_core = cin if layout is ShardLayout.HEIGHT else round_up(-(-cin // grid.col_cores), TILE)
    cout_core = grid.shard_cols
    rows_in = n * h * w if layout is ShardLayout.WIDTH else -(-(n * h * w) // grid.row_cores)
    rows_out = nhw_out if layout is ShardLayout.WIDTH else grid.shard_rows
    act_rows = min(cfg.act_block_h or rows_out, rows_out)
    weight_tile, act_tile = TILE_BYTES[cfg.weight_dtype], TILE_BYTES[cfg.act_dtype]

    parts = {
        "input_shard": rows_in * cin_core * 2,
        "output_shard": _tiles(rows_out) * _tiles(cout_core) * act_tile,
        "bias": _tiles(cout_core) * weight_tile,
    }
    if is_matmul_conv(spec):
        # A matmul on the tiled input shard. Off HEIGHT, the inner dim is split over the grid columns:
        # each step multicasts a K block of activations and its weight rows, double-buffered when
        # there is more than one block. With fp32 accumulation the output shard is accumulated in
        # an fp32 buffer of its own (circular-buffer totals matched to the byte in mock mode; an
        # im2col conv needs none).
        parts["input_shard"] = _tiles(rows_in) * _tiles(cin_core) * act_tile
        weights = _tiles(cin_core) * _tiles(cout_core) * weight_tile
        if layout is ShardLayout.HEIGHT:
            parts["weights"] = weights
        else:
            buffers = 2 if grid.col_cores > 1 else 1
            parts["weights"] = buffers * weights
            parts["act_mcast"] = buffers * _tiles(act_rows) * _tiles(cin_core) * act_tile
        k_blocks = grid.col_cores if layout is ShardLayout.BLOCK else 1
        partials = partials_dtype(True, cfg, packer_l1_acc_active(cfg.packer_l1_acc, has_bias, k_blocks))
        if partials is not cfg.act_dtype:
            parts["partials"] = _tiles(rows_out) * _tiles(cout_core) * TILE_BYTES[partials]
        return sum(parts.values()), parts

    block_width = round_up(kw * cin_core, TILE)  # one kernel row of the im2col matrix
    kernel_rows = kh if -(-rows_out // act_rows) > 1 else 1
    padded_w = w + 2 * spec.padding[1]
    sticks = _halo_sticks(rows_out, w_out, spec.kernel, spec.stride[0], spec.dilation, padded_w)
    parts["halo"] = min(sticks, n * (h + 2 * spec.padding[0]) * padded_w) * cin_core * 2
    parts["weights"] = kernel_rows * _tiles(block_width) * _tiles(cout_core) * weight_tile
    parts["act_row_major"] = act_rows * block_width * 2
    parts["act_tilized"] = _tiles(act_rows) * _tiles(block_width) * act_tile
    k_blocks = kh * grid.col_cores if layout is ShardLayout.BLOCK else (grid.num_cores if layout is ShardLayout.WIDTH
                                                                         else kh)
    partials = partials_dtype(False, cfg, packer_l1_acc_active(cfg.packer_l1_acc, has_bias, k_blocks))
    if partials is not cfg.act_dtype:
        parts["partials"] = _tiles(rows_out) * _tiles(cout_core) * TILE_BYTES[partials]
    halo_step = parts["input_shard"] + parts["halo"]
    return max(halo_step, sum(parts.values()) - parts["input_shard"]), parts


def estimate_pool_l1(
    spec: Pool2dSpec, n: int, h: int, w: int, channels: int, grid: ShardGrid, cfg: OpConfig
) -> tuple[int, dict[str, int]]:
    """Per-core L1 of ttnn.max_pool2d: the input shard, its halo (the window's extra rows) and the
    output shard."""
    h_out, w_out = spec.output_hw(h, w)
    out_grid = pool_shard_grid(grid, n * h_out * w_out)
    width = round_up(grid.shard_cols, STICK_ALIGN)
    padded_w = w + 2 * spec.padding[1]
    sticks = _halo_sticks(out_grid.shard_rows, w_out, spec.kernel, spec.stride[0], spec.dilation, padded_w)
    parts = {
        "input_shard": tensor_bytes_per_core(grid, n * h * w, channels, cfg.act_dtype),
        "halo": min(sticks, n * (h + 2 * spec.padding[0]) * padded_w) * width * 2,
        "output_shard": tensor_bytes_per_core(out_grid, n * h_out * w_out, channels, cfg.act_dtype),
    }
    return sum(parts.values()), parts


def estimate_eltwise_l1(
    nhw: int, channels: int, num_inputs: int, grid: ShardGrid | None, cfg: OpConfig
) -> tuple[int, dict[str, int]]:
    """Per-core L1 of an elementwise op (add, multiply, activation): its inputs and output."""
    share = tensor_bytes_per_core(grid, nhw, channels, cfg.act_dtype)
    parts = {"inputs": num_inputs * share, "output": share}
    return sum(parts.values()), parts


def estimate_concat_l1(
    nhw: int, channels: list[int], grids: list[ShardGrid | None], out_grid: ShardGrid | None, cfg: OpConfig
) -> tuple[int, dict[str, int]]:
    """Per-core L1 of a channel concat: every input's share plus the output's."""
    parts = {
        "inputs": sum(tensor_bytes_per_core(g, nhw, c, cfg.act_dtype) for g, c in zip(grids, channels)),
        "output": tensor_bytes_per_core(out_grid, nhw, sum(channels), cfg.act_dtype),
    }
    return sum(parts.values()), parts


def estimate_upsample_l1(nhw: int, channels: int, scale: int, cfg: OpConfig) -> tuple[int, dict[str, int]]:
    """Per-core L1 of a nearest upsample of an L1-interleaved row-major image and its tiled output."""
    parts = {
        "input": tensor_bytes_per_core(None, nhw, channels, DType.BF16),
        "output": tensor_bytes_per_core(None, nhw * scale * scale, channels, cfg.act_dtype),
    }
    return sum(parts.values()), parts


def resident_bytes_per_core(t: DeviceTensor) -> int:
    """The L1 one core gives to a live device tensor: its shard, or its share of an interleaved
    tensor's pages (a tile each when tiled, a pixel's channels when row-major) over the 64 banks."""
    if t.memory.buffer != "L1":
        return 0
    grid = grid_of(t.memory)
    if t.layout is Layout.TILE:
        return tensor_bytes_per_core(grid, t.nhw, t.c, t.dtype)
    element = ELEMENT_BYTES[t.dtype]
    if grid is not None:
        return grid.shard_rows * round_up(grid.shard_cols * element, L1_ALIGNMENT)
    return -(-t.nhw // MAX_CORES) * round_up(t.c * element, L1_ALIGNMENT)


class ResidentTensors:
    """The device tensors alive now and the L1 each holds on every core, so that an op's estimate
    can count what other layers' outputs already occupy (a CSP bypass, a skip connection).

    A tensor leaves the set when its last Python reference goes, as ttnn frees a buffer when its
    Tensor is destroyed (the converted graph drops each value after its last reader), or when an
    op frees it (``deallocate``). Fragmentation is not modelled: ttnn can fail a layer whose total
    fits when the free L1 is split into holes.
    """

    def __init__(self) -> None:
        self._bytes: dict[int, tuple[weakref.ref, int]] = {}

    def add(self, t: DeviceTensor) -> DeviceTensor:
        key = id(t)
        if key not in self._bytes:
            self._bytes[key] = (weakref.ref(t, lambda _, key=key: self._bytes.pop(key, None)),
                                resident_bytes_per_core(t))
        return t

    def discard(self, t: DeviceTensor) -> None:
        self._bytes.pop(id(t), None)

    def bytes_besides(self, inputs: Iterable[DeviceTensor]) -> int:
        """Per-core L1 of the live tensors other than ``inputs`` (an op's estimate counts those)."""
        skip = {id(t) for t in inputs}
        return sum(size for key, (_, size) in self._bytes.items() if key not in skip)


def check_l1(layer: str, estimate: tuple[int, dict[str, int]], resident: int = 0) -> None:
    """Raise ``L1BudgetError`` naming the layer and its largest buffers if the estimate, on top of
    ``resident`` bytes per core already held by other live tensors, does not fit."""
    needed, parts = estimate
    if resident:
        needed, parts = needed + resident, {**parts, "other live tensors": resident}
    if needed > L1_ALLOCATABLE_BYTES:
        detail = ", ".join(f"{name} {size:,} B" for name, size in sorted(parts.items(), key=lambda kv: -kv[1]))
        raise L1BudgetError(layer, needed, L1_ALLOCATABLE_BYTES, detail)
