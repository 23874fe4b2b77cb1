"""The Wormhole n150 cost model: op prices against first-principles arithmetic on the published
figures (4,096 FLOP/cycle/core at LoFi, 288 GB/s DRAM, tile sizes), the cores each op uses against
the shard grids ttnn picks, and the report built from one observed forward pass."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import ttswap
from ttswap.backends.base import DeviceTensor, MemorySpec
from ttswap.backends.l1 import conv_shard_grid, tensor_shard_grid
from ttswap.config import Activation, Conv2dSpec, DType, Fidelity, OpConfig, ShardLayout
from ttswap.cost import N150, OpCall, conv2d_cost, eltwise_cost, estimate, price, record_ops, reshard_cost

HEIGHT, BLOCK, WIDTH = ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH
# no launch, no block overhead: what is left of an op is its bounding term
BARE = dataclasses.replace(N150, op_launch_s=0.0, act_block_cycles=0.0)


def tensor(n: int, c: int, h: int, w: int, layout: ShardLayout | None = None) -> DeviceTensor:
    grid = tensor_shard_grid(layout, n * h * w, c) if layout else None
    return DeviceTensor(None, n, h, w, c, memory=grid.memory_spec() if grid else MemorySpec())


def conv_op(costs):
    return next(c for c in costs if c.op == "conv2d")


def test_matmul_conv_time_is_its_flops_over_the_matrix_engine_rate():
    # 1x1 conv, 256 -> 256 channels over 128x128 rows: height-sharded, 256 rows (8 tiles) per core
    spec = Conv2dSpec(256, 256, (1, 1))
    x = tensor(1, 256, 128, 128, HEIGHT)
    for fidelity, phases in [(Fidelity.LOFI, 1), (Fidelity.HIFI2, 2), (Fidelity.HIFI3, 3), (Fidelity.HIFI4, 4)]:
        op = conv_op(conv2d_cost(x, spec, OpConfig(shard=HEIGHT, fidelity=fidelity), hw=BARE))
        flops_per_core = 2 * 256 * 256 * 256
        rate = 4096 / phases * BARE.matmul_efficiency * BARE.clock_hz  # FLOP/s per core
        assert op.bound == "compute"
        assert op.cores == 64
        assert op.seconds == pytest.approx(flops_per_core / rate, rel=1e-9)


def test_fp32_accumulation_costs_compute():
    spec = Conv2dSpec(256, 256, (1, 1))
    x = tensor(1, 256, 128, 128, HEIGHT)
    plain = conv_op(conv2d_cost(x, spec, OpConfig(shard=HEIGHT), hw=BARE)).seconds
    fp32 = conv_op(conv2d_cost(x, spec, OpConfig(shard=HEIGHT, fp32_acc=True), hw=BARE)).seconds
    assert fp32 == pytest.approx(plain * BARE.fp32_acc_factor)


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
    assert op.cores == cores == conv_shard_grid(layout, spec, rows).num_cores


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
    x = tensor(1, 64, 56, 56, HEIGHT)  # 49 cores, each 64 rows x 64 channels: 2 x 2 bf16 tiles
    target = tensor_shard_grid(BLOCK, 56 * 56, 64)  # 8 x 2 cores, each 13 x 1 tiles
    op = reshard_cost(x, target, BARE)
    largest = max(2 * 2, (target.shard_rows // 32) * (target.shard_cols // 32)) * 2048
    assert op.bound == "noc"
    assert op.seconds == pytest.approx(largest / (32 * 1e9))


def test_moving_a_result_to_an_explicit_shard_is_priced():
    a = tensor(1, 64, 56, 56, HEIGHT)
    args = {"a": a, "b": a, "cfg": OpConfig(shard=BLOCK), "layer": "add", "activation": Activation("mish")}
    moved = OpCall("add", "ttswap.add", args, tensor(1, 64, 56, 56, BLOCK))
    assert [c.op for c in price(moved)] == ["add", "mish", "to_memory"]  # mish does not fuse into add
    kept = OpCall("add", "ttswap.add", {**args, "cfg": OpConfig()}, a)
    assert [c.op for c in price(kept)] == ["add", "mish"]


def test_small_ops_are_launch_bound_and_transcendental_activations_cost_more():
    small = eltwise_cost(tensor(1, 32, 8, 8, HEIGHT), 1, Activation("relu"))
    assert small.bound == "launch" and small.seconds == pytest.approx(N150.op_launch_s, rel=0.05)
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


def test_estimate_prices_every_layer_and_every_op_it_issues(converted):
    report = estimate(converted)
    layers = [layer.layer for layer in report.layers]
    assert layers == list(converted.report.layers)
    stem = report.layers[0]
    assert [o.op for o in stem.ops] == ["reshard input", "halo", "conv2d", "mish"]  # uploaded interleaved
    assert report.device_seconds == pytest.approx(sum(o.seconds for layer in report.layers for o in layer.ops))
    assert report.fps == pytest.approx(1 / report.device_seconds)
    assert report.device_ops == sum(len(layer.ops) for layer in report.layers)
    assert [t.rewriter for t in report.transfers] == ["transfer", "transfer"]
    assert report.end_to_end_seconds == pytest.approx(
        max(report.device_seconds, report.device_ops * N150.host_dispatch_s) + report.transfer_seconds)


def test_report_table_and_json(converted):
    report = estimate(converted)
    text = report.table()
    for layer in report.layers:
        assert layer.layer in text
    data = json.loads(report.to_json())
    assert data["fps"] == pytest.approx(report.fps)
    assert len(data["layers"]) == len(report.layers)
    assert sum(data["seconds_by_bound"].values()) == pytest.approx(report.device_seconds)


def test_recording_leaves_the_backend_and_modules_as_they_were(converted):
    with record_ops(converted) as calls:
        converted(torch.zeros(1, 3, 32, 32))
    assert calls and {c.op for c in calls} >= {"upload", "conv2d", "max_pool2d", "add", "mean_hw", "linear"}
    assert not {"conv2d", "upload"} & set(vars(converted.backend))  # the wrappers are gone
    assert all(not m._forward_pre_hooks for m in converted.graph_module.modules())
    conv = next(c for c in calls if c.op == "conv2d")
    assert conv.args["x"].payload is None  # descriptions only: no activations kept alive
