"""The op layer on the real TT-NN library (ttnn 0.81.1): on a Tenstorrent device, or without one in
mock mode, where every op is validated and dispatched exactly as on hardware but nothing is computed
(results read back as zeros). See :mod:`ttswap.mock`.

Behaviour the emulated backend mirrors, as measured against ttnn 0.81.1:

* **dtypes.** Every compute op writes ``cfg.act_dtype``; ``activation``, ``to_memory`` and
  ``to_layout`` keep their input's dtype (``to_layout`` to row-major turns bfloat8_b into bf16, as
  ttnn does). Conv bias is quantised like the weights (``cfg.weight_dtype``); linear bias stays bf16.
  ``upload`` gives row-major tensors, except bfloat8_b which only exists tiled.
* **memory.** conv2d shards its output with ``cfg.shard`` (AUTO and INTERLEAVED resolved by
  :func:`ttswap.config.resolve_auto_shard` from the input's N*H*W and in_channels), resharding a
  sharded input laid out otherwise. max_pool2d and avg_pool2d keep a sharded input's layout and grid
  (an interleaved input ttnn shards as ``cfg.shard`` says, over the cores its output rows need).
  concat stays sharded when all inputs share one height- or block-sharded grid and shard height,
  else goes through L1 interleaved. add and multiply place their output like their first input.
  upsample, mean and linear produce L1-interleaved tensors. Then, for every op, an explicit HEIGHT /
  BLOCK / WIDTH / INTERLEAVED in ``cfg.shard`` moves the output there (see :func:`sharded_memory_config`); AUTO keeps what the op produced.
  Outputs are tiled (pools and upsample included) except where ``to_layout`` says otherwise.
* **activations.** Fused into conv2d: :data:`CONV_FUSED_ACTIVATIONS`; into add:
  :data:`ELTWISE_FUSED_ACTIVATIONS`. Others run as a separate op after it, in place on its output
  (``output_tensor=``), so that they take no second buffer. Mish fuses into neither
  ("Undefined non-parametrized op type"); leaky_relu and hardswish are refused by the matmul path
  that 1x1 convs take ("Unsupported UnaryOpType for fused activation").
* **math.** conv2d, linear and mean run with ``cfg.fidelity`` and ``cfg.fp32_acc``; SFPU
  approximations are off everywhere (``math_approx_mode=False``, ttnn's accurate unary variants).
"""

from __future__ import annotations

import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import ttnn

from ttswap.backends.device import tenstorrent_device_present
from ttswap.backends.base import (
    CONV_FUSED_ACTIVATIONS,
    ELTWISE_FUSED_ACTIVATIONS,
    GRID,
    TILE,
    Backend,
    DeviceTensor,
    L1BudgetError,
    MemorySpec,
    mesh_shape,
)
from ttswap.backends.base import largest_divisor as _largest_divisor  # one definition, in base
from ttswap.config import (
    Activation,
    Conv2dSpec,
    DType,
    Fidelity,
    Layout,
    OpConfig,
    Pool2dSpec,
    ShardLayout,
    resolve_auto_shard,
)

# L1 reserved for conv and pool's small config tensors (halo and reader indices).
L1_SMALL_SIZE = 32768


_DTYPES = {DType.BF16: ttnn.bfloat16, DType.BFP8_B: ttnn.bfloat8_b, DType.FLOAT32: ttnn.float32}
_DTYPE_NAMES = {ttnn_type: ours for ours, ttnn_type in _DTYPES.items()}
_FIDELITIES = {
    Fidelity.LOFI: ttnn.MathFidelity.LoFi,
    Fidelity.HIFI2: ttnn.MathFidelity.HiFi2,
    Fidelity.HIFI3: ttnn.MathFidelity.HiFi3,
    Fidelity.HIFI4: ttnn.MathFidelity.HiFi4,
}
_LAYOUTS = {Layout.TILE: ttnn.TILE_LAYOUT, Layout.ROW_MAJOR: ttnn.ROW_MAJOR_LAYOUT}
_MEMORY_LAYOUTS = {
    ShardLayout.HEIGHT: ttnn.TensorMemoryLayout.HEIGHT_SHARDED,
    ShardLayout.BLOCK: ttnn.TensorMemoryLayout.BLOCK_SHARDED,
    ShardLayout.WIDTH: ttnn.TensorMemoryLayout.WIDTH_SHARDED,
    ShardLayout.INTERLEAVED: ttnn.TensorMemoryLayout.INTERLEAVED,
}
_SHARD_LAYOUT_OF = {ttnn_layout: ours for ours, ttnn_layout in _MEMORY_LAYOUTS.items()}
_UNARY_OPS = {
    "relu": ttnn.UnaryOpType.RELU,
    "relu6": ttnn.UnaryOpType.RELU6,
    "silu": ttnn.UnaryOpType.SILU,
    "sigmoid": ttnn.UnaryOpType.SIGMOID,
    "hardsigmoid": ttnn.UnaryOpType.HARDSIGMOID,
    "hardswish": ttnn.UnaryOpType.HARDSWISH,
    "gelu": ttnn.UnaryOpType.GELU,
    "leaky_relu": ttnn.UnaryOpType.LEAKY_RELU,
}


class TtnnOpError(RuntimeError):
    """A ttnn op rejected a layer's tensors or configuration."""

    def __init__(self, layer: str, op: str, original: str):
        self.layer, self.op, self.original = layer, op, original
        super().__init__(f"layer {layer!r}: ttnn {op} failed: {original}")


