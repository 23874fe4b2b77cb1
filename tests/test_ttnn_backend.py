"""TtnnBackend against the real ttnn library in mock mode.

Mock mode computes nothing (results read back as zeros), so these tests check what it does make
real: output shapes, dtypes, layouts and placements (shard layout, core count, shard shape), each
against numbers worked out by hand from torch's size rules and ttnn's tiling and sharding rules.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ttswap.backends import get_backend
from ttswap.backends.base import DeviceTensor, L1BudgetError
from ttswap.config import Activation, Conv2dSpec, DType, Layout, OpConfig, Pool2dSpec, ShardLayout

pytestmark = pytest.mark.ttnn_mock

HEIGHT, BLOCK, WIDTH, INTERLEAVED = ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH, ShardLayout.INTERLEAVED
KEEP = OpConfig(deallocate=False)  # inputs are reused across tests


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def height_sharding(rows: int) -> tuple[int, int]:
    """(cores, rows per core): whole 32-row tiles, as few per core as 64 cores allow."""
    tiles = ceil_div(rows, 32)
    per_core = ceil_div(tiles, 64)
    return ceil_div(tiles, per_core), per_core * 32


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("ttnn", reason="ttnn is not installed (pip install 'ttswap[tt]')")
    from ttswap.backends.ttnn_backend import TtnnBackend
    from ttswap.mock import ensure_mock_mode

    ensure_mock_mode()
    backend = TtnnBackend()
    yield backend
    backend.close()


def upload(backend, n: int, c: int, h: int, w: int, cfg: OpConfig = KEEP) -> DeviceTensor:
    return backend.upload(torch.randn(n, c, h, w), cfg, "input")


def conv(backend, x: DeviceTensor, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1,
         bias: bool = False, cfg: OpConfig = KEEP, layer: str = "conv", activation: Activation | None = None):
    spec = Conv2dSpec(x.c, out_channels, (kernel, kernel), (stride, stride), (kernel // 2, kernel // 2), groups=groups)
    weight = torch.randn(out_channels, x.c // groups, kernel, kernel)
    prepared = backend.prepare_conv(weight, torch.randn(out_channels) if bias else None, spec, cfg, layer)
    return backend.conv2d(x, prepared, spec, cfg, layer, activation), prepared


def assert_placement(t: DeviceTensor, layout: ShardLayout, cores: int | None = None, shard: tuple | None = None):
    assert t.memory.layout is layout, t.memory
    assert t.memory.num_cores == cores, t.memory
    assert t.memory.shard_shape == shard, t.memory


def assert_matches_payload(t: DeviceTensor):
    """The metadata agrees with the ttnn tensor it describes."""
    assert tuple(t.payload.shape) == (1, 1, t.nhw, t.c)
    assert tuple(t.payload.padded_shape) == t.padded_shape


# -- transfers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, layout", [(DType.BF16, Layout.ROW_MAJOR), (DType.BFP8_B, Layout.TILE)])
def test_upload_download_round_trip_shape(backend, dtype, layout):
    x = torch.randn(2, 3, 9, 7)
    t = backend.upload(x, OpConfig(act_dtype=dtype), "input")
    assert (t.n, t.h, t.w, t.c, t.dtype, t.layout) == (2, 9, 7, 3, dtype, layout)
    assert t.memory.layout is INTERLEAVED and t.memory.buffer == "L1"
    assert_matches_payload(t)
    back = backend.download(t)
    assert back.shape == x.shape and back.dtype == torch.float32


# -- conv2d --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "in_shape, out_channels, kernel, stride, groups, cfg, layout, cores, shard",
    [
        # 28*28 = 784 rows = 25 tiles: one tile-row on each of 25 cores
        pytest.param((1, 32, 28, 28), 64, 3, 1, 1, OpConfig(shard=HEIGHT, weight_dtype=DType.BF16),
                     HEIGHT, 25, (32, 64), id="height-bf16"),
        # 4 channel tiles across x; 25 tile-rows as 4 per core over 7 rows of cores
        pytest.param((1, 64, 28, 28), 128, 3, 1, 1, OpConfig(shard=BLOCK), BLOCK, 28, (128, 32), id="block-bfp8"),
        # 8 channel tiles over 8 cores, all 49 (-> 64) rows on each
        pytest.param((1, 128, 7, 7), 256, 1, 1, 1, OpConfig(shard=WIDTH), WIDTH, 8, (64, 32), id="width-1x1"),
        pytest.param((1, 32, 56, 56), 64, 3, 2, 1, OpConfig(shard=HEIGHT), HEIGHT, 25, (32, 64), id="stride2"),
        # 56*56 = 3136 rows = 98 tiles: 2 per core on 49 cores
        pytest.param((1, 64, 56, 56), 64, 3, 1, 64, OpConfig(shard=HEIGHT), HEIGHT, 49, (64, 64), id="depthwise"),
        # AUTO: 196 rows against 64 channels is 3x, short of 8x -> BLOCK
        pytest.param((1, 64, 14, 14), 64, 3, 1, 1, OpConfig(), BLOCK, 14, (32, 32), id="auto"),
        pytest.param((1, 16, 14, 14), 32, 3, 1, 1, OpConfig(shard=INTERLEAVED), INTERLEAVED, None, None,
                     id="interleaved"),
    ],
)
def test_conv2d_output_placement(backend, in_shape, out_channels, kernel, stride, groups, cfg, layout, cores, shard):
    cfg = cfg.replace(deallocate=False)
    x = upload(backend, *in_shape)
    y, prepared = conv(backend, x, out_channels, kernel, stride, groups, cfg=cfg)
    expected_hw = F.conv2d(torch.zeros(in_shape), torch.zeros(out_channels, in_shape[1] // groups, kernel, kernel),
                           stride=stride, padding=kernel // 2, groups=groups).shape[2:]
    assert (y.n, y.h, y.w, y.c) == (in_shape[0], *expected_hw, out_channels)
    assert (y.dtype, y.layout) == (DType.BF16, Layout.TILE)
    assert_placement(y, layout, cores, shard)
    assert_matches_payload(y)
    import ttnn

    weights_dtype = ttnn.bfloat16 if cfg.weight_dtype is DType.BF16 else ttnn.bfloat8_b
    assert prepared.device_weights[0].dtype == weights_dtype


@pytest.mark.parametrize("groups", [1, 4, 128])
def test_grouped_conv_weights_are_prepared_as_one_dense_matrix(backend, groups):
    # the cost model (ttswap.tuning.pricing) prices a depthwise conv as a dense one because ttnn 0.81.1 does
    # this: its 2D grouped path expands the weights block-diagonally to [kh*kw*C_in, C_out] (its depthwise
    # kernel is 1D only)
    from ttswap.tuning.pricing import conv2d_cost

    x = upload(backend, 1, 128, 28, 28)
    cfg = KEEP.replace(shard=HEIGHT, deallocate=False)
    _, prepared = conv(backend, x, 128, kernel=3, groups=groups, cfg=cfg)
    assert tuple(prepared.device_weights[0].padded_shape) == (1, 1, 9 * 128, 128)
    dense = Conv2dSpec(128, 128, (3, 3), (1, 1), (1, 1))
    grouped = Conv2dSpec(128, 128, (3, 3), (1, 1), (1, 1), groups=groups)
    assert [c.seconds for c in conv2d_cost(x, grouped, cfg)] == [c.seconds for c in conv2d_cost(x, dense, cfg)]


def test_conv2d_1x1_with_bias_and_bfp8_output(backend):
    import ttnn

    x = upload(backend, 1, 64, 14, 14)
    cfg = KEEP.replace(shard=HEIGHT, act_dtype=DType.BFP8_B)
    y, prepared = conv(backend, x, 128, kernel=1, bias=True, cfg=cfg, activation=Activation("relu"))
    cores, rows = height_sharding(14 * 14)
    assert (y.h, y.w, y.c, y.dtype) == (14, 14, 128, DType.BFP8_B)
    assert_placement(y, HEIGHT, cores, (rows, 128))
    weight, bias = prepared.device_weights
    # the bias is prepared in the weights' dtype, as one tile-row of channels
    assert bias.dtype == ttnn.bfloat8_b and tuple(bias.padded_shape)[-2:] == (32, 128)
    assert ttnn.is_tensor_storage_on_device(weight)


def test_conv2d_reuses_prepared_device_weights(backend, monkeypatch):
    import ttnn

    passed = []
    real_conv2d = ttnn.conv2d
    monkeypatch.setattr(ttnn, "conv2d", lambda **kw: passed.append(kw["weight_tensor"]) or real_conv2d(**kw))
    x = upload(backend, 1, 32, 16, 16)
    cfg = KEEP.replace(shard=HEIGHT)
    y, prepared = conv(backend, x, 64, cfg=cfg)
    backend.conv2d(x, prepared, Conv2dSpec(32, 64, (3, 3), padding=(1, 1)), cfg, "conv")
    # host weights first; the device weights that call prepared the second time
    assert not ttnn.is_tensor_storage_on_device(passed[0])
    assert ttnn.is_tensor_storage_on_device(passed[1])
    assert tuple(passed[1].shape) == tuple(prepared.device_weights[0].shape)


def test_conv2d_reshards_input_to_requested_layout(backend):
    x = upload(backend, 1, 32, 28, 28)
    y, _ = conv(backend, x, 64, cfg=KEEP.replace(shard=HEIGHT))
    z, _ = conv(backend, y, 128, cfg=KEEP.replace(shard=BLOCK))
    assert_placement(z, BLOCK, 28, (128, 32))


@pytest.mark.parametrize("kind", ["relu", "mish", "leaky_relu", "hardswish"])
def test_conv2d_activation_fused_or_separate_keeps_placement(backend, kind):
    x = upload(backend, 1, 32, 8, 8)
    act = Activation(kind, 0.1 if kind == "leaky_relu" else None)
    for kernel in (1, 3):  # 1x1 convs take ttnn's matmul path, which fuses fewer activations
        y, _ = conv(backend, x, 64, kernel=kernel, cfg=KEEP.replace(shard=HEIGHT), activation=act)
        assert_placement(y, HEIGHT, 2, (32, 64))


def test_conv2d_oversized_act_block_h_raises_l1_error_naming_layer(backend):
    x = upload(backend, 1, 64, 56, 56)
    with pytest.raises(L1BudgetError, match="stages.0.conv") as caught:
        conv(backend, x, 64, cfg=KEEP.replace(shard=HEIGHT, act_block_h=32 * 98), layer="stages.0.conv")
    assert caught.value.needed > caught.value.available


def test_ttnn_validation_error_names_layer(backend):
    from ttswap.backends.ttnn_backend import TtnnOpError

    x, _ = conv(backend, upload(backend, 1, 16, 8, 8), 48, cfg=KEEP.replace(shard=HEIGHT))
    rows = backend.to_layout(x, Layout.ROW_MAJOR, "neck.untilize")
    # 48-channel row-major shards cannot be tiled in place: a tile is 32 wide
    with pytest.raises(TtnnOpError, match="'neck.tilize'.*to_layout.*tile") as caught:
        backend.to_layout(rows, Layout.TILE, "neck.tilize")
    assert "backtrace" not in str(caught.value)


def test_reusing_an_input_freed_by_deallocate_raises_instead_of_crashing(backend):
    from ttswap.backends.ttnn_backend import TtnnOpError

    x = upload(backend, 1, 32, 8, 8)
    conv(backend, x, 32, cfg=OpConfig(deallocate=True), layer="stem.conv")
    # ttnn itself would segfault on the freed buffer
    with pytest.raises(TtnnOpError, match="'stages.0.conv'.*deallocate=True"):
        conv(backend, x, 32, layer="stages.0.conv")


# -- pooling and resampling ----------------------------------------------------------------------
def test_max_pool2d_ceil_mode_keeps_input_grid(backend):
    x, _ = conv(backend, upload(backend, 1, 16, 56, 56), 32, cfg=KEEP.replace(shard=HEIGHT))
    cores, _ = height_sharding(56 * 56)
    spec = Pool2dSpec((3, 3), (2, 2), ceil_mode=True)
    y = backend.max_pool2d(x, spec, KEEP, "stages.1.pool")
    expected = F.max_pool2d(torch.zeros(1, 32, 56, 56), 3, 2, ceil_mode=True).shape[2:]
    assert (y.h, y.w) == tuple(expected) == (28, 28)
    # 784 output rows over the input's 49 cores: 16 each, a whole tile once tiled
    assert_placement(y, HEIGHT, cores, (32, 32))
    assert_matches_payload(y)


def test_max_pool2d_from_interleaved_shards_by_cfg(backend):
    x = upload(backend, 1, 32, 7, 7)
    y = backend.max_pool2d(x, Pool2dSpec((3, 3), (2, 2), ceil_mode=True), KEEP.replace(shard=HEIGHT), "pool")
    assert (y.h, y.w, y.c) == (3, 3, 32) and y.memory.layout is HEIGHT


def test_spp_pools_and_sharded_concat(backend):
    x, _ = conv(backend, upload(backend, 1, 64, 10, 10), 128, kernel=1, cfg=KEEP.replace(shard=HEIGHT))
    cores, rows = height_sharding(100)
    pools = [backend.max_pool2d(x, Pool2dSpec((k, k), (1, 1), (k // 2, k // 2)), KEEP, f"spp.pool{k}")
             for k in (13, 9, 5)]
    for pool in pools:
        assert (pool.h, pool.w, pool.c) == (10, 10, 128)
        assert_placement(pool, HEIGHT, cores, (rows, 128))
    y = backend.concat([*pools, x], KEEP, "spp.cat")
    assert (y.h, y.w, y.c) == (10, 10, 512)
    assert_placement(y, HEIGHT, cores, (rows, 512))


def test_upsample_nearest_x2(backend):
    x, _ = conv(backend, upload(backend, 1, 64, 10, 10), 128, kernel=1, cfg=KEEP.replace(shard=HEIGHT))
    y = backend.upsample_nearest(x, 2, KEEP, "neck.upsample")
    assert (y.n, y.h, y.w, y.c, y.layout) == (1, 20, 20, 128, Layout.TILE)
    assert_placement(y, INTERLEAVED)
    assert y.padded_shape == (1, 1, 416, 128)
    assert_matches_payload(y)


def test_upsample_batch_of_two_to_requested_sharding(backend):
    x = upload(backend, 2, 32, 8, 8)
    y = backend.upsample_nearest(x, 2, KEEP.replace(shard=HEIGHT), "up")
    cores, rows = height_sharding(2 * 16 * 16)
    assert (y.n, y.h, y.w) == (2, 16, 16)
    assert_placement(y, HEIGHT, cores, (rows, 32))


# -- concat --------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [(64, 32), (48, 48)])  # whole tiles, and ragged (via row-major)
def test_concat_height_sharded_stays_sharded(backend, channels):
    x = upload(backend, 1, 16, 28, 28)
    parts = [conv(backend, x, c, cfg=KEEP.replace(shard=HEIGHT))[0] for c in channels]
    y = backend.concat(parts, KEEP, "cat")
    assert (y.c, y.layout) == (sum(channels), Layout.TILE)
    assert_placement(y, HEIGHT, 25, (32, sum(channels)))
    assert_matches_payload(y)


def test_concat_block_sharded_stays_sharded(backend):
    x = upload(backend, 1, 256, 14, 14)
    a, _ = conv(backend, x, 256, kernel=1, cfg=KEEP.replace(shard=BLOCK))
    b, _ = conv(backend, x, 256, kernel=1, cfg=KEEP.replace(shard=BLOCK))
    assert_placement(a, BLOCK, 56, (32, 32))
    y = backend.concat([a, b], KEEP, "cat")
    assert y.c == 512
    assert_placement(y, BLOCK, 56, (32, 64))


def test_concat_of_differently_sharded_inputs_goes_interleaved(backend):
    x = upload(backend, 1, 32, 28, 28)
    a, _ = conv(backend, x, 64, cfg=KEEP.replace(shard=HEIGHT))
    b, _ = conv(backend, x, 48, cfg=KEEP.replace(shard=BLOCK))
    y = backend.concat([a, b, x], KEEP.replace(act_dtype=DType.BFP8_B), "cat")
    assert (y.c, y.dtype) == (64 + 48 + 32, DType.BFP8_B)
    assert_placement(y, INTERLEAVED)
    assert_matches_payload(y)


def test_concat_rejects_mismatched_spatial_size(backend):
    with pytest.raises(ValueError, match="'cat'"):
        backend.concat([upload(backend, 1, 32, 8, 8), upload(backend, 1, 32, 4, 4)], KEEP, "cat")


# -- elementwise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, Activation("relu"), Activation("leaky_relu", 0.1), Activation("mish")])
def test_add_keeps_placement_with_fused_or_separate_activation(backend, activation):
    x = upload(backend, 1, 16, 28, 28)
    a, _ = conv(backend, x, 64, cfg=KEEP.replace(shard=HEIGHT))
    b, _ = conv(backend, x, 64, cfg=KEEP.replace(shard=HEIGHT))
    y = backend.add(a, b, KEEP.replace(act_dtype=DType.BFP8_B), "residual", activation)
    assert (y.h, y.w, y.c, y.dtype) == (28, 28, 64, DType.BFP8_B)
    assert_placement(y, HEIGHT, 25, (32, 64))


@pytest.mark.parametrize("n", [1, 2])
def test_multiply_broadcasts_squeeze_excitation_scale(backend, n):
    x, _ = conv(backend, upload(backend, n, 16, 14, 14), 64, cfg=KEEP.replace(shard=BLOCK))
    pooled = backend.mean_hw(x, KEEP, "attn.mean")
    assert (pooled.n, pooled.h, pooled.w, pooled.c) == (n, 1, 1, 64)
    scale, _ = conv(backend, pooled, 64, kernel=1, bias=True, layer="attn.fc", activation=Activation("hardsigmoid"))
    assert scale.memory.layout is not INTERLEAVED  # the fc conv shards its [n,1,1,64] output
    y = backend.multiply(x, scale, KEEP, "attn.mul")
    assert (y.n, y.h, y.w, y.c) == (n, 14, 14, 64)
    assert y.memory == x.memory  # placed like the activation, not like the scale
    assert_matches_payload(y)


def test_multiply_rejects_incompatible_shapes(backend):
    with pytest.raises(ValueError, match="'attn.mul'"):
        backend.multiply(upload(backend, 1, 32, 4, 4), upload(backend, 1, 16, 1, 1), KEEP, "attn.mul")


@pytest.mark.parametrize("kind", Activation.KINDS)
def test_activation_keeps_shape_dtype_and_placement(backend, kind):
    x, _ = conv(backend, upload(backend, 1, 16, 14, 14), 64, cfg=KEEP.replace(shard=HEIGHT, act_dtype=DType.BFP8_B))
    y = backend.activation(x, Activation(kind, 0.1 if kind == "leaky_relu" else None), KEEP, f"act.{kind}")
    assert (y.h, y.w, y.c, y.dtype, y.layout) == (14, 14, 64, DType.BFP8_B, Layout.TILE)
    assert y.memory == x.memory


# -- reductions and matmul -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_mean_hw_and_linear(backend, n):
    x, _ = conv(backend, upload(backend, n, 16, 7, 7), 64, cfg=KEEP.replace(shard=HEIGHT))
    pooled = backend.mean_hw(x, KEEP, "head.pool")
    assert (pooled.n, pooled.h, pooled.w, pooled.c) == (n, 1, 1, 64)
    assert_placement(pooled, INTERLEAVED)
    weights = backend.prepare_linear(torch.randn(10, 64), torch.randn(10), KEEP, "head.fc")
    logits = backend.linear(pooled, weights, KEEP.replace(act_dtype=DType.BFP8_B), "head.fc")
    assert (logits.n, logits.h, logits.w, logits.c, logits.dtype) == (n, 1, 1, 10, DType.BFP8_B)
    assert logits.padded_shape == (1, 1, 32, 32)
    assert_matches_payload(logits)
    assert backend.download(logits).shape == (n, 10, 1, 1)


# -- memory and layout ---------------------------------------------------------------------------
def test_to_memory_round_trip(backend):
    x, _ = conv(backend, upload(backend, 1, 16, 28, 28), 64, cfg=KEEP.replace(shard=HEIGHT))
    # 2 channel tiles: BLOCK splits them over x=2 with 25 tile-rows as 4 per core on 7 rows;
    # WIDTH puts one tile column on each of 2 cores with all 800 rows
    expected = [(BLOCK, 14, (128, 32)), (WIDTH, 2, (800, 32)), (INTERLEAVED, None, None), (HEIGHT, 25, (32, 64))]
    t = x
    for layout, cores, shard in expected:
        t = backend.to_memory(t, layout, f"to_{layout.value}")
        assert (t.h, t.w, t.c) == (28, 28, 64)
        assert_placement(t, layout, cores, shard)
    assert t.memory == x.memory


def test_to_layout_round_trip(backend):
    x, _ = conv(backend, upload(backend, 1, 16, 28, 28), 48, cfg=KEEP.replace(shard=HEIGHT))
    assert x.padded_shape == (1, 1, 800, 64)
    rows = backend.to_layout(x, Layout.ROW_MAJOR, "untilize")
    assert (rows.layout, rows.padded_shape) == (Layout.ROW_MAJOR, (1, 1, 784, 48))
    assert_placement(rows, HEIGHT, 25, (32, 48))
    tiles = backend.to_layout(backend.to_memory(rows, INTERLEAVED, "i"), Layout.TILE, "tilize")
    assert (tiles.layout, tiles.padded_shape) == (Layout.TILE, (1, 1, 800, 64))
    assert_matches_payload(tiles)


# -- error translation, backend selection, mock set-up -------------------------------------------
@pytest.mark.parametrize(
    "message, needed, available",
    [
        ("Statically allocated circular buffers on core range [0-0 - 3-0] grow to 3766304 B which is beyond "
         "max L1 size of 1499136 B", 3766304, 1499136),
        ("Statically allocated dataflow buffers on core range [0-0 - 1-0] grow to 1672544 B which is beyond "
         "max L1 size of 1499136 B", 1672544, 1499136),
        ("Statically allocated circular buffers in program 16 clash with L1 buffers on core range [0-0 - 1-0]. "
         "L1 buffer allocated at 1053056 and static circular buffer region ends at 1323168", 1323168, 1053056),
        ("Out of Memory: Not enough space to allocate 3211264 B L1 buffer across 1 banks, where each bank needs "
         "to store 3211264 B, but bank size is 1376928 B (allocated: 12544 B)", 3211264, 1376928),
    ],
)
def test_l1_overflow_messages_become_l1_budget_errors(backend, message, needed, available):
    from ttswap.backends.ttnn_backend import _translate

    raised = RuntimeError(f"TT_THROW @ program.cpp:1: tt::exception\ninfo:\n{message}\nbacktrace:\n --- frame")
    error = _translate("neck.conv3", "conv2d", raised)
    assert isinstance(error, L1BudgetError)
    assert (error.layer, error.needed, error.available) == ("neck.conv3", needed, available)
    assert "backtrace" not in str(error)


def test_get_backend_names(backend, monkeypatch, caplog):
    import types

    import ttswap.backends as backends

    with pytest.raises(ValueError, match="auto, emulated, ttnn"):
        get_backend("cuda")
    ttnn_backend = get_backend("ttnn")
    assert ttnn_backend.name == "ttnn" and ttnn_backend.mock
    ttnn_backend.close()
    # "auto" without a device: the emulated backend (a stand-in here; it has its own tests), said once
    emulated = types.ModuleType("ttswap.backends.emulated")
    emulated.EmulatedBackend = type("EmulatedBackend", (), {"name": "emulated"})
    monkeypatch.setitem(sys.modules, "ttswap.backends.emulated", emulated)
    monkeypatch.setattr(backends, "tenstorrent_device_present", lambda: False)
    with caplog.at_level(logging.INFO, logger="ttswap"):
        chosen = get_backend("auto")
    assert chosen.name == "emulated"
    assert len(caplog.records) == 1 and "emulated" in caplog.records[0].getMessage()


def test_importing_ttswap_does_not_import_ttnn():
    probe = "import sys, ttswap, ttswap.backends; assert 'ttnn' not in sys.modules, 'ttnn was imported'"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_mock_setup_from_a_deb_in_a_fresh_dir(backend, tmp_path, monkeypatch):
    """A fresh mock dir holding only the .deb gets binutils, stub objects and a compiler pointing at
    them, and that compiler links a kernel ELF against the wheel's real linker script."""
    import ttswap.mock as mock

    debs = sorted((mock.mock_dir() / "debs").glob(f"{mock.BINUTILS_PACKAGE}_*.deb"))
    if not debs:
        pytest.skip("binutils were not installed from a .deb in the mock dir")
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / debs[-1].name).symlink_to(debs[-1])
    ttnn_dir = mock.ttnn_package_dir()
    compiler = ttnn_dir / mock.COMPILER_PATH
    try:
        monkeypatch.setenv(mock.MOCK_DIR_ENV, str(tmp_path))
        mock.ensure_mock_mode()
        assert str(tmp_path) in compiler.read_text()
        version = subprocess.run([str(compiler), "--version"], capture_output=True, text=True).stdout
        assert version.strip() == mock.sfpi_banner(ttnn_dir) and "tenstorrent/sfpi:" in version
        script = ttnn_dir / "runtime" / "hw" / "toolchain" / "wormhole" / "kernel_brisc.ld"
        firmware = sorted((ttnn_dir / "tt_metal" / "pre-compiled").glob("*/brisc/brisc_weakened.elf"))[0]
        elf = tmp_path / "brisc.elf"
        link = [str(compiler), "-O2", f"-Wl,--just-symbols={firmware}", "-Wl,-z,max-page-size=16",
                "-Wl,--emit-relocs", f"-T{script}", str(tmp_path / "brisck.o"), "-o", str(elf)]
        subprocess.run([str(compiler), "-c", "kernel.cc", "-o", str(tmp_path / "brisck.o")], check=True)
        subprocess.run(link, check=True, capture_output=True)
        readelf = tmp_path / "binutils" / "usr" / "bin" / "riscv64-unknown-elf-readelf"
        sections = subprocess.run([str(readelf), "-S", str(elf)], capture_output=True, text=True).stdout
        assert ".rela.text" in sections and elf.read_bytes()[:4] == b"\x7fELF"
    finally:
        monkeypatch.undo()
        mock.ensure_mock_mode()  # point the compiler back at the shared mock dir
    assert str(mock.mock_dir()) in compiler.read_text()


