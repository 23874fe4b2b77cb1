"""Pricing: the device ops (or host transfer) one backend call stands for, and how long each takes.

    op time = launch + max(compute, NoC traffic per core, DRAM traffic)

One function per backend op (``conv2d_cost`` and friends) takes plain ``DeviceTensor`` descriptions,
so the tuner prices a layer under configurations it has not built. ``price`` looks a recorded call's
op up in ``PRICES``, a table filled by ``@prices("op")``: the backend ops a forward pass is recorded
for (``ttswap.tuning.recording``) are exactly the ones priced here. docs/cost_model.md describes
each price and its sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ttswap.backends.base import (
    CONV_FUSED_ACTIVATIONS,
    ELTWISE_FUSED_ACTIVATIONS,
    TILE,
    DeviceTensor,
    MemorySpec,
    round_up,
)
from ttswap.backends.base import tiles as _tiles  # one definition, in base
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
from ttswap.config import Activation, Conv2dSpec, Layout, OpConfig, Pool2dSpec, ShardLayout
from ttswap.tuning.hardware import FIDELITY_PHASES, N150, SFPU_TILE_CYCLES, WormholeN150

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



# -- the price table: one entry per backend op ------------------------------------------------------


class Call(Protocol):
    """What pricing needs of a recorded backend call (``ttswap.tuning.recording.OpCall``)."""

    op: str
    args: dict[str, Any]
    output: Any


# op name -> (call arguments, result, hw) -> (device ops, the placement the op itself gives its result;
# None: the op puts its result where it says, never moved after)
PriceFn = Callable[[dict[str, Any], Any, WormholeN150], "tuple[list[OpCost], MemorySpec | None]"]
PRICES: dict[str, PriceFn] = {}


def prices(*ops: str) -> Callable[[PriceFn], PriceFn]:
    """Register the price of backend op(s) ``ops``."""

    def register(fn: PriceFn) -> PriceFn:
        for op in ops:
            if op in PRICES:
                raise ValueError(f"backend op {op!r} already has a price ({PRICES[op].__name__})")
            PRICES[op] = fn
        return fn

    return register


def price(call: Call, hw: WormholeN150 = N150) -> list[OpCost]:
    """The device ops (or host transfer) one recorded backend call stands for: the op itself, the
    ops ttnn runs around it (reshards, halo, unfused activation), and the move of its output to an
    explicit ``cfg.shard`` when that differs from where the op puts it."""
    fn = PRICES.get(call.op)
    if fn is None:
        raise ValueError(f"the cost model has no price for backend op {call.op!r}")
    costs, natural = fn(call.args, call.output, hw)
    out = call.output
    if natural is not None and natural.layout is not out.memory.layout:  # an explicit cfg.shard moved it
        costs.append(reshard_cost(dataclasses.replace(out, memory=natural), _grid(out), hw, "to_memory"))
    return costs


def _transfer_bytes(t: DeviceTensor) -> int:
    return t.nhw * t.c * TILE_BYTES[t.dtype] // (TILE * TILE)


@prices("upload")
def _upload(a: dict[str, Any], output: Any, hw: WormholeN150):
    return [transfer_cost(_transfer_bytes(output), "upload", hw)], None


@prices("download")
def _download(a: dict[str, Any], output: Any, hw: WormholeN150):
    return [transfer_cost(_transfer_bytes(a["t"]), "download", hw)], None


@prices("to_memory")
def _to_memory(a: dict[str, Any], output: Any, hw: WormholeN150):
    x, layout = a["x"], a["layout"]
    tiled = x.layout is Layout.TILE
    target = None if layout is ShardLayout.INTERLEAVED else tensor_shard_grid(layout, x.nhw, x.c, tiled)
    return [reshard_cost(x, target, hw, "to_memory")], None


@prices("to_layout")
def _to_layout(a: dict[str, Any], output: Any, hw: WormholeN150):
    return [_tilize_cost(a["x"], hw, "tilize" if a["layout"] is Layout.TILE else "untilize")], None


@prices("conv2d")
def _conv2d(a: dict[str, Any], output: Any, hw: WormholeN150):
    return conv2d_cost(a["x"], a["spec"], a["cfg"], a["activation"], hw), None  # computes in cfg.shard's layout


@prices("max_pool2d")
def _max_pool2d(a: dict[str, Any], output: Any, hw: WormholeN150):
    return pool2d_cost(a["x"], a["spec"], a["cfg"], hw, "max_pool2d"), a["x"].memory


@prices("avg_pool2d")
def _avg_pool2d(a: dict[str, Any], output: Any, hw: WormholeN150):
    return pool2d_cost(a["x"], a["spec"], a["cfg"], hw, "avg_pool2d"), a["x"].memory


@prices("upsample_nearest")
def _upsample(a: dict[str, Any], output: Any, hw: WormholeN150):
    return upsample_cost(a["x"], a["scale"], hw), MemorySpec()


@prices("concat")
def _concat(a: dict[str, Any], output: Any, hw: WormholeN150):
    return concat_cost(a["xs"], hw), a["xs"][0].memory if _concat_in_place(a["xs"]) else MemorySpec()


@prices("add")
def _add(a: dict[str, Any], output: Any, hw: WormholeN150):
    act = a["activation"]
    fused = act is None or act.kind in ELTWISE_FUSED_ACTIVATIONS
    costs = [eltwise_cost(a["a"], 2, act if fused else None, hw, "add")]
    if not fused:
        costs.append(eltwise_cost(a["a"], 1, act, hw, act.kind))
    return costs, a["a"].memory


@prices("multiply")
def _multiply(a: dict[str, Any], output: Any, hw: WormholeN150):
    return [eltwise_cost(a["a"], 2, None, hw, "multiply")], a["a"].memory


@prices("activation")
def _activation(a: dict[str, Any], output: Any, hw: WormholeN150):
    return [eltwise_cost(a["x"], 1, a["act"], hw, a["act"].kind)], a["x"].memory


@prices("mean_hw")
def _mean_hw(a: dict[str, Any], output: Any, hw: WormholeN150):
    return mean_hw_cost(a["x"], hw), MemorySpec()


@prices("linear")
def _linear(a: dict[str, Any], output: Any, hw: WormholeN150):
    return linear_cost(a["x"], a["out_features"], a["cfg"], hw), MemorySpec()



# -- channel slices, four-sided conv padding, LayerNorm over channels ---------------------------------
# (the ops patterns/channel_slice.py, conv_same.py, layer_norm.py and split_attention.py run)


def slice_cost(x: DeviceTensor, start: int, stop: int, hw: WormholeN150 = N150) -> tuple[list[OpCost], MemorySpec]:
    """A height-sharded tiled map cut on tile columns: a local copy on each core. Any other slice: the
    map to L1 interleaved (when sharded), then the slice's pages read across the NoC. Returns the ops
    and the placement the slice gives its result."""
    part = dataclasses.replace(x, c=stop - start)
    grid = _grid(x)
    if (grid is not None and x.memory.layout is ShardLayout.HEIGHT and x.layout is Layout.TILE
            and start % TILE == 0 and stop % TILE == 0):
        memory = dataclasses.replace(x.memory, shard_shape=(x.memory.shard_shape[0], stop - start))
        out = dataclasses.replace(part, memory=memory)
        return [_op("slice", hw, _cores(x), f"{start}:{stop}, sharded", noc_bytes=_bytes_per_core(out))], memory
    costs = [reshard_cost(x, None, hw, "to interleaved")] if grid is not None else []
    out = dataclasses.replace(part, memory=MemorySpec())
    costs.append(_op("slice", hw, MAX_CORES, f"{start}:{stop}, interleaved", noc_bytes=2 * _bytes_per_core(out)))
    return costs, MemorySpec()


# reductions and eltwise passes of ttnn's layernorm kernel over each tile: x - mean, its square, two
# reductions, the rsqrt product, gamma and beta
LAYER_NORM_TILE_PASSES = 7


def layer_norm_cost(x: DeviceTensor, hw: WormholeN150 = N150) -> list[OpCost]:
    """To L1 interleaved (when sharded), then every tile through the kernel's passes."""
    costs = [reshard_cost(x, None, hw, "to interleaved")] if _grid(x) is not None else []
    flat = dataclasses.replace(x, memory=MemorySpec())
    costs.append(_op("layer_norm", hw, MAX_CORES, f"over {x.c} channels",
                     compute_cycles=_tiles_per_core(flat) * LAYER_NORM_TILE_PASSES * hw.tile_cycles,
                     noc_bytes=2 * _bytes_per_core(flat)))
    return costs