def _message(error: Exception) -> str:
    """The human part of a tt-metal exception, without its location line and C++ backtrace."""
    text = str(error)
    if "info:" in text:
        text = text.split("info:", 1)[1]
    return text.split("backtrace:", 1)[0].strip()


# The three ways tt-metal reports that a layer's buffers do not fit one core's L1, with the numbers
# for L1BudgetError's "needed" and "available".
_L1_OVERFLOWS = (
    # circular (a.k.a. dataflow) buffers alone exceed L1
    re.compile(r"grow to (?P<needed>\d+) B which is beyond max L1 size of (?P<available>\d+) B"),
    # circular buffers run into tensors already allocated in L1
    re.compile(
        r"L1 buffer allocated at (?P<available>\d+) and static (circular|dataflow) buffer region ends at (?P<needed>\d+)"
    ),
    # a sharded tensor does not fit the free L1
    re.compile(r"B L1 buffer .*each bank needs to store (?P<needed>\d+) B, but bank size is (?P<available>\d+) B"),
)


def _translate(layer: str, op: str, error: Exception) -> Exception:
    message = _message(error)
    for pattern in _L1_OVERFLOWS:
        found = pattern.search(message)
        if found:
            return L1BudgetError(layer, int(found["needed"]), int(found["available"]), f"ttnn {op}: {message}")
    return TtnnOpError(layer, op, message)


