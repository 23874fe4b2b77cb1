"""The Wormhole n150 cost model: op prices against numbers worked out by hand from the documented
constants (docs/cost_model.md: 4,096 FLOP/cycle/core at LoFi, 1 GHz, 288 GB/s DRAM, 32 B/cycle NoC
links, ttnn's tile sizes of 2,048 B in bfloat16 and 1,088 B in bfloat8_b, the fitted 10% matrix-engine
efficiency), the cores each op uses against the shard grids ttnn picks in mock mode, and the report of
one observed forward pass against the ops ttnn runs for each layer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import ttswap
from ttswap.backends.base import DeviceTensor, MemorySpec
from ttswap.backends.l1 import tensor_shard_grid
from ttswap.config import Activation, Conv2dSpec, DType, Fidelity, OpConfig, ShardLayout
from ttswap.tuning.hardware import N150
from ttswap.tuning.pricing import conv2d_cost, eltwise_cost, price, reshard_cost
from ttswap.tuning.recording import OpCall, record_ops
from ttswap.tuning.report import estimate

HEIGHT, BLOCK, WIDTH = ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH
# no launch, no block overhead: what is left of an op is its bounding term
BARE = dataclasses.replace(N150, op_launch_s=0.0, act_block_cycles=0.0)


def tensor(n: int, c: int, h: int, w: int, layout: ShardLayout | None = None) -> DeviceTensor:
    grid = tensor_shard_grid(layout, n * h * w, c) if layout else None
    return DeviceTensor(None, n, h, w, c, memory=grid.memory_spec() if grid else MemorySpec())


def conv_op(costs):
    return next(c for c in costs if c.op == "conv2d")


# 1x1 conv, 256 -> 256 channels over 128x128 = 16,384 rows, height-sharded on 64 cores: 256 rows each.
# Per core 8 row tiles x 8 K tiles x 8 output tiles = 512 tile products of 65,536 FLOP; at 4,096
# FLOP/cycle that is 16 cycles each at LoFi (x2, x3, x4 at HiFi2/3/4), 8,192 cycles, and at the
# fitted 10% efficiency 81,920 cycles: 81.92 us at 1 GHz.
LOFI_256_CONV_S = 81.92e-6


@pytest.mark.parametrize("fidelity, phases", [(Fidelity.LOFI, 1), (Fidelity.HIFI2, 2), (Fidelity.HIFI3, 3),
                                              (Fidelity.HIFI4, 4)])
def test_matmul_conv_time_is_its_tile_products_at_the_published_rate(fidelity, phases):
    op = conv_op(conv2d_cost(tensor(1, 256, 128, 128, HEIGHT), Conv2dSpec(256, 256, (1, 1)),
                             OpConfig(shard=HEIGHT, fidelity=fidelity), hw=BARE))
    assert op.bound == "compute"
    assert op.cores == 64
    assert op.seconds == pytest.approx(LOFI_256_CONV_S * phases, rel=1e-9)


def test_fp32_accumulation_costs_a_quarter_more_compute():
    # docs/cost_model.md: fp32 Dst holds half the tiles, assumed 1.25x the matrix-engine time
    op = conv_op(conv2d_cost(tensor(1, 256, 128, 128, HEIGHT), Conv2dSpec(256, 256, (1, 1)),
                             OpConfig(shard=HEIGHT, fp32_acc=True), hw=BARE))
    assert op.seconds == pytest.approx(LOFI_256_CONV_S * 1.25, rel=1e-9)


@pytest.mark.parametrize("layout, rows, in_channels, out_channels, cores", [
    (HEIGHT, 7 * 7, 64, 64, 2),  # 49 rows: two 32-row tiles, one per core
    (HEIGHT, 56 * 56, 64, 64, 49),  # 98 row tiles: two per core fill 49 cores
    (BLOCK, 14 * 14, 256, 256, 7 * 8),  # 7 row tiles over 7 grid rows, 8 channel tiles over 8 columns
    (WIDTH, 7 * 7, 1024, 1024, 32),  # 32 channel tiles, one per core
])
def test_conv_runs_on_the_cores_its_shard_grid_uses(layout, rows, in_channels, out_channels, cores):
    side = int(rows ** 0.5)
    spec = Conv2dSpec(in_channels, out_channels, (1, 1))
    op = conv_op(conv2d_cost(tensor(1, in_channels, side, side, layout), spec, OpConfig(shard=layout)))
    assert op.cores == cores  # the core counts ttnn 0.81.1 chose in mock mode


def test_weights_stream_from_dram_at_the_bfloat8_b_tile_size():
    # 1x1 conv on one pixel, 2048 -> 2048: nothing to compute, 4M weights to read, width-sharded over
    # every core so the read is bounded by DRAM, not by one reader's NoC link
    spec = Conv2dSpec(2048, 2048, (1, 1))
    x = tensor(1, 2048, 1, 1, WIDTH)
    tiles = (2048 // 32) ** 2
    for dtype, tile_bytes in [(DType.BF16, 2048), (DType.BFP8_B, 1088)]:
        op = conv_op(conv2d_cost(x, spec, OpConfig(shard=WIDTH, weight_dtype=dtype), hw=BARE))
        assert op.bound == "dram"
        assert op.seconds == pytest.approx(tiles * tile_bytes / 288e9)


def test_input_in_another_layout_is_resharded_first():
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    same = conv2d_cost(tensor(1, 64, 56, 56, HEIGHT), spec, OpConfig(shard=HEIGHT))
    other = conv2d_cost(tensor(1, 64, 56, 56, BLOCK), spec, OpConfig(shard=HEIGHT))
    assert [c.op for c in same] == ["halo", "conv2d"]  # a windowed conv gathers its halo first
    assert [c.op for c in other] == ["reshard input", "halo", "conv2d"]


def test_reshard_moves_the_larger_shard_over_one_noc_link_per_core():
    x = tensor(1, 64, 56, 56, HEIGHT)  # 98 row tiles on 49 cores: 2 x 2 bf16 tiles each
    # block: 98 row tiles over 8 grid rows (13 each), 2 channel tiles over 2 columns: 13 tiles, 26,624 B,
    # moved at 32 B/cycle: 832 cycles
    op = reshard_cost(x, tensor_shard_grid(BLOCK, 56 * 56, 64), BARE)
    assert (op.bound, op.cores) == ("noc", 49)
    assert op.seconds == pytest.approx(832e-9)


def test_moving_a_result_to_an_explicit_shard_is_priced():
    a = tensor(1, 64, 56, 56, HEIGHT)
    args = {"a": a, "b": a, "cfg": OpConfig(shard=BLOCK), "layer": "add", "activation": Activation("mish")}
    moved = OpCall("add", "ttswap.add", args, tensor(1, 64, 56, 56, BLOCK))
    assert [c.op for c in price(moved)] == ["add", "mish", "to_memory"]  # mish does not fuse into add
    kept = OpCall("add", "ttswap.add", {**args, "cfg": OpConfig()}, a)
    assert [c.op for c in price(kept)] == ["add", "mish"]


def test_small_ops_are_launch_bound_and_transcendental_activations_cost_more():
    small = eltwise_cost(tensor(1, 32, 8, 8, HEIGHT), 1, Activation("relu"))
    assert small.bound == "launch" and small.seconds == pytest.approx(12e-6, rel=0.05)  # the fitted launch cost
    big = tensor(1, 64, 160, 160, HEIGHT)
    mish, relu = (eltwise_cost(big, 1, Activation(kind), BARE).seconds for kind in ("mish", "relu"))
    assert mish > 4 * relu


class Small(nn.Module):
    """conv+BN+mish (mish runs as its own op), a pool, a residual add, a classifier head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.Mish())
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    return ttswap.convert(Small().eval(), "ese_vovnet", input_shape=(1, 3, 32, 32), backend="emulated", cache=False)