def test_ensure_mock_mode_is_quick_once_done(backend):
    import time

    from ttswap.mock import CLUSTER_DESCRIPTOR, ensure_mock_mode

    start = time.perf_counter()
    variables = ensure_mock_mode()
    assert time.perf_counter() - start < 1.0
    assert Path(variables["TT_METAL_MOCK_CLUSTER_DESC_PATH"]).exists()
    assert variables["TT_METAL_CACHE"].endswith("/") and Path(variables["TT_METAL_CACHE"]).is_dir()
    assert CLUSTER_DESCRIPTOR.exists()


def _own_circular_buffer_peak(backend, run) -> int:
    """Per-core bytes of the circular buffers a program allocates for itself (not on a tensor)."""
    import ttnn

    backend.device.clear_program_cache()  # a cached program would not allocate its buffers anew
    ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
    try:
        run()
    finally:
        trace = ttnn.graph.end_graph_capture()
    total = peak = 0
    for node in trace:
        if node["node_type"] == "circular_buffer_allocate" and node["params"]["globally_allocated"] == "0":
            total += int(node["params"]["size"])
            peak = max(peak, total)
        elif node["node_type"] == "circular_buffer_deallocate_all":
            total = 0
    return peak


@pytest.mark.parametrize("layout, act_dtype, fp32_acc, extra", [
    (HEIGHT, DType.BF16, True, 2 * 4096),  # fp32 partials: 2 output tiles per core
    (HEIGHT, DType.BF16, False, 0),  # bfloat16 partials are the output's own format: shared
    (HEIGHT, DType.BFP8_B, False, 2 * 2048),  # bfloat16 partials next to a bfloat8_b output
    (BLOCK, DType.BF16, True, 4 * 4096),
])
def test_packer_l1_acc_reaches_ttnn_and_its_partials_buffer_is_estimated(backend, layout, act_dtype, fp32_acc, extra):
    from ttswap.backends.l1 import estimate_conv_l1

    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    peaks, estimates = [], []
    for l1_acc in (False, True):
        cfg = OpConfig(shard=layout, act_dtype=act_dtype, weight_dtype=DType.BF16, fp32_acc=fp32_acc,
                       packer_l1_acc=l1_acc, deallocate=False)
        x = upload(backend, 1, 64, 28, 28, cfg)
        weights = backend.prepare_conv(torch.randn(64, 64, 3, 3), torch.randn(64), spec, cfg, "c")
        peaks.append(_own_circular_buffer_peak(backend, lambda: backend.conv2d(x, weights, spec, cfg, "c")))
        estimates.append(estimate_conv_l1(spec, 1, 28, 28, cfg, has_bias=True)[0])
    assert peaks[1] - peaks[0] == extra
    assert estimates[1] - estimates[0] == extra