@contextmanager
def _ttnn_errors(layer: str, op: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:
        raise _translate(layer, op, error) from error


def memory_spec_of(tensor: ttnn.Tensor) -> MemorySpec:
    """Where a ttnn tensor lives, read back from its memory config."""
    config = tensor.memory_config()
    buffer = "DRAM" if config.buffer_type == ttnn.BufferType.DRAM else "L1"
    layout = _SHARD_LAYOUT_OF[config.memory_layout]
    shard = config.shard_spec
    if shard is None:
        return MemorySpec(layout=layout, buffer=buffer)
    box = shard.grid.bounding_box()
    return MemorySpec(
        layout=layout,
        buffer=buffer,
        grid=(box.end.x - box.start.x + 1, box.end.y - box.start.y + 1),
        num_cores=shard.num_cores(),
        shard_shape=(int(shard.shape[0]), int(shard.shape[1])),
    )


def sharded_memory_config(nhw: int, channels: int, layout: ShardLayout, tiled: bool = True,
                          grid: tuple[int, int] = GRID) -> ttnn.MemoryConfig:
    """The L1 shard spec ``to_memory`` gives an [1,1,nhw,channels] tensor on a ``grid`` (x, y) of
    cores (the device's: 8x8 on an n150), modelled on the specs conv2d picks (which match these for
    HEIGHT and WIDTH; for BLOCK conv2d sometimes uses fewer columns):

    * HEIGHT: whole tile-rows, as few per core as the grid's cores allow; cores filled row by row.
    * BLOCK: channel tiles split over the largest x <= grid x that divides them, tile-rows over up to grid y.
    * WIDTH: channel tiles over the largest core count within the grid that divides them, all rows on each.
    """
    tile_rows = -(-nhw // TILE)
    channel_tiles = -(-channels // TILE)
    width = channel_tiles * TILE if tiled else channels
    if not tiled and layout is not ShardLayout.HEIGHT and channels % TILE:
        raise ValueError(
            f"{layout.value} sharding a row-major tensor needs channels in multiples of {TILE}, got {channels}"
        )
    grid_x, grid_y = grid
    if layout is ShardLayout.HEIGHT:
        per_core = -(-tile_rows // (grid_x * grid_y))
        cores = -(-tile_rows // per_core)
        shape, core_grid = (per_core * TILE, width), _row_wise_cores(cores, grid)
    elif layout is ShardLayout.BLOCK:
        x = _largest_divisor(channel_tiles, grid_x)
        per_core = -(-tile_rows // grid_y)
        y = -(-tile_rows // per_core)
        core_grid = ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(x - 1, y - 1))})
        shape = (per_core * TILE, width // x)
    elif layout is ShardLayout.WIDTH:
        cores = _largest_divisor(channel_tiles, grid_x * grid_y)
        shape, core_grid = (tile_rows * TILE, width // cores), _row_wise_cores(cores, grid)
    else:
        raise ValueError(f"not a sharded layout: {layout}")
    spec = ttnn.ShardSpec(core_grid, shape, ttnn.ShardOrientation.ROW_MAJOR)
    return ttnn.MemoryConfig(_MEMORY_LAYOUTS[layout], ttnn.BufferType.L1, spec)


def _placement(memory: MemorySpec) -> tuple:
    """What sharded tensors must share to be concatenated in place: all but the shard width."""
    return memory.layout, memory.grid, memory.num_cores, memory.shard_shape and memory.shard_shape[0]


def _row_wise_cores(count: int, grid: tuple[int, int] = GRID) -> ttnn.CoreRangeSet:
    return ttnn.num_cores_to_corerangeset(count, ttnn.CoreCoord(*grid), True)


def _fused(act: Activation) -> ttnn.UnaryWithParam:
    if act.kind == "leaky_relu":
        return ttnn.UnaryWithParam(ttnn.UnaryOpType.LEAKY_RELU, act.param)
    if act.kind == "gelu":
        return ttnn.UnaryWithParam(ttnn.UnaryOpType.GELU, 0.0)  # 0: the accurate variant, not the LUT
    return ttnn.UnaryWithParam(_UNARY_OPS[act.kind])


def _compute_config(cfg: OpConfig) -> ttnn.WormholeComputeKernelConfig:
    return ttnn.WormholeComputeKernelConfig(
        math_fidelity=_FIDELITIES[cfg.fidelity],
        math_approx_mode=False,
        fp32_dest_acc_en=cfg.fp32_acc,
        packer_l1_acc=cfg.packer_l1_acc,
    )


@dataclass
class PreparedConv:
    """Host weights, plus the device weights the first conv2d call prepared, keyed by what their
    layout depends on (input geometry and placement, and the op config)."""

    weight: ttnn.Tensor  # fp32, row-major, on the host
    bias: ttnn.Tensor | None
    device_key: tuple | None = None
    device_weights: tuple[ttnn.Tensor, ttnn.Tensor | None] | None = field(default=None, repr=False)


@dataclass
class PreparedLinear:
    weight: ttnn.Tensor  # [in, out], tiled, on the device
    bias: ttnn.Tensor | None
    out_features: int


# DRAM kept for captured traces (ttswap.pipeline): tt-metal's YOLOv4 end-to-end test opens its
# device with 6,434,816 B; 32 MiB leaves room for larger models at no cost in L1.
TRACE_REGION_SIZE = 32 << 20
COMMAND_QUEUES = 2  # the second uploads the next input while the first computes (ttswap.pipeline)

log = logging.getLogger("ttswap")

# One device per process: opening a second one while the first is open leaves tt-metal unusable.
_device: Any = None
_device_users = 0
_device_mesh: tuple[int, int] | None = None
_device_queues = 1


def _open_options(mesh: tuple[int, int]) -> tuple[int, Any]:
    """Command queues and dispatch cores to open ``mesh`` with: on hardware two queues and tt-metal's
    default dispatch. In mock mode one queue (events crash there, so a second is never used) and, on a
    multi-chip board, dispatch on a worker row (see ttswap.mock: with ethernet dispatch ttnn's own ops
    fail on a mock n300)."""
    if not os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"):
        return COMMAND_QUEUES, None
    from ttswap.mock import current_board

    board = current_board()
    if mesh == (1, 1) and (board is None or board.chips == 1):
        return 1, None
    kind = ttnn.DispatchCoreType.ETH if board and board.dispatch == "ethernet" else ttnn.DispatchCoreType.WORKER
    return 1, ttnn.DispatchCoreConfig(kind, ttnn.DispatchCoreAxis.ROW)


def _acquire_device(mesh: tuple[int, int] = (1, 1)) -> Any:
    global _device, _device_users, _device_mesh, _device_queues
    if _device is None:
        queues, dispatch = _open_options(mesh)
        options = dict(l1_small_size=L1_SMALL_SIZE, trace_region_size=TRACE_REGION_SIZE, num_command_queues=queues)
        if dispatch is None and mesh == (1, 1):
            _device = ttnn.open_device(device_id=0, **options)
        else:
            _device = ttnn.open_mesh_device(ttnn.MeshShape(*mesh), dispatch_core_config=dispatch, **options)
        _device_mesh, _device_queues = mesh, queues
        size = _device.compute_with_storage_grid_size()
        if (size.x, size.y) != GRID:
            log.info("ttnn device grid %dx%d per chip (recipes assume %dx%d): shard grids are chosen within it",
                     size.x, size.y, *GRID)
    elif mesh != _device_mesh:
        raise RuntimeError(f"a ttnn device is already open in this process as mesh {_device_mesh}, and mesh {mesh} "
                           "was asked for; one device per process: close the other conversions first")
    _device_users += 1
    return _device


def _release_device() -> None:
    global _device, _device_users, _device_mesh
    _device_users -= 1
    if _device_users == 0:
        if _device_mesh == (1, 1):
            ttnn.close_device(_device)
        else:
            ttnn.close_mesh_device(_device)
        _device, _device_mesh = None, None


class TtnnBackend(Backend):
    """ttnn on device 0, opened on first use and shared by all instances in the process. Without a
    Tenstorrent device it prepares and uses mock mode; ``mock`` says whether results are real.

    Every ttnn call of the op methods goes through ``self.ttnn``: the ttnn module here, a namespace of
    ttnn's CPU reference functions in :class:`ttswap.backends.golden.GoldenBackend`, which inherits all
    of this code and swaps only that attribute (and the device)."""

    name = "ttnn"

    def __init__(self, mesh: tuple[int, int] | None = None) -> None:
        # data parallel over a mesh of chips: the batch sharded, weights replicated, outputs gathered
        self.mesh = mesh_shape(mesh)
        self._grid: tuple[int, int] | None = None
        if not tenstorrent_device_present():
            from ttswap.mock import ensure_mock_mode

            ensure_mock_mode()
        # tt-metal mocks the device whenever this is set: by ensure_mock_mode, or by the user
        self.mock = bool(os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"))
        self._device: Any = None
        self.ttnn: Any = ttnn  # what the ops call: the library itself

    @property
    def device(self) -> Any:
        """The device (a mesh device for a mesh), opened on first use."""
        if self._device is None:
            self._device = _acquire_device(self.mesh)
        return self._device

    @property
    def grid(self) -> tuple[int, int]:
        """Each chip's worker grid (x, y), as the device reports it: 8x8 on an n150, 8x7 on a mock n300."""
        if getattr(self, "_grid", None) is None:
            size = getattr(self.device, "compute_with_storage_grid_size", None)
            self._grid = (size().x, size().y) if size is not None else GRID
        return self._grid

    @property
    def command_queues(self) -> int:
        """The command queues the device was opened with (ttswap.pipeline uses a second one)."""
        self.device
        return _device_queues

    # The mesh mappers are ttnn's own (never self.ttnn's): only a real device, or mock mode, has a mesh.
    def _batch_split(self) -> dict[str, Any]:
        """from_torch's arguments that shard [1, 1, N*H*W, C] rows over the mesh, whole images per chip."""
        return {"mesh_mapper": ttnn.ShardTensorToMesh(self.device, dim=2)} if self.chips > 1 else {}

    def _replicated(self) -> dict[str, Any]:
        """from_torch's arguments that put a weight on every chip of the mesh."""
        return {"mesh_mapper": ttnn.ReplicateTensorToMesh(self.device)} if self.chips > 1 else {}

    def host_tensor(self, x: torch.Tensor, like: DeviceTensor) -> Any:
        """``x`` as the host tensor an upload would write, laid out like ``like`` (for a persistent
        input buffer: ttswap.pipeline)."""
        n, c, h, w = x.shape
        rows = x.detach().float().permute(0, 2, 3, 1).reshape(1, 1, n * h * w, c).contiguous()
        return self.ttnn.from_torch(rows, dtype=like.payload.dtype, layout=like.payload.layout, **self._batch_split())

    def close(self) -> None:
        if self._device is not None:
            self._device = None
            _release_device()

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _check_allocated(layer: str, *tensors: DeviceTensor) -> None:
        # ttnn segfaults, rather than raising, on a freed input
        for t in tensors:
            if not t.payload.is_allocated():
                raise TtnnOpError(
                    layer, "input check", f"input {t.describe()} was already freed by an earlier op run with "
                    "deallocate=True; set deallocate=False on the ops whose input is used again",
                )

    def _wrap(self, tensor: ttnn.Tensor, n: int, h: int, w: int, c: int, layer: str) -> DeviceTensor:
        shape = tuple(tensor.shape)
        if shape != (1, 1, n * h * w, c):
            expected = f"(1, 1, {n * h * w}, {c}) for [{n},{h},{w},{c}]"
            raise TtnnOpError(layer, "result", f"expected shape {expected}, got {shape}")
        layout = Layout.TILE if tensor.layout == self.ttnn.TILE_LAYOUT else Layout.ROW_MAJOR
        return DeviceTensor(tensor, n, h, w, c, _DTYPE_NAMES[tensor.dtype], layout, memory_spec_of(tensor))

    def _place(self, tensor: ttnn.Tensor, n: int, h: int, w: int, c: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        """Move an op's output where ``cfg.shard`` asks (AUTO: where the op put it) and wrap it."""
        result = self._wrap(tensor, n, h, w, c, layer)
        if cfg.shard is ShardLayout.AUTO or result.memory.layout is cfg.shard:
            return result
        return self.to_memory(result, cfg.shard, layer)

    def _as_dtype(self, tensor: ttnn.Tensor, dtype: DType) -> ttnn.Tensor:
        wanted = _DTYPES[dtype]
        return tensor if tensor.dtype == wanted else self.ttnn.typecast(tensor, wanted)

    def _interleaved(self, tensor: ttnn.Tensor) -> ttnn.Tensor:
        if tensor.memory_config().memory_layout == self.ttnn.TensorMemoryLayout.INTERLEAVED:
            return tensor
        return self.ttnn.sharded_to_interleaved(tensor, self.ttnn.L1_MEMORY_CONFIG)

    def _tiled(self, tensor: ttnn.Tensor) -> ttnn.Tensor:
        return tensor if tensor.layout == self.ttnn.TILE_LAYOUT else self.ttnn.to_layout(tensor, self.ttnn.TILE_LAYOUT)

    def _row_major(self, tensor: ttnn.Tensor) -> ttnn.Tensor:
        if tensor.layout == self.ttnn.ROW_MAJOR_LAYOUT:
            return tensor
        return self.ttnn.to_layout(tensor, self.ttnn.ROW_MAJOR_LAYOUT)

    # -- transfers -----------------------------------------------------------------------------
    def upload(self, x: torch.Tensor, cfg: OpConfig, layer: str = "input") -> DeviceTensor:
        n, c, h, w = x.shape
        per_chip = self.check_batch(n, layer)
        rows = x.detach().float().permute(0, 2, 3, 1).reshape(1, 1, n * h * w, c).contiguous()
        layout = self.ttnn.TILE_LAYOUT if cfg.act_dtype is DType.BFP8_B else self.ttnn.ROW_MAJOR_LAYOUT
        with _ttnn_errors(layer, "from_torch"):
            tensor = self.ttnn.from_torch(
                rows, dtype=_DTYPES[cfg.act_dtype], layout=layout, device=self.device,
                memory_config=self.ttnn.L1_MEMORY_CONFIG, **self._batch_split(),
            )
        return self._wrap(tensor, per_chip, h, w, c, layer)

    def download(self, t: DeviceTensor, layer: str = "output") -> torch.Tensor:
        self._check_allocated(layer, t)
        with _ttnn_errors(layer, "to_torch"):
            gather = {"mesh_composer": ttnn.ConcatMeshToTensor(self.device, dim=2)} if self.chips > 1 else {}
            rows = self.ttnn.to_torch(t.payload, **gather)
        # one block of rows per chip, each cut to its images (tile padding dropped)
        rows = rows.reshape(self.chips, -1, rows.shape[-1])[:, : t.nhw, : t.c].float()
        return rows.reshape(t.n * self.chips, t.h, t.w, t.c).permute(0, 3, 1, 2).contiguous()

    # -- weights -------------------------------------------------------------------------------
    def prepare_conv(
        self, weight: torch.Tensor, bias: torch.Tensor | None, spec: Conv2dSpec, cfg: OpConfig, layer: str
    ) -> PreparedConv:
        # conv2d takes fp32 row-major host weights and prepares (tilizes, quantises) them on its
        # first call, for the input placement it meets there
        with _ttnn_errors(layer, "from_torch"):
            host_weight = self.ttnn.from_torch(weight.detach().float().contiguous(), dtype=self.ttnn.float32,
                                               **self._replicated())
            host_bias = None
            if bias is not None:
                host_bias = self.ttnn.from_torch(bias.detach().float().reshape(1, 1, 1, -1), dtype=self.ttnn.float32,
                                                 **self._replicated())
        return PreparedConv(host_weight, host_bias)

    def prepare_linear(
        self, weight: torch.Tensor, bias: torch.Tensor | None, cfg: OpConfig, layer: str
    ) -> PreparedLinear:
        out_features = weight.shape[0]
        with _ttnn_errors(layer, "from_torch"):
            device_weight = self.ttnn.from_torch(
                weight.detach().float().t().contiguous(), dtype=_DTYPES[cfg.weight_dtype],
                layout=self.ttnn.TILE_LAYOUT, device=self.device, **self._replicated(),
            )
            device_bias = None
            if bias is not None:
                device_bias = self.ttnn.from_torch(
                    bias.detach().float().reshape(1, -1), dtype=self.ttnn.bfloat16, layout=self.ttnn.TILE_LAYOUT,
                    device=self.device, **self._replicated(),
                )
        return PreparedLinear(device_weight, device_bias, out_features)

    # -- compute -------------------------------------------------------------------------------
    def conv2d(
        self,
        x: DeviceTensor,
        weights: PreparedConv,
        spec: Conv2dSpec,
        cfg: OpConfig,
        layer: str,
        activation: Activation | None = None,
    ) -> DeviceTensor:
        self._check_allocated(layer, x)
        shard = cfg.shard
        if shard in (ShardLayout.AUTO, ShardLayout.INTERLEAVED):
            shard = resolve_auto_shard(x.nhw, spec.in_channels)
        fused = activation is not None and activation.kind in CONV_FUSED_ACTIVATIONS
        conv_config = self.ttnn.Conv2dConfig(
            weights_dtype=_DTYPES[cfg.weight_dtype],
            shard_layout=_MEMORY_LAYOUTS[shard],
            # so that a sharded input laid out otherwise is resharded to the requested layout
            reshard_if_not_optimal=True,
            deallocate_activation=cfg.deallocate,
            act_block_h_override=cfg.act_block_h or 0,
        )
        if fused:
            conv_config.activation = _fused(activation)
        key = (x.n, x.h, x.w, x.dtype, x.layout, x.memory, cfg)
        weight, bias = weights.weight, weights.bias
        if weights.device_key == key:
            weight, bias = weights.device_weights
        with _ttnn_errors(layer, "conv2d"):
            out, device_weights = self.ttnn.conv2d(
                input_tensor=x.payload,
                weight_tensor=weight,
                bias_tensor=bias,
                device=self.device,
                in_channels=spec.in_channels,
                out_channels=spec.out_channels,
                batch_size=x.n,
                input_height=x.h,
                input_width=x.w,
                kernel_size=spec.kernel,
                stride=spec.stride,
                padding=spec.padding,
                dilation=spec.dilation,
                groups=spec.groups,
                dtype=_DTYPES[cfg.act_dtype],
                conv_config=conv_config,
                compute_config=_compute_config(cfg),
                return_weights_and_bias=True,
            )
        weights.device_key, weights.device_weights = key, tuple(device_weights)
        out_h, out_w = spec.output_hw(x.h, x.w)
        result = self._place(out, x.n, out_h, out_w, spec.out_channels, cfg, layer)
        if activation is not None and not fused:
            result = self._activate(result, activation, cfg, layer, in_place=True)
        return result

    @staticmethod
    def _pool_shard_scheme(x: DeviceTensor, cfg: OpConfig) -> Any:
        """Pools work on their input's shards; an interleaved input they shard as ``cfg.shard`` says
        (AUTO and INTERLEAVED: by ``resolve_auto_shard``)."""
        if x.memory.layout is not ShardLayout.INTERLEAVED:
            return None
        scheme = cfg.shard
        if scheme in (ShardLayout.AUTO, ShardLayout.INTERLEAVED):
            scheme = resolve_auto_shard(x.nhw, x.c)
        return _MEMORY_LAYOUTS[scheme]

    def max_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._pool(self.ttnn.max_pool2d, "max_pool2d", x, spec, cfg, layer, dilation=list(spec.dilation))

    def avg_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str, count_include_pad: bool = True,
                   divisor_override: int | None = None) -> DeviceTensor:
        if spec.dilation != (1, 1):
            raise ValueError(f"layer {layer!r}: avg_pool2d has no dilation, got {spec.dilation}")
        return self._pool(self.ttnn.avg_pool2d, "avg_pool2d", x, spec, cfg, layer, count_include_pad=count_include_pad,
                          divisor_override=divisor_override, compute_kernel_config=_compute_config(cfg))

    def _pool(self, op, name: str, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str, **extra) -> DeviceTensor:
        """The arguments and output placement ttnn's max and average pools share."""
        self._check_allocated(layer, x)
        with _ttnn_errors(layer, name):
            out = op(
                input_tensor=x.payload,
                batch_size=x.n,
                input_h=x.h,
                input_w=x.w,
                channels=x.c,
                kernel_size=list(spec.kernel),
                stride=list(spec.stride),
                padding=list(spec.padding),
                ceil_mode=spec.ceil_mode,
                applied_shard_scheme=self._pool_shard_scheme(x, cfg),
                dtype=_DTYPES[cfg.act_dtype],
                output_layout=self.ttnn.TILE_LAYOUT,
                **extra,
            )
        out_h, out_w = spec.output_hw(x.h, x.w)
        return self._place(out, x.n, out_h, out_w, x.c, cfg, layer)

    def upsample_nearest(self, x: DeviceTensor, scale: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        # ttnn.upsample wants [N,H,W,C] row-major. It accepts height-sharded input too, but whether
        # its shards must hold whole image rows is unverified, so it runs interleaved.
        self._check_allocated(layer, x)
        out_h, out_w = x.h * scale, x.w * scale
        with _ttnn_errors(layer, "upsample"):
            image = self.ttnn.reshape(self._row_major(self._interleaved(x.payload)), (x.n, x.h, x.w, x.c))
            image = self.ttnn.upsample(image, scale, mode="nearest", memory_config=self.ttnn.L1_MEMORY_CONFIG)
            rows = self.ttnn.reshape(image, (1, 1, x.n * out_h * out_w, x.c))
            out = self.ttnn.to_layout(rows, self.ttnn.TILE_LAYOUT, dtype=_DTYPES[cfg.act_dtype])
        return self._place(out, x.n, out_h, out_w, x.c, cfg, layer)

    def concat(self, xs: Sequence[DeviceTensor], cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_allocated(layer, *xs)
        first = xs[0]
        if any((t.n, t.h, t.w) != (first.n, first.h, first.w) for t in xs):
            shapes = ", ".join(f"[{t.n},{t.h},{t.w},{t.c}]" for t in xs)
            raise ValueError(f"layer {layer!r}: concat needs equal N, H, W; got {shapes}")
        channels = sum(t.c for t in xs)
        with _ttnn_errors(layer, "concat"):
            out = self._sharded_concat(xs, cfg)
            if out is None:
                parts = [self._as_dtype(self._tiled(self._interleaved(t.payload)), cfg.act_dtype) for t in xs]
                # ttnn concats ragged channel counts row-major, which hands back bf16
                out = self.ttnn.concat(parts, dim=3, memory_config=self.ttnn.L1_MEMORY_CONFIG)
                out = self._as_dtype(out, cfg.act_dtype)
        return self._place(out, first.n, first.h, first.w, channels, cfg, layer)

    def _sharded_concat(self, xs: Sequence[DeviceTensor], cfg: OpConfig) -> ttnn.Tensor | None:
        """Concat without leaving the cores, when every input is sharded alike (same layout, grid and
        shard height): height-sharded, or block-sharded without channel padding. None otherwise."""
        first = xs[0].memory
        if first.shard_shape is None or any(_placement(t.memory) != _placement(first) for t in xs):
            return None
        channels = sum(t.c for t in xs)
        if first.layout is ShardLayout.BLOCK:
            columns = first.grid[0]
            if any(t.layout is not Layout.TILE or t.c % (TILE * columns) for t in xs):
                return None
            parts = [self._as_dtype(t.payload, cfg.act_dtype) for t in xs]
            width = channels // columns
        elif first.layout is ShardLayout.HEIGHT:
            width = channels
            if all(t.layout is Layout.TILE and t.c % TILE == 0 for t in xs):
                parts = [self._as_dtype(t.payload, cfg.act_dtype) for t in xs]
            elif channels % TILE == 0:
                # tiled shards hold whole 32-channel tiles, so ragged channel counts concat row-major
                # (where bfloat8_b does not exist) and are tiled again after
                row_dtype = DType.BF16 if cfg.act_dtype is DType.BFP8_B else cfg.act_dtype
                parts = [self._as_dtype(self._row_major(t.payload), row_dtype) for t in xs]
            else:
                return None
        else:
            return None
        grid = xs[0].payload.memory_config().shard_spec.grid
        spec = self.ttnn.ShardSpec(grid, (first.shard_shape[0], width), self.ttnn.ShardOrientation.ROW_MAJOR)
        memory = self.ttnn.MemoryConfig(_MEMORY_LAYOUTS[first.layout], self.ttnn.BufferType.L1, spec)
        out = self.ttnn.concat(parts, dim=3, memory_config=memory)
        if out.layout != self.ttnn.TILE_LAYOUT:
            out = self.ttnn.to_layout(out, self.ttnn.TILE_LAYOUT, dtype=_DTYPES[cfg.act_dtype])
        return out

    def add(
        self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str, activation: Activation | None = None
    ) -> DeviceTensor:
        self._check_allocated(layer, a, b)
        fused = activation is not None and activation.kind in ELTWISE_FUSED_ACTIVATIONS
        with _ttnn_errors(layer, "add"):
            out = self.ttnn.add(
                a.payload, b.payload, dtype=_DTYPES[cfg.act_dtype], memory_config=a.payload.memory_config(),
                activations=[_fused(activation)] if fused else [],
            )
        result = self._place(out, a.n, a.h, a.w, a.c, cfg, layer)
        if activation is not None and not fused:
            result = self._activate(result, activation, cfg, layer, in_place=True)
        return result

    def multiply(self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_allocated(layer, a, b)
        per_channel = (b.h, b.w) == (1, 1) and (a.h, a.w) != (1, 1)
        if (b.n, b.c) != (a.n, a.c) or (not per_channel and (b.h, b.w) != (a.h, a.w)):
            raise ValueError(
                f"layer {layer!r}: cannot multiply [{a.n},{a.h},{a.w},{a.c}] by [{b.n},{b.h},{b.w},{b.c}]"
            )
        dtype = _DTYPES[cfg.act_dtype]
        with _ttnn_errors(layer, "multiply"):
            if not per_channel:
                out = self.ttnn.multiply(a.payload, b.payload, dtype=dtype, memory_config=a.payload.memory_config())
            elif a.n == 1:
                # a sharded scale row would make ttnn place the product after it, not after a
                scale = self._interleaved(b.payload)
                out = self.ttnn.multiply(a.payload, scale, dtype=dtype, memory_config=a.payload.memory_config())
            else:
                # one scale row per image: give each image its own batch entry so ttnn broadcasts,
                # then put the product back where a was
                images = self.ttnn.reshape(self._interleaved(a.payload), (a.n, 1, a.h * a.w, a.c))
                scales = self.ttnn.reshape(self._interleaved(b.payload), (b.n, 1, 1, b.c))
                out = self.ttnn.reshape(self.ttnn.multiply(images, scales, dtype=dtype), (1, 1, a.nhw, a.c))
                out = self.ttnn.to_memory_config(out, a.payload.memory_config())
        return self._place(out, a.n, a.h, a.w, a.c, cfg, layer)

    def activation(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._activate(x, act, cfg, layer, in_place=False)

    def _activate(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str, in_place: bool) -> DeviceTensor:
        """``in_place`` overwrites ``x``: for an op's own output (an activation it cannot fuse), which
        then needs no second buffer, and leaves no hole in L1 when the first would be freed (a hole
        per unfused mish fragmented YOLOv4's L1 at 640 enough to fail a later conv)."""
        self._check_allocated(layer, x)
        into = {"output_tensor": x.payload} if in_place else {}
        with _ttnn_errors(layer, act.kind):
            if act.kind == "leaky_relu":
                out = self.ttnn.leaky_relu(x.payload, negative_slope=act.param, **into)
            else:
                # every other activation is the ttnn op of its name (ttnn.relu, ttnn.mish, ...)
                out = getattr(self.ttnn, act.kind)(x.payload, **into)
        return self._place(out, x.n, x.h, x.w, x.c, cfg, layer)

    def mean_hw(self, x: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_allocated(layer, x)
        with _ttnn_errors(layer, "mean"):
            images = self._tiled(self._interleaved(x.payload))
            if x.n > 1:
                images = self.ttnn.reshape(images, (1, x.n, x.h * x.w, x.c))
            means = self.ttnn.mean(
                images, dim=2, keepdim=True, memory_config=self.ttnn.L1_MEMORY_CONFIG,
                compute_kernel_config=_compute_config(cfg),
            )
            if x.n > 1:
                means = self.ttnn.reshape(means, (1, 1, x.n, x.c))
            out = self._as_dtype(means, cfg.act_dtype)
        return self._place(out, x.n, 1, 1, x.c, cfg, layer)

    def linear(self, x: DeviceTensor, weights: PreparedLinear, cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_allocated(layer, x)
        with _ttnn_errors(layer, "linear"):
            out = self.ttnn.linear(
                self._tiled(self._interleaved(x.payload)),
                weights.weight,
                bias=weights.bias,
                memory_config=self.ttnn.L1_MEMORY_CONFIG,
                dtype=_DTYPES[cfg.act_dtype],
                compute_kernel_config=_compute_config(cfg),
            )
        return self._place(out, x.n, 1, 1, weights.out_features, cfg, layer)

    # -- memory and layout ---------------------------------------------------------------------
    def to_memory(self, x: DeviceTensor, layout: ShardLayout, layer: str) -> DeviceTensor:
        self._check_allocated(layer, x)
        if layout is ShardLayout.AUTO:
            layout = resolve_auto_shard(x.nhw, x.c)
        if layout is ShardLayout.INTERLEAVED:
            memory = self.ttnn.L1_MEMORY_CONFIG
        else:
            try:
                memory = sharded_memory_config(x.nhw, x.c, layout, tiled=x.layout is Layout.TILE, grid=self.grid)
            except ValueError as error:
                raise ValueError(f"layer {layer!r}: {error}") from error
        with _ttnn_errors(layer, "to_memory_config"):
            out = self.ttnn.to_memory_config(x.payload, memory)
        return self._wrap(out, x.n, x.h, x.w, x.c, layer)

    def to_layout(self, x: DeviceTensor, layout: Layout, layer: str) -> DeviceTensor:
        self._check_allocated(layer, x)
        with _ttnn_errors(layer, "to_layout"):
            out = self.ttnn.to_layout(x.payload, _LAYOUTS[layout])
        return self._wrap(out, x.n, x.h, x.w, x.c, layer)

    # -- channel slices, four-sided conv padding, LayerNorm over channels ------------------------
    def slice_channels(self, x: DeviceTensor, start: int, stop: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_allocated(layer, x)
        aligned = start % TILE == 0 and stop % TILE == 0
        with _ttnn_errors(layer, "slice"):
            tensor = x.payload
            if (x.memory.layout is ShardLayout.HEIGHT and x.memory.shard_shape is not None
                    and x.layout is Layout.TILE and aligned):
                # whole tile columns of each core's rows: the slice stays on the cores
                grid = tensor.memory_config().shard_spec.grid
                spec = self.ttnn.ShardSpec(grid, (x.memory.shard_shape[0], stop - start),
                                           self.ttnn.ShardOrientation.ROW_MAJOR)
                memory = self.ttnn.MemoryConfig(self.ttnn.TensorMemoryLayout.HEIGHT_SHARDED,
                                                self.ttnn.BufferType.L1, spec)
            else:
                tensor, memory = self._interleaved(tensor), self.ttnn.L1_MEMORY_CONFIG
                if tensor.dtype == self.ttnn.bfloat8_b and not aligned:
                    tensor = self.ttnn.typecast(tensor, self.ttnn.bfloat16)  # exact: bf16 holds bfloat8_b values
            out = self.ttnn.slice(tensor, [0, 0, 0, start], [1, 1, x.nhw, stop], memory_config=memory)
        return self._place(out, x.n, x.h, x.w, stop - start, cfg, layer)

    def conv2d_padded(self, x: DeviceTensor, weights: PreparedConv, spec: Conv2dSpec,
                      padding: tuple[int, int, int, int], cfg: OpConfig, layer: str,
                      activation: Activation | None = None) -> DeviceTensor:
        if spec.padding != (0, 0):
            raise ValueError(f"layer {layer!r}: conv2d_padded takes its padding apart, got spec padding {spec.padding}")
        # ttnn.conv2d takes [top, bottom, left, right] where it takes [pad_h, pad_w]
        four_sided = FourSidedConvSpec(spec.in_channels, spec.out_channels, spec.kernel, spec.stride,
                                       tuple(padding), spec.dilation, spec.groups)
        return self.conv2d(x, weights, four_sided, cfg, layer, activation)

    def prepare_layer_norm(self, weight: torch.Tensor | None, bias: torch.Tensor | None, cfg: OpConfig,
                           layer: str) -> PreparedNorm:
        # layer_norm wants gamma and beta tiled ([1, C] padded to whole tiles), in bfloat16
        def row(values: torch.Tensor | None) -> Any:
            if values is None:
                return None
            return self.ttnn.from_torch(values.detach().float().reshape(1, -1), dtype=self.ttnn.bfloat16,
                                        layout=self.ttnn.TILE_LAYOUT, device=self.device)

        with _ttnn_errors(layer, "from_torch"):
            return PreparedNorm(row(weight), row(bias))

    def layer_norm(self, x: DeviceTensor, weights: PreparedNorm, eps: float, cfg: OpConfig, layer: str) -> DeviceTensor:
        # ttnn 0.81.1's layer_norm refuses height-sharded inputs, and block-sharded ones need a program
        # config per shape: it runs interleaved
        self._check_allocated(layer, x)
        with _ttnn_errors(layer, "layer_norm"):
            out = self.ttnn.layer_norm(
                self._tiled(self._interleaved(x.payload)), epsilon=eps, weight=weights.weight, bias=weights.bias,
                memory_config=self.ttnn.L1_MEMORY_CONFIG, compute_kernel_config=_compute_config(cfg),
            )
            out = self._as_dtype(out, cfg.act_dtype)
        return self._place(out, x.n, x.h, x.w, x.c, cfg, layer)

    def global_response_norm(self, x: DeviceTensor, weights: PreparedNorm, eps: float, cfg: OpConfig,
                             layer: str) -> DeviceTensor:
        # per image: the norm of each channel over H*W as sqrt(mean of squares) (the norm over sqrt(H*W),
        # so eps is scaled alike), its mean over channels, then one scale per channel and image
        self._check_allocated(layer, x)
        t, hw = self.ttnn, x.h * x.w
        compute = _compute_config(cfg)
        with _ttnn_errors(layer, "global_response_norm"):
            images = t.reshape(self._tiled(self._interleaved(x.payload)), (1, x.n, hw, x.c))
            squares = t.multiply(images, images)
            norm = t.sqrt(t.mean(squares, dim=2, keepdim=True, memory_config=t.L1_MEMORY_CONFIG,
                                 compute_kernel_config=compute))
            mean = t.mean(norm, dim=3, keepdim=True, memory_config=t.L1_MEMORY_CONFIG, compute_kernel_config=compute)
            scale = t.multiply(norm, t.reciprocal(t.add(mean, eps / math.sqrt(hw))))
            if weights.weight is not None:
                scale = t.multiply(scale, t.reshape(weights.weight, (1, 1, 1, x.c)))
            out = t.multiply(images, t.add(scale, 1.0))
            if weights.bias is not None:
                out = t.add(out, t.reshape(weights.bias, (1, 1, 1, x.c)))
            out = self._as_dtype(t.reshape(out, (1, 1, x.nhw, x.c)), cfg.act_dtype)
        return self._place(out, x.n, x.h, x.w, x.c, cfg, layer)


@dataclass
class PreparedNorm:
    """A LayerNorm's gamma and beta on the device: [1, C] bfloat16 tiles."""

    weight: Any
    bias: Any


@dataclass(frozen=True)
class FourSidedConvSpec(Conv2dSpec):
    """A conv whose ``padding`` is ttnn's (top, bottom, left, right), for ``conv2d_padded``."""

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding  # type: ignore[misc]
        plain = Conv2dSpec(self.in_channels, self.out_channels, self.kernel, self.stride, (0, 0), self.dilation,
                           self.groups)
        return plain.output_hw(h + top + bottom, w + left + right)