def test_estimate_prices_every_layer_and_every_op_ttnn_runs_for_it(converted):
    report = estimate(converted)
    assert [layer.layer for layer in report.layers] == list(converted.report.layers)
    ops = {layer.layer: [o.op for o in layer.ops] for layer in report.layers}
    assert ops == {
        "stem": ["reshard input", "halo", "conv2d", "mish"],  # uploaded interleaved; mish does not fuse
        "pool": ["halo", "max_pool2d"],
        "body": ["reshard input", "halo", "conv2d"],  # relu fuses into the conv
        "add": ["add", "to_memory"],
        "mean": ["to interleaved", "mean", "to_memory", "to interleaved", "linear", "to_memory"],
    }
    # every op here is small: launch-bound, 12 us each (the fitted launch cost)
    assert all(o.bound == "launch" and 12e-6 <= o.seconds < 21e-6 for layer in report.layers for o in layer.ops)
    # the upload: 1x3x32x32 as 3 channel tiles' worth of 1,024 rows, 6,144 B over PCIe at 10 GB/s after
    # 50 us latency; the download: 10 logits, 20 B
    upload, download = report.transfers
    assert upload.seconds == pytest.approx(50e-6 + 6144 / 10e9)
    assert download.seconds == pytest.approx(50e-6 + 20 / 10e9)
    assert report.device_ops == 17


def test_report_table_and_json(converted):
    report = estimate(converted)
    text = report.table()
    for layer in report.layers:
        assert layer.layer in text
    data = json.loads(report.to_json())
    assert [(d["layer"], [o["op"] for o in d["ops"]]) for d in data["layers"]] == \
        [(layer.layer, [o.op for o in layer.ops]) for layer in report.layers]
    assert data["seconds_by_bound"]["launch"] > 0 and data["seconds_by_bound"]["compute"] == 0  # all launch-bound


def test_every_recorded_op_has_a_price_and_every_price_an_op():
    # the price table is what recording wraps: a backend op without a price would go unrecorded
    from ttswap.backends.base import Backend
    from ttswap.tuning.pricing import PRICES

    ops = {name for name, member in vars(Backend).items() if getattr(member, "__isabstractmethod__", False)}
    priced = set(PRICES)
    assert priced <= ops | {"to_memory", "to_layout"}
    assert {"conv2d", "max_pool2d", "avg_pool2d", "add", "multiply", "activation", "concat", "upsample_nearest",
            "mean_hw", "linear", "upload", "download"} <= priced


def test_recording_leaves_the_backend_and_modules_as_they_were(converted):
    with record_ops(converted) as calls:
        converted(torch.zeros(1, 3, 32, 32))
    assert calls and {c.op for c in calls} >= {"upload", "conv2d", "max_pool2d", "add", "mean_hw", "linear"}
    assert not {"conv2d", "upload"} & set(vars(converted.backend))  # the wrappers are gone
    assert all(not m._forward_pre_hooks for m in converted.graph_module.modules())
    conv = next(c for c in calls if c.op == "conv2d")
    assert conv.args["x"].payload is None  # descriptions only: no activations kept alive