@prices("slice_channels")
def _slice_channels(a: dict[str, Any], output: Any, hw: WormholeN150):
    return slice_cost(a["x"], a["start"], a["stop"], hw)


@prices("conv2d_padded")
def _conv2d_padded(a: dict[str, Any], output: Any, hw: WormholeN150):
    top, bottom, left, right = a["padding"]
    x = a["x"]
    padded = dataclasses.replace(x, h=x.h + top + bottom, w=x.w + left + right)
    return conv2d_cost(padded, a["spec"], a["cfg"], a["activation"], hw), None


@prices("layer_norm")
def _layer_norm(a: dict[str, Any], output: Any, hw: WormholeN150):
    return layer_norm_cost(a["x"], hw), MemorySpec()


@prices("global_response_norm")
def _global_response_norm(a: dict[str, Any], output: Any, hw: WormholeN150):
    # to interleaved, then the square, mean, scale and shift passes over the map: priced as a LayerNorm's
    return layer_norm_cost(a["x"], hw), MemorySpec()


__all__ = ["BOUNDS", "PRICES", "OpCost", "concat_cost", "conv2d_cost", "conv_grid", "eltwise_cost", "layer_norm_cost",
           "linear_cost", "mean_hw_cost", "pool2d_cost", "price", "prices", "reshard_cost", "slice_cost", "transfer_cost",
           "upsample_cost"]
