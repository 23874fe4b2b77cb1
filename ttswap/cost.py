"""A Wormhole n150 cost model: how long each device op of a converted model would take.

``estimate(converted)`` runs one forward pass with the backend's op methods wrapped, so it sees every
op the model issues (a conv's separate activation and every reshard included) with its input
placement, shapes, dtypes and config, and prices each one:

    op time = launch + max(compute, NoC traffic per core, DRAM traffic)

* **launch**: a fixed device-side cost per device op (program start, circular-buffer and semaphore
  set-up, pipeline fill and drain). ttnn runs some of our ops as several device ops (a windowed
  conv2d is a halo op then the conv; an upsample four ops); each is charged.
* **compute**, on the busiest core: matrix-engine cycles (32x32x32 tile products at 16 cycles each
  at LoFi, 32/48/64 at HiFi2/3/4, divided by a fitted efficiency), tilize cycles, SFPU cycles of
  fused activations, and eltwise tile cycles.
* **NoC**: bytes one core moves (im2col gathering, activation multicast, weight blocks, reshards) at
  ``noc_bytes_per_cycle``.
* **DRAM**: weights read once per forward from DRAM (no trace, no weight caching in L1), limited by
  the 288 GB/s of 12 banks and by the cores that issue the reads.

Each op's cores are the ones its shard spec really uses (``ttswap.backends.l1``'s grids, which model
ttnn's choices): a height-sharded conv over 49 rows runs on 2 cores, not 64. The constants, and which
of them are published figures and which were fitted to published model throughputs, are in
``WormholeN150`` and docs/cost_model.md; benchmarks/cost_calibration.py prints the fit.

The same pricing functions (``conv2d_cost`` and friends) take plain ``DeviceTensor`` descriptions,
so the auto recipe (``ttswap.auto_recipe``) prices a layer under configurations it has not built.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ttswap.backends.base import (
    CONV_FUSED_ACTIVATIONS,
    ELTWISE_FUSED_ACTIVATIONS,
    TILE,
    Backend,
    DeviceTensor,
    MemorySpec,
    round_up,
)
from ttswap.backends.l1 import (
    MAX_CORES,
    STICK_ALIGN,
    TILE_BYTES,
    ShardGrid,
    conv_shard_grid,
    grid_of,
    is_matmul_conv,
    pool_input_grid,
    pool_shard_grid,
    resolve_conv_layout,
    tensor_shard_grid,
)
from ttswap.config import (
    Activation,
    Conv2dSpec,
    Fidelity,
    Layout,
    OpConfig,
    Pool2dSpec,
    ShardLayout,
)
from ttswap.modules import Download, TTModule, Upload

if TYPE_CHECKING:
    from ttswap.converter import ConvertedModel


@dataclass(frozen=True)
class WormholeN150:
    """The device the model prices ops for. Published figures first, then fitted or assumed ones."""

    clock_hz: float = 1.0e9
    matmul_flops_per_cycle: int = 4096  # per core at LoFi: an 8x16 by 16x16 product per cycle
    dram_bytes_per_s: float = 288e9  # 12 GDDR6 banks
    # One NoC link moves a 32-byte flit per cycle; a core's reader or writer kernel drives one link.
    noc_bytes_per_cycle: float = 32.0
    # -- fitted to published n150 throughputs (benchmarks/cost_calibration.py) -------------------
    op_launch_s: float = 12e-6  # device-side fixed cost of one device op
    matmul_efficiency: float = 0.1  # achieved / peak matrix-engine rate inside a conv or matmul
    # -- assumed (order of magnitude from the kernel structure; not fitted) -----------------------
    host_dispatch_s: float = 15e-6  # host time to dispatch one op without trace (end to end only)
    tile_cycles: float = 64.0  # one tile through unpack -> math -> pack: eltwise, tilize, reduce
    noc_request_cycles: float = 20.0  # issuing one NoC read: small reads (a few sticks) are latency-bound
    act_block_cycles: float = 400.0  # per act block of a conv: pipeline restart between blocks
    fp32_acc_factor: float = 1.25  # fp32 Dst holds half the tiles: smaller sub-blocks, more unpacking
    pcie_bytes_per_s: float = 10e9  # host <-> device, effective
    transfer_latency_s: float = 50e-6  # per host <-> device transfer

    @property
    def tile_product_cycles(self) -> float:
        """Cycles of one 32x32 by 32x32 tile product at LoFi (16)."""
        return 2 * TILE**3 / self.matmul_flops_per_cycle

    def seconds(self, cycles: float) -> float:
        return cycles / self.clock_hz

    def noc_seconds(self, bytes_per_core: float) -> float:
        return bytes_per_core / (self.noc_bytes_per_cycle * self.clock_hz)


N150 = WormholeN150()

FIDELITY_PHASES = {Fidelity.LOFI: 1, Fidelity.HIFI2: 2, Fidelity.HIFI3: 3, Fidelity.HIFI4: 4}
# SFPU cycles per 32x32 tile, by activation: roughly 32 vector rows times the instructions each needs
# (ttnn's accurate variants; transcendental ones evaluate polynomials and exponentials). Assumed.
SFPU_TILE_CYCLES = {
    "relu": 64, "relu6": 64, "leaky_relu": 96, "hardsigmoid": 96, "hardswish": 128,
    "sigmoid": 512, "silu": 576, "gelu": 640, "mish": 1024,
}
BOUNDS = ("launch", "compute", "noc", "dram", "host")


@dataclass(frozen=True)
class OpCost:
    """One device op (or host transfer) and what bounds it."""

    op: str
    seconds: float
    bound: str  # one of BOUNDS
    cores: int
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _op(op: str, hw: WormholeN150, cores: int, detail: str = "", *, compute_cycles: float = 0.0,
        noc_bytes: float = 0.0, dram_seconds: float = 0.0) -> OpCost:
    """launch + max(compute, NoC, DRAM), labelled by the largest term (or launch, if larger)."""
    terms = {"compute": hw.seconds(compute_cycles), "noc": hw.noc_seconds(noc_bytes), "dram": dram_seconds}
    bound = max(terms, key=terms.get)
    if hw.op_launch_s >= terms[bound]:
        bound = "launch"
    return OpCost(op, hw.op_launch_s + terms[max(terms, key=terms.get)], bound, cores, detail)


def _tiles(n: int) -> int:
    return -(-n // TILE)


def _grid(t: DeviceTensor) -> ShardGrid | None:
    return grid_of(t.memory)


def _cores(t: DeviceTensor) -> int:
    grid = _grid(t)
    return grid.num_cores if grid else MAX_CORES  # an interleaved tensor's pages spread over all banks


def _tiles_per_core(t: DeviceTensor) -> int:
    grid = _grid(t)
    if grid is None:
        return -(-_tiles(t.nhw) * _tiles(t.c) // MAX_CORES)
    return _tiles(grid.shard_rows) * _tiles(grid.shard_cols)


def _bytes_per_core(t: DeviceTensor) -> int:
    return _tiles_per_core(t) * TILE_BYTES[t.dtype]


# -- pricing, one function per backend op ------------------------------------------------------------


def reshard_cost(x: DeviceTensor, target: ShardGrid | None, hw: WormholeN150 = N150, op: str = "reshard") -> OpCost:
    """Moving a tensor to another placement: each core sends its share and receives its new one."""
    new = dataclasses.replace(x, memory=target.memory_spec() if target else MemorySpec())
    moved = max(_bytes_per_core(x), _bytes_per_core(new))
    return _op(op, hw, max(_cores(x), _cores(new)), f"{_where(x)} -> {_where(new)}", noc_bytes=moved)


def _where(t: DeviceTensor) -> str:
    return f"{t.memory.layout.value}/{_cores(t)}"


def _tilize_cost(x: DeviceTensor, hw: WormholeN150, op: str = "tilize") -> OpCost:
    return _op(op, hw, _cores(x), compute_cycles=_tiles_per_core(x) * hw.tile_cycles,
               noc_bytes=_bytes_per_core(x))


def conv_grid(x: DeviceTensor, spec: Conv2dSpec, cfg: OpConfig) -> tuple[ShardLayout, ShardGrid]:
    """The layout a conv computes in and the output grid ttnn gives it (as TtnnBackend asks)."""
    h_out, w_out = spec.output_hw(x.h, x.w)
    layout = resolve_conv_layout(spec, x.nhw, cfg)
    return layout, conv_shard_grid(layout, spec, x.n * h_out * w_out, cfg.act_block_h)


def _conv_input_grid(x: DeviceTensor, spec: Conv2dSpec, layout: ShardLayout) -> ShardGrid:
    """How conv2d wants its input sharded (as ``to_memory`` would shard it, in tiles: the byte
    counts are what matter here)."""
    return tensor_shard_grid(layout, x.nhw, spec.in_channels)


def conv2d_cost(x: DeviceTensor, spec: Conv2dSpec, cfg: OpConfig, activation: Activation | None = None,
                hw: WormholeN150 = N150) -> list[OpCost]:
    """A ttnn conv2d: input reshard (when its placement differs), halo (windowed convs), the conv.

    The conv is an im2col matmul of ``[rows, kh*kw*C_in] x [kh*kw*C_in, C_out]`` split over the
    output grid; grouped convs run their block-diagonal dense weight (as ttnn expands it), so a
    depthwise conv costs a dense one. Per core: HEIGHT computes its rows x all outputs; BLOCK its rows
    x its output columns, receiving the activation blocks of its grid row by multicast; WIDTH all
    rows x its output columns, receiving every activation. Weights stream from DRAM each forward, read
    by one core per weight slice and multicast: one reader for HEIGHT, one per grid column for
    BLOCK, every core for WIDTH.
    """
    layout, grid = conv_grid(x, spec, cfg)
    costs = []
    wanted = _conv_input_grid(x, spec, layout)
    have = _grid(x)
    if have is None or (have.layout, have.num_cores) != (wanted.layout, wanted.num_cores):
        costs.append(reshard_cost(x, wanted, hw, "reshard input"))

    kh, kw = spec.kernel
    matmul_only = is_matmul_conv(spec)
    cin = round_up(spec.in_channels, STICK_ALIGN)
    cin_core = cin if layout is ShardLayout.HEIGHT else round_up(-(-cin // grid.col_cores), STICK_ALIGN)
    h_out, w_out = spec.output_hw(x.h, x.w)
    nhw_out = x.n * h_out * w_out
    rows = round_up(nhw_out, TILE) if layout is ShardLayout.WIDTH else grid.shard_rows
    m, n = _tiles(rows), _tiles(grid.shard_cols)
    k = _tiles(cin) if matmul_only else kh * _tiles(kw * cin)  # ttnn pads each kernel row to whole tiles
    k_core = _tiles(cin_core) if matmul_only else kh * _tiles(kw * cin_core)
    act_bytes, weight_tile = TILE_BYTES[cfg.act_dtype], TILE_BYTES[cfg.weight_dtype]

    if not matmul_only:
        in_rows = -(-x.nhw // grid.row_cores) if layout is not ShardLayout.WIDTH else x.nhw
        costs.append(_op("halo", hw, wanted.num_cores, noc_bytes=in_rows * cin_core * 2))

    phases = FIDELITY_PHASES[cfg.fidelity] * (hw.fp32_acc_factor if cfg.fp32_acc else 1.0)
    compute = m * k * n * hw.tile_product_cycles * phases / hw.matmul_efficiency
    noc = k_core * n * weight_tile  # this core's weight blocks
    if not matmul_only:
        compute += m * k_core * hw.tile_cycles  # tilizing the im2col block
        # gathering it from the halo'd shard: one read per output row and kernel row
        noc += rows * kh * (kw * cin_core * 2 + hw.noc_request_cycles * hw.noc_bytes_per_cycle)
    if layout is ShardLayout.BLOCK:
        noc += m * (k - k_core) * act_bytes  # the other columns' activation blocks
    elif layout is ShardLayout.WIDTH:
        noc += m * k * act_bytes * (grid.col_cores - 1) / grid.col_cores
    if activation is not None and activation.kind in CONV_FUSED_ACTIVATIONS:
        compute += m * n * SFPU_TILE_CYCLES[activation.kind]
    blocks = -(-rows // cfg.act_block_h) if cfg.act_block_h else 1
    compute += blocks * hw.act_block_cycles

    weight_bytes = k * _tiles(spec.out_channels) * weight_tile
    readers = {ShardLayout.HEIGHT: 1, ShardLayout.BLOCK: grid.col_cores}.get(layout, grid.num_cores)
    dram = weight_bytes / min(hw.dram_bytes_per_s, readers * hw.noc_bytes_per_cycle * hw.clock_hz)
    detail = (f"{layout.value} {grid.row_cores}x{grid.col_cores} cores, [{rows}x{k * TILE}]x[{k * TILE}x"
              f"{grid.shard_cols}] per core, {cfg.fidelity.value}")
    costs.append(_op("conv2d", hw, grid.num_cores, detail, compute_cycles=compute, noc_bytes=noc, dram_seconds=dram))
    if activation is not None and activation.kind not in CONV_FUSED_ACTIVATIONS:  # its own op on the output
        out = DeviceTensor(None, x.n, h_out, w_out, spec.out_channels, cfg.act_dtype, memory=grid.memory_spec())
        costs.append(eltwise_cost(out, 1, activation, hw, activation.kind))
    return costs


def pool2d_cost(x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, hw: WormholeN150 = N150,
                op: str = "max_pool2d") -> list[OpCost]:
    """Halo, then a window reduction: each output reads kh*kw input sticks of its core's channels."""
    costs = []
    grid = _grid(x)
    h_out, w_out = spec.output_hw(x.h, x.w)
    if grid is None:
        grid = pool_input_grid(cfg.shard, x.nhw, x.n * h_out * w_out, x.c)  # as the backends place it
        costs.append(reshard_cost(x, grid, hw, "shard input"))
    out = pool_shard_grid(grid, x.n * h_out * w_out)
    width = round_up(grid.shard_cols, STICK_ALIGN)
    costs.append(_op("halo", hw, grid.num_cores, noc_bytes=-(-x.nhw // grid.row_cores) * width * 2))
    window = spec.kernel[0] * spec.kernel[1]
    out_tiles = _tiles(out.shard_rows) * _tiles(width)
    reads = out.shard_rows * spec.kernel[0]  # one read per output stick and window row
    costs.append(_op(op, hw, grid.num_cores, f"{spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]}",
                     compute_cycles=out_tiles * (window + 1) * hw.tile_cycles,
                     noc_bytes=out.shard_rows * window * width * 2
                     + reads * hw.noc_request_cycles * hw.noc_bytes_per_cycle))
    return costs


def eltwise_cost(x: DeviceTensor, inputs: int, activation: Activation | None, hw: WormholeN150 = N150,
                 op: str = "eltwise") -> OpCost:
    """A unary or binary op on the cores that hold ``x``: tiles in, SFPU work, tiles out."""
    tiles = _tiles_per_core(x)
    sfpu = SFPU_TILE_CYCLES[activation.kind] if activation is not None else 0
    return _op(op, hw, _cores(x), compute_cycles=tiles * (inputs * hw.tile_cycles / 2 + hw.tile_cycles / 2 + sfpu),
               noc_bytes=(inputs + 1) * _bytes_per_core(x) if _grid(x) is None else 0)


def _concat_in_place(xs: Sequence[DeviceTensor]) -> bool:
    """Whether a concat stays on its inputs' cores: all sharded alike, with equal shard heights."""
    first = xs[0].memory
    return first.shard_shape is not None and all(
        (t.memory.layout, t.memory.grid, t.memory.num_cores, t.memory.shard_shape and t.memory.shard_shape[0])
        == (first.layout, first.grid, first.num_cores, first.shard_shape[0]) for t in xs)


def concat_cost(xs: Sequence[DeviceTensor], hw: WormholeN150 = N150) -> list[OpCost]:
    """In place when every input shares one sharded grid (a local copy per core); otherwise each
    sharded input goes to L1 interleaved first and the concat moves pages across the NoC."""
    costs = []
    if not _concat_in_place(xs):
        costs += [reshard_cost(t, None, hw, "to interleaved") for t in xs if _grid(t) is not None]
        moved = sum(_bytes_per_core(dataclasses.replace(t, memory=MemorySpec())) for t in xs)
        costs.append(_op("concat", hw, MAX_CORES, f"{len(xs)} inputs, interleaved", noc_bytes=2 * moved))
    else:
        moved = sum(_bytes_per_core(t) for t in xs)
        costs.append(_op("concat", hw, _cores(xs[0]), f"{len(xs)} inputs, sharded", noc_bytes=2 * moved))
    return costs


def upsample_cost(x: DeviceTensor, scale: int, hw: WormholeN150 = N150) -> list[OpCost]:
    """TtnnBackend's upsample: to interleaved, untilize, upsample (row-major), tilize."""
    costs = []
    if _grid(x) is not None:
        costs.append(reshard_cost(x, None, hw, "to interleaved"))
    flat = dataclasses.replace(x, memory=MemorySpec())
    big = dataclasses.replace(flat, h=x.h * scale, w=x.w * scale)
    if x.layout is Layout.TILE:
        costs.append(_tilize_cost(flat, hw, "untilize"))
    costs.append(_op("upsample", hw, MAX_CORES, f"x{scale}", noc_bytes=_bytes_per_core(flat) + _bytes_per_core(big)))
    costs.append(_tilize_cost(big, hw))
    return costs


def mean_hw_cost(x: DeviceTensor, hw: WormholeN150 = N150) -> list[OpCost]:
    """To interleaved (when sharded), then a reduction of every tile on the interleaved cores."""
    costs = [reshard_cost(x, None, hw, "to interleaved")] if _grid(x) is not None else []
    flat = dataclasses.replace(x, memory=MemorySpec())
    costs.append(_op("mean", hw, MAX_CORES, compute_cycles=_tiles_per_core(flat) * hw.tile_cycles,
                     noc_bytes=_bytes_per_core(flat)))
    return costs


def linear_cost(x: DeviceTensor, out_features: int, cfg: OpConfig, hw: WormholeN150 = N150) -> list[OpCost]:
    """A small matmul whose weights stream from DRAM, interleaved over every bank."""
    costs = [reshard_cost(x, None, hw, "to interleaved")] if _grid(x) is not None else []
    k, n = _tiles(x.c), _tiles(out_features)
    cores = min(n, MAX_CORES)
    phases = FIDELITY_PHASES[cfg.fidelity] * (hw.fp32_acc_factor if cfg.fp32_acc else 1.0)
    compute = _tiles(x.n) * k * -(-n // cores) * hw.tile_product_cycles * phases / hw.matmul_efficiency
    weights = k * n * TILE_BYTES[cfg.weight_dtype]
    costs.append(_op("linear", hw, cores, f"{x.c}->{out_features}", compute_cycles=compute,
                     noc_bytes=weights / cores, dram_seconds=weights / hw.dram_bytes_per_s))
    return costs


def transfer_cost(nbytes: int, op: str, hw: WormholeN150 = N150) -> OpCost:
    return OpCost(op, hw.transfer_latency_s + nbytes / hw.pcie_bytes_per_s, "host", 0, f"{nbytes:,} B over PCIe")


# -- observing a forward pass ---------------------------------------------------------------------

OPS = ("upload", "download", "conv2d", "max_pool2d", "avg_pool2d", "upsample_nearest", "concat", "add",
       "multiply", "activation", "mean_hw", "linear", "to_memory", "to_layout")


@dataclass
class OpCall:
    """One backend op call as a forward pass issued it: bound arguments (tensors without payloads),
    the result's description, which earlier calls produced its tensor arguments, and the L1 that
    other live tensors held on each core when it ran (known on the emulated backend, else 0)."""

    op: str
    key: str  # the graph target of the top-level device layer (or transfer) that issued it
    args: dict[str, Any]
    output: Any
    sources: dict[str, Any] = field(default_factory=dict)  # argument -> index of the producing call
    resident_bytes: int = 0


def _describe(value: Any) -> Any:
    if isinstance(value, DeviceTensor):
        return dataclasses.replace(value, payload=None)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, DeviceTensor) for v in value):
        return [_describe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return value


def _device_tensors(value: Any) -> list[DeviceTensor]:
    if isinstance(value, DeviceTensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, DeviceTensor)]
    return []


def _linear_out_features(weights: Any) -> int:
    # TtnnBackend's PreparedLinear says it; EmulatedBackend's PreparedWeights hold the [K, N] matrix
    if hasattr(weights, "out_features"):
        return int(weights.out_features)
    return int(weights.operands["full"].shape[1])


@contextmanager
def record_ops(converted: "ConvertedModel") -> Iterator[list[OpCall]]:
    """Record every backend op the converted model's layers call while the block runs.

    The backend instance's op methods are wrapped for the duration (instance attributes shadow the
    class's). Ops a backend runs from inside another (a conv's unfused activation, the move to an
    explicit ``shard``) are not recorded: ``price`` counts them with the op, the same way for every
    backend. Forward pre-hooks on the top-level device layers and transfers say which layer called."""
    backend: Backend = converted.backend
    calls: list[OpCall] = []
    producer: dict[int, int] = {}  # id of a live output tensor -> index of the call that returned it
    current = ["?"]  # the graph target of the module running now
    depth = [0]  # ops a backend issues from inside another op are priced as part of that op
    resident = getattr(backend, "resident", None)  # the emulated backend's live-tensor accounting

    def wrap(name: str, method: Callable) -> Callable:
        signature = inspect.signature(method)

        def recorded(*args, **kwargs):
            if depth[0]:
                return method(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            tensors = {k: _device_tensors(v) for k, v in bound.arguments.items()}
            held = resident.bytes_besides([t for ts in tensors.values() for t in ts]) if resident else 0
            sources = {k: [producer.get(id(t)) for t in ts] if isinstance(bound.arguments[k], (list, tuple))
                       else producer.get(id(ts[0])) for k, ts in tensors.items() if ts}
            index = len(calls)
            calls.append(None)
            depth[0] += 1
            try:
                out = method(*args, **kwargs)
            finally:
                depth[0] -= 1
            described = {k: _describe(v) for k, v in bound.arguments.items() if k != "weights"}
            if name == "linear":
                described["out_features"] = _linear_out_features(bound.arguments["weights"])
            calls[index] = OpCall(name, current[0], described, _describe(out), sources, held)
            if isinstance(out, DeviceTensor):
                producer[id(out)] = index
            return out

        return recorded

    wrapped = [name for name in OPS if getattr(backend, name, None) is not None]
    for name in wrapped:
        setattr(backend, name, wrap(name, getattr(backend, name)))
    hooks = [module.register_forward_pre_hook(lambda _m, _a, key=key: current.__setitem__(0, key))
             for key, module in _top_level_modules(converted).items()]
    try:
        yield calls
    finally:
        for name in wrapped:
            delattr(backend, name)
        for hook in hooks:
            hook.remove()


def _top_level_modules(converted: "ConvertedModel") -> dict[str, torch.nn.Module]:
    """Graph target -> module, in graph order, for the device layers and transfers the graph calls.
    Targets are unique; layer names need not be (a timm ResNet block's conv1 and conv2 are both
    matched as layer ``layer1.0``)."""
    gm = converted.graph_module
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (TTModule, Upload, Download))}


def top_level_layers(converted: "ConvertedModel") -> dict[str, TTModule]:
    """Graph target -> device layer, for the layers the converted graph calls (``device_layers``
    also lists their parts, by layer name)."""
    return {key: m for key, m in _top_level_modules(converted).items() if isinstance(m, TTModule)}


def _label(module: Upload | Download) -> str:
    return f"{'upload' if isinstance(module, Upload) else 'download'} {module.name}"


def price(call: OpCall, hw: WormholeN150 = N150) -> list[OpCost]:
    """The device ops (or host transfer) one recorded backend call stands for: the op itself, the
    ops ttnn runs around it (reshards, halo, unfused activation), and the move of its output to an
    explicit ``cfg.shard`` when that differs from where the op puts it."""
    a, op = call.args, call.op
    if op in ("upload", "download"):
        t = call.output if op == "upload" else a["t"]
        return [transfer_cost(t.nhw * t.c * TILE_BYTES[t.dtype] // (TILE * TILE), op, hw)]
    if op == "to_memory":
        x, layout = a["x"], a["layout"]
        tiled = x.layout is Layout.TILE
        target = None if layout is ShardLayout.INTERLEAVED else tensor_shard_grid(layout, x.nhw, x.c, tiled)
        return [reshard_cost(x, target, hw, "to_memory")]
    if op == "to_layout":
        return [_tilize_cost(a["x"], hw, "tilize" if a["layout"] is Layout.TILE else "untilize")]
    if op == "conv2d":  # computes in the layout cfg.shard names: never moved after
        return conv2d_cost(a["x"], a["spec"], a["cfg"], a["activation"], hw)
    if op in ("max_pool2d", "avg_pool2d"):
        costs, natural = pool2d_cost(a["x"], a["spec"], a["cfg"], hw, op), a["x"].memory
    elif op == "upsample_nearest":
        costs, natural = upsample_cost(a["x"], a["scale"], hw), MemorySpec()
    elif op == "concat":
        costs = concat_cost(a["xs"], hw)
        natural = a["xs"][0].memory if _concat_in_place(a["xs"]) else MemorySpec()
    elif op == "add":
        act = a["activation"]
        fused = act is None or act.kind in ELTWISE_FUSED_ACTIVATIONS
        costs = [eltwise_cost(a["a"], 2, act if fused else None, hw, "add")]
        if not fused:
            costs.append(eltwise_cost(a["a"], 1, act, hw, act.kind))
        natural = a["a"].memory
    elif op == "multiply":
        costs, natural = [eltwise_cost(a["a"], 2, None, hw, "multiply")], a["a"].memory
    elif op == "activation":
        costs, natural = [eltwise_cost(a["x"], 1, a["act"], hw, a["act"].kind)], a["x"].memory
    elif op == "mean_hw":
        costs, natural = mean_hw_cost(a["x"], hw), MemorySpec()
    elif op == "linear":
        costs, natural = linear_cost(a["x"], a["out_features"], a["cfg"], hw), MemorySpec()
    else:
        raise ValueError(f"the cost model has no price for backend op {op!r}")
    out: DeviceTensor = call.output
    if natural.layout is not out.memory.layout:  # an explicit cfg.shard moved the result
        costs.append(reshard_cost(dataclasses.replace(out, memory=natural), _grid(out), hw, "to_memory"))
    return costs


# -- the report -----------------------------------------------------------------------------------


@dataclass
class LayerCost:
    """The estimated device time of one device layer (or one host transfer)."""

    key: str  # the layer's graph target (unique)
    layer: str  # its name, as recipes match it
    rewriter: str  # the rewriter that made it; "transfer" for uploads and downloads
    ops: list[OpCost] = field(default_factory=list)
    l1_bytes: int | None = None
    config: OpConfig | None = None

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.ops)

    @property
    def bound(self) -> str:
        """What bounds the layer: the bound of its slowest op."""
        return max(self.ops, key=lambda o: o.seconds).bound if self.ops else "launch"

    @property
    def cores(self) -> int:
        return max((o.cores for o in self.ops), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "layer": self.layer, "rewriter": self.rewriter, "seconds": self.seconds,
                "bound": self.bound,
                "cores": self.cores, "l1_bytes_per_core": self.l1_bytes,
                "config": self.config.to_dict() if self.config else None, "ops": [o.to_dict() for o in self.ops]}


@dataclass
class CostReport:
    """Per-layer estimates and totals for one converted model. ``fps`` is device throughput (what
    trace and two command queues approach); ``fps_end_to_end`` adds host dispatch of every op, not
    overlapped with the device, and the host transfers."""

    model: str
    recipe: str
    input_shape: tuple[int, ...]
    layers: list[LayerCost]
    transfers: list[LayerCost]
    fallbacks: int  # traced nodes left to torch; their host time is not modelled
    hw: WormholeN150 = N150

    @property
    def device_seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    @property
    def device_ops(self) -> int:
        return sum(len(layer.ops) for layer in self.layers)

    @property
    def transfer_seconds(self) -> float:
        return sum(t.seconds for t in self.transfers)

    @property
    def dispatch_seconds(self) -> float:
        return self.device_ops * self.hw.host_dispatch_s

    @property
    def fps(self) -> float:
        return 1.0 / self.device_seconds if self.device_seconds else float("inf")

    @property
    def end_to_end_seconds(self) -> float:
        return max(self.device_seconds, self.dispatch_seconds) + self.transfer_seconds

    @property
    def fps_end_to_end(self) -> float:
        return 1.0 / self.end_to_end_seconds

    def by_key(self) -> dict[str, LayerCost]:
        return {layer.key: layer for layer in self.layers}

    def bound_seconds(self) -> dict[str, float]:
        """Device time by what bounds each op."""
        totals = dict.fromkeys(BOUNDS[:4], 0.0)
        for layer in self.layers:
            for o in layer.ops:
                totals[o.bound] += o.seconds
        return totals

    def summary(self) -> str:
        split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in self.bound_seconds().items())
        return (f"{self.model} with recipe {self.recipe!r}, input {list(self.input_shape)}: "
                f"{len(self.layers)} device layers, {self.device_ops} device ops, "
                f"device {self.device_seconds * 1e3:.2f} ms ({self.fps:.0f} FPS; ms by bound: {split}); "
                f"end to end without trace {self.end_to_end_seconds * 1e3:.2f} ms ({self.fps_end_to_end:.0f} FPS; "
                f"{len(self.transfers)} transfer(s), {self.fallbacks} torch fallback node(s) not priced)")

    def table(self) -> str:
        head = ("layer", "rewriter", "us", "%", "bound", "cores", "ops", "fidelity", "weights", "L1/core")
        total = self.device_seconds or 1.0
        rows = [head]
        for layer in self.layers + self.transfers:
            c = layer.config
            rows.append((layer.layer, layer.rewriter, f"{layer.seconds * 1e6:.1f}",
                         f"{100 * layer.seconds / total:.1f}" if layer.rewriter != "transfer" else "",
                         layer.bound, str(layer.cores), str(len(layer.ops)), c.fidelity.value if c else "",
                         c.weight_dtype.value if c else "",
                         f"{layer.l1_bytes / 1024:.0f} KiB" if layer.l1_bytes else ""))
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(head))]
        lines = ["  ".join(str(v)[:w].ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + ["", self.summary()])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "recipe": self.recipe, "input_shape": list(self.input_shape),
            "device_seconds": self.device_seconds, "fps": self.fps,
            "end_to_end_seconds": self.end_to_end_seconds, "fps_end_to_end": self.fps_end_to_end,
            "device_ops": self.device_ops, "fallbacks": self.fallbacks,
            "seconds_by_bound": self.bound_seconds(), "hw": dataclasses.asdict(self.hw),
            "layers": [layer.to_dict() for layer in self.layers],
            "transfers": [t.to_dict() for t in self.transfers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def estimate(converted: "ConvertedModel", x: torch.Tensor | None = None, hw: WormholeN150 = N150) -> CostReport:
    """Estimate the device time of every layer of ``converted`` on a Wormhole n150.

    Runs one forward pass on ``x`` (default: zeros of the converted input shape) to observe the ops;
    shapes and placements do not depend on the values."""
    calls = observe(converted, x)
    return cost_report(converted, calls, hw)


def observe(converted: "ConvertedModel", x: torch.Tensor | None = None) -> list[OpCall]:
    """The backend ops one forward pass of ``converted`` issues."""
    x = torch.zeros(converted.input_shape) if x is None else x
    with record_ops(converted) as calls:
        converted(x)
    return calls


def cost_report(converted: "ConvertedModel", calls: Sequence[OpCall], hw: WormholeN150 = N150) -> CostReport:
    """Price recorded calls and group them by the layer that issued them, in graph order."""
    layers: dict[str, LayerCost] = {}
    for key, module in _top_level_modules(converted).items():
        if isinstance(module, TTModule):
            layers[key] = LayerCost(key, module.layer, module.info.rewriter, l1_bytes=module.info.l1_bytes,
                                    config=module.info.config)
        else:
            layers[key] = LayerCost(key, _label(module), "transfer")
    for call in calls:
        layers[call.key].ops.extend(price(call, hw))
    report = converted.report
    return CostReport(report.model, report.recipe, tuple(report.input_shape),
                      [v for v in layers.values() if v.rewriter != "transfer"],
                      [v for v in layers.values() if v.rewriter == "transfer"], len(report.fallbacks), hw)


__all__ = ["CostReport", "LayerCost", "N150", "OpCall", "OpCost", "WormholeN150", "conv2d_cost", "cost_report",
           "estimate", "observe", "price", "record_ops", "top_level_layers"]
