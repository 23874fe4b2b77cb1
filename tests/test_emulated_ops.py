"""EmulatedBackend ops against torch float32 (and float64) references, its placement metadata against
what ttnn 0.81.1 chose in mock mode, and its L1 budget checks. Expected values come from torch at
float64, ttnn's own host conversion (``ttnn_mock`` tier) or hand-written float64 rules from the ISA
pages and kernel sources (docs/numerics.md), never from ``ttswap.backends.numerics`` itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ttswap.backends.base import L1BudgetError
from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.l1 import L1_ALLOCATABLE_BYTES, estimate_conv_l1
from ttswap.backends.numerics import round_bf16
from ttswap.config import Activation, Conv2dSpec, DType, Fidelity, Layout, OpConfig, Pool2dSpec, ShardLayout

BACKEND = EmulatedBackend()
EXACT = OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True)


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def conv_case(spec: Conv2dSpec, hw: int, seed: int = 0, relu_input: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, spec.in_channels, hw, hw, generator=gen)
    x = torch.relu(x) if relu_input else x
    fan_in = spec.in_channels // spec.groups * spec.kernel[0] * spec.kernel[1]
    w = torch.randn(spec.out_channels, spec.in_channels // spec.groups, *spec.kernel, generator=gen)
    w *= math.sqrt(2 / fan_in)  # kaiming
    b = torch.randn(spec.out_channels, generator=gen) * 0.1
    return x, w, b


def run_conv(x, w, b, spec, cfg, act=None):
    t = BACKEND.upload(x, cfg)
    y = BACKEND.conv2d(t, BACKEND.prepare_conv(w, b, spec, cfg, "conv"), spec, cfg, "conv", act)
    return BACKEND.download(y), y


def torch_conv(x, w, b, spec):
    return F.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)


# -- conv2d --------------------------------------------------------------------------------------

CONV_SPECS = [
    Conv2dSpec(32, 48, (3, 3), padding=(1, 1)),
    Conv2dSpec(32, 64, (3, 3), stride=(2, 2), padding=(1, 1)),
    Conv2dSpec(64, 32, (1, 1)),
    Conv2dSpec(32, 32, (3, 3), padding=(2, 2), dilation=(2, 2)),
    Conv2dSpec(64, 64, (3, 3), padding=(1, 1), groups=64),
    Conv2dSpec(64, 64, (3, 3), stride=(2, 2), padding=(1, 1), groups=64),
    Conv2dSpec(48, 96, (3, 3), padding=(1, 1), groups=4),
    Conv2dSpec(3, 32, (3, 3), stride=(2, 2), padding=(1, 1)),
]


def conv_id(s: Conv2dSpec) -> str:
    return f"{s.in_channels}-{s.out_channels}k{s.kernel[0]}s{s.stride[0]}d{s.dilation[0]}g{s.groups}"


@pytest.mark.parametrize("spec", CONV_SPECS, ids=conv_id)
def test_conv_bf16_weights_hifi4_fp32_acc(spec):
    x, w, b = conv_case(spec, 20)
    out, y = run_conv(x, w, b, spec, EXACT, Activation("relu"))
    ref = torch.relu(torch_conv(x, w, b, spec))
    assert out.shape == ref.shape and (y.h, y.w, y.c) == ref.shape[2:] + (spec.out_channels,)
    assert pcc(out, ref) >= 0.9999
    assert torch.equal(out, round_bf16(out))  # stored as bfloat16


def test_conv_bfp8_weights_lofi_realistic():
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    x, w, b = conv_case(spec, 28)
    out, _ = run_conv(x, w, b, spec, OpConfig(weight_dtype=DType.BFP8_B, fidelity=Fidelity.LOFI))
    assert pcc(out, torch_conv(x, w, b, spec)) >= 0.999


def test_conv_error_falls_with_fidelity_and_fp32_acc():
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    x, w, b = conv_case(spec, 16)
    ref = torch_conv(x.double(), w.double(), b.double(), spec)
    err = {}
    for fidelity in Fidelity:
        for fp32_acc in (True, False):
            for l1_acc in (True, False):
                cfg = OpConfig(weight_dtype=DType.BF16, fidelity=fidelity, fp32_acc=fp32_acc, packer_l1_acc=l1_acc)
                err[fidelity, fp32_acc, l1_acc] = rel_err(run_conv(x, w, b, spec, cfg)[0], ref)
    fidelities = list(Fidelity)
    for lower, higher in zip(fidelities, fidelities[1:]):  # fp32 partials in L1: only fidelity is left
        assert err[lower, True, True] >= err[higher, True, True]
    assert err[Fidelity.LOFI, True, True] > 3 * err[Fidelity.HIFI4, True, True]
    # 72 bfloat16 roundings of the running sum (HiFi2 leaves a fidelity error that they add to)
    assert err[Fidelity.HIFI4, False, True] > 2 * err[Fidelity.HIFI4, True, True]
    assert err[Fidelity.HIFI2, False, True] > 1.25 * err[Fidelity.HIFI2, True, True]
    # Without L1 accumulation the partials take the output dtype: the sum is rounded to bfloat16
    # after each of the 3 kernel rows, then again after the bias: fp32_acc loses much of its worth.
    assert err[Fidelity.HIFI4, True, False] > 1.35 * err[Fidelity.HIFI4, True, True]


def test_conv_bias_and_activation_fused():
    spec = Conv2dSpec(16, 16, (1, 1))
    x, w, b = conv_case(spec, 8, relu_input=False)
    out, _ = run_conv(x, w, b + 1.0, spec, EXACT, Activation("leaky_relu", 0.1))
    ref = F.leaky_relu(torch_conv(x, w, b + 1.0, spec), 0.1)
    assert pcc(out, ref) >= 0.9999


@pytest.fixture(scope="module")
def ttnn_host():
    """ttnn for its host-side conversions (from_torch / to_torch need no device, only mock mode)."""
    from ttswap.mock import ensure_mock_mode

    ensure_mock_mode()
    return pytest.importorskip("ttnn")


def ttnn_bfp8(ttnn, t: torch.Tensor) -> torch.Tensor:
    """ttnn's own bfloat8_b round trip: tiles, blocks of 16 along the last dim."""
    return ttnn.to_torch(ttnn.from_torch(t, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()


@pytest.mark.ttnn_mock
def test_conv_weights_quantized_like_ttnn_layout(ttnn_host):
    spec = Conv2dSpec(8, 32, (3, 3), padding=(1, 1))
    _, w, b = conv_case(spec, 4)
    prepared = BACKEND.prepare_conv(w, b, spec, OpConfig(weight_dtype=DType.BFP8_B), "conv")
    matrix = w.permute(2, 3, 1, 0).reshape(9 * 8, 32)  # ttnn's [kh*kw*C_in, C_out]
    expected = ttnn_bfp8(ttnn_host, matrix).reshape(3, 3, 8, 32).permute(3, 2, 0, 1)
    assert torch.equal(prepared.operands["full"], expected)
    assert torch.equal(prepared.bias, ttnn_bfp8(ttnn_host, b.reshape(1, -1))[0])


def _alone_in_block(v: torch.Tensor) -> torch.Tensor:
    """float64 bfloat8_b rule for a value alone in its block (the rest zeros): the block exponent is
    its own, so it keeps a 7-bit magnitude: round(|v| / 2^(e - 6)) half to even, at most 127."""
    v = v.double()
    step = torch.exp2(torch.floor(torch.log2(v.abs())) - 6)
    return torch.sign(v) * torch.round(v.abs() / step).clamp(max=127) * step


def test_depthwise_weights_get_one_exponent_each():
    spec = Conv2dSpec(32, 32, (3, 3), padding=(1, 1), groups=32)
    _, w, _ = conv_case(spec, 4)
    prepared = BACKEND.prepare_conv(w, None, spec, OpConfig(weight_dtype=DType.BFP8_B), "dw")
    assert torch.equal(prepared.operands["full"].double(), _alone_in_block(w))


def test_conv_rejects_wrong_channels():
    spec = Conv2dSpec(8, 8, (1, 1))
    t = BACKEND.upload(torch.randn(1, 4, 4, 4), EXACT)
    weights = BACKEND.prepare_conv(torch.randn(8, 8, 1, 1), None, spec, EXACT, "stage.conv")
    with pytest.raises(ValueError, match="stage.conv"):
        BACKEND.conv2d(t, weights, spec, EXACT, "stage.conv")


# -- other ops -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, hw",
    [
        (Pool2dSpec((3, 3), (2, 2), ceil_mode=True), 56),
        (Pool2dSpec((3, 3), (2, 2), ceil_mode=True), 7),
        (Pool2dSpec((3, 3), (2, 2), ceil_mode=True), 14),
        (Pool2dSpec((3, 3), (2, 2), padding=(1, 1), ceil_mode=True), 10),
        (Pool2dSpec((5, 5), (1, 1), padding=(2, 2)), 10),
        (Pool2dSpec((13, 13), (1, 1), padding=(6, 6)), 10),
        (Pool2dSpec((2, 2), (2, 2)), 9),
    ],
)
def test_max_pool_matches_torch_exactly(spec, hw):
    x = round_bf16(torch.randn(1, 24, hw, hw))
    t = BACKEND.to_memory(BACKEND.upload(x, EXACT), ShardLayout.HEIGHT, "pool_in")
    y = BACKEND.max_pool2d(t, spec, EXACT, "pool")
    ref = F.max_pool2d(x, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.ceil_mode)
    assert (y.h, y.w) == spec.output_hw(hw, hw) == tuple(ref.shape[2:])
    assert torch.equal(BACKEND.download(y), ref)


def test_upsample_concat_add_multiply():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(2, 8, 5, 6, generator=gen)
    b = torch.randn(2, 8, 5, 6, generator=gen)
    ta, tb = BACKEND.upload(a, EXACT), BACKEND.upload(b, EXACT)
    ra, rb = round_bf16(a), round_bf16(b)

    up = BACKEND.download(BACKEND.upsample_nearest(ta, 2, EXACT, "up"))
    assert torch.equal(up, F.interpolate(ra, scale_factor=2, mode="nearest"))

    cat = BACKEND.concat([ta, tb, ta], EXACT, "cat")
    assert cat.c == 24 and torch.equal(BACKEND.download(cat), torch.cat([ra, rb, ra], 1))

    added = BACKEND.download(BACKEND.add(ta, tb, EXACT, "add", Activation("relu")))
    assert torch.equal(added, round_bf16(torch.relu(ra.double() + rb.double()).float()))

    scale = BACKEND.upload(torch.rand(2, 8, 1, 1, generator=gen), EXACT)
    prod = BACKEND.download(BACKEND.multiply(ta, scale, EXACT, "mul"))
    assert torch.equal(prod, round_bf16((ra.double() * BACKEND.download(scale).double()).float()))


def test_concat_rejects_mismatched_spatial_size():
    t1 = BACKEND.upload(torch.randn(1, 4, 4, 4), EXACT)
    t2 = BACKEND.upload(torch.randn(1, 4, 5, 4), EXACT)
    with pytest.raises(ValueError, match="neck.cat"):
        BACKEND.concat([t1, t2], EXACT, "neck.cat")


ACTIVATIONS = {
    "relu": lambda x: x.clamp(min=0),
    "relu6": lambda x: x.clamp(0, 6),
    "leaky_relu": lambda x: torch.where(x > 0, x, 0.1 * x),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "hardsigmoid": lambda x: (x + 3).clamp(0, 6) / 6,
    "hardswish": lambda x: x * (x + 3).clamp(0, 6) / 6,
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
}


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 reference of SFPSTORE into a bfloat16 Dst: 7 mantissa bits kept, toward zero."""
    step = torch.exp2(torch.floor(torch.log2(x.abs())) - 7)
    return torch.where(x == 0, x, torch.sign(x) * torch.floor(x.abs() / step) * step)


# Kernels that store through SFPSTORE's truncation (ckernel_sfpu_relu.h's lrelu, the hardsigmoid in
# ckernel_sfpu_activations.h); mish, silu, sigmoid and gelu round to nearest before storing.
TRUNCATING = {"leaky_relu", "hardsigmoid", "hardswish"}


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activation_rounding_into_16_bit_dst(kind):
    x = torch.linspace(-8, 8, 2 * 3 * 4 * 50).reshape(2, 3, 4, 50)
    act = Activation(kind, 0.1 if kind == "leaky_relu" else None)
    out = BACKEND.download(BACKEND.activation(BACKEND.upload(x, EXACT), act, EXACT, kind)).double()
    ref = ACTIVATIONS[kind](round_bf16(x).double())
    if kind in TRUNCATING:
        # toward zero: never larger in magnitude, less than one bfloat16 ulp below
        assert torch.all(out.abs() <= ref.abs() + 1e-12)
        assert torch.all(ref.abs() - out.abs() < ref.abs() * 2.0**-7 + 1e-6)
        if kind == "leaky_relu":  # the product alone is computed in float32 and truncated
            assert torch.equal(out, truncate_to_bf16((round_bf16(x) * torch.tensor(0.1)).double()).where(x < 0, out))
    else:
        assert torch.all((out - ref).abs() <= ref.abs() * 2.0**-8 + 1e-6)


def test_mean_hw_uses_bf16_scaler():
    x = torch.ones(1, 4, 7, 7)
    x[0, 1] = 2.0
    out = BACKEND.download(BACKEND.mean_hw(BACKEND.upload(x, EXACT), EXACT, "gap"))
    scaler = round_bf16(torch.tensor(1 / 49))  # 0.0203857..., not 1/49
    assert out.shape == (1, 4, 1, 1)
    assert out[0, 1, 0, 0] == round_bf16(98 * scaler)
    y = torch.randn(2, 16, 5, 5)
    got = BACKEND.download(BACKEND.mean_hw(BACKEND.upload(y, EXACT), EXACT, "gap"))
    assert pcc(got, round_bf16(y).mean((2, 3), keepdim=True)) >= 0.9999


def truncate_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    step = torch.exp2(torch.floor(torch.log2(x.abs())) - bits)
    return torch.where(x == 0, x, torch.sign(x) * torch.floor(x.abs() / step) * step)


@pytest.mark.parametrize("fidelity, data_bits, scaler_bits", [(Fidelity.LOFI, 4, 6), (Fidelity.HIFI2, 7, 6)])
def test_mean_hw_reads_data_through_srca_fidelity(fidelity, data_bits, scaler_bits):
    # llk_unpack_reduce.h: data in SrcA (LoFi: 1 + 4 bits), the 1/(H*W) scaler in SrcB (1 + 6 bits)
    cfg = OpConfig(weight_dtype=DType.BF16, fidelity=fidelity, fp32_acc=True)
    gen = torch.Generator().manual_seed(21)
    x = round_bf16(torch.rand(1, 32, 7, 7, generator=gen) + 0.5)
    out = BACKEND.download(BACKEND.mean_hw(BACKEND.upload(x, cfg), cfg, "gap")).double()
    scaler = truncate_to_bits(torch.tensor(1 / 49).bfloat16().double(), scaler_bits)
    ref = truncate_to_bits(x.double(), data_bits).sum((2, 3), keepdim=True) * scaler
    assert torch.allclose(out, ref, rtol=2.0**-8, atol=0)  # one bfloat16 rounding apart
    if fidelity is Fidelity.LOFI:  # truncation biases the mean down, ~ -1.5% here
        assert (out / x.double().mean((2, 3), keepdim=True)).mean() < 0.99


def test_avg_pool_reads_windows_through_srca_fidelity():
    # compute_pool_2d.cpp: tilizeA_B_reduce_init(in_cb, in_scalar_cb): window in SrcA, 1/9 in SrcB
    cfg = OpConfig(shard=ShardLayout.HEIGHT, weight_dtype=DType.BF16, fidelity=Fidelity.LOFI, fp32_acc=True)
    gen = torch.Generator().manual_seed(22)
    x = round_bf16(torch.rand(1, 32, 9, 9, generator=gen) + 0.5)
    t = BACKEND.to_memory(BACKEND.upload(x, cfg), ShardLayout.HEIGHT, "pool_in")
    out = BACKEND.download(BACKEND.avg_pool2d(t, Pool2dSpec((3, 3), (3, 3)), cfg, "pool")).double()
    scaler = truncate_to_bits(torch.tensor(1 / 9).bfloat16().double(), 6)
    ref = F.avg_pool2d(truncate_to_bits(x.double(), 4), 3, divisor_override=1) * scaler
    assert torch.allclose(out, ref, rtol=2.0**-8, atol=0)


@pytest.mark.parametrize("cfg", [EXACT, OpConfig()], ids=["hifi4_bf16", "lofi_bfp8"])
def test_linear(cfg):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 256, 1, 1, generator=gen)
    w = torch.randn(100, 256, generator=gen) / 16
    b = torch.randn(100, generator=gen)
    y = BACKEND.linear(BACKEND.upload(x, cfg), BACKEND.prepare_linear(w, b, cfg, "fc"), cfg, "fc")
    ref = F.linear(x.flatten(1), w, b)
    assert (y.n, y.h, y.w, y.c) == (2, 1, 1, 100)
    assert pcc(BACKEND.download(y).flatten(1), ref) >= (0.9999 if cfg is EXACT else 0.999)


@pytest.mark.ttnn_mock
def test_bfp8_activations_are_quantized_along_channels(ttnn_host):
    cfg = OpConfig(act_dtype=DType.BFP8_B)
    x = torch.randn(1, 40, 3, 3)
    t = BACKEND.upload(x, cfg)
    theirs = ttnn_bfp8(ttnn_host, x.permute(0, 2, 3, 1).reshape(1, 1, 9, 40)).reshape(1, 3, 3, 40)
    assert t.dtype is DType.BFP8_B and t.layout is Layout.TILE
    assert torch.equal(t.payload, theirs)
    y = BACKEND.activation(t, Activation("relu"), cfg, "act")
    assert torch.equal(y.payload, torch.relu(theirs))  # relu of block values fits the blocks again


def test_upload_download_round_trip():
    x = torch.randn(2, 3, 4, 5)
    t = BACKEND.upload(x, EXACT)
    assert (t.n, t.h, t.w, t.c, t.dtype) == (2, 4, 5, 3, DType.BF16)
    assert t.padded_shape == (1, 1, 40, 3)  # row-major: no tile padding
    assert torch.equal(BACKEND.download(t), round_bf16(x))


# -- placement: what ttnn 0.81.1 chose in mock mode ------------------------------------------------


@pytest.mark.parametrize(
    "cin, cout, hw, k, s, layout, act_block_h, num_cores, grid, shard",
    [
        (64, 64, 28, 3, 1, ShardLayout.HEIGHT, None, 25, (8, 4), (32, 64)),
        (256, 256, 56, 3, 1, ShardLayout.HEIGHT, None, 49, (8, 7), (64, 256)),
        (256, 256, 56, 3, 1, ShardLayout.HEIGHT, 128, 25, (8, 4), (128, 256)),
        (64, 64, 160, 3, 1, ShardLayout.HEIGHT, 256, 50, (8, 7), (512, 64)),
        (3, 64, 224, 3, 2, ShardLayout.HEIGHT, None, 56, (8, 7), (224, 64)),
        (64, 64, 20, 3, 1, ShardLayout.HEIGHT, 256, 2, (2, 1), (224, 64)),
        (768, 256, 14, 1, 1, ShardLayout.BLOCK, None, 56, (8, 7), (32, 32)),
        (96, 160, 14, 1, 1, ShardLayout.BLOCK, None, 7, (1, 7), (32, 160)),
        (128, 128, 40, 1, 1, ShardLayout.BLOCK, None, 32, (4, 8), (224, 32)),
        (1024, 512, 7, 1, 1, ShardLayout.WIDTH, None, 16, (8, 2), (64, 32)),
        (512, 2144, 4, 1, 1, ShardLayout.WIDTH, None, 34, (8, 5), (32, 64)),
    ],
)
def test_conv_output_placement_matches_ttnn(cin, cout, hw, k, s, layout, act_block_h, num_cores, grid, shard):
    spec = Conv2dSpec(cin, cout, (k, k), (s, s), (k // 2, k // 2))
    cfg = OpConfig(shard=layout, act_block_h=act_block_h)
    t = BACKEND.upload(torch.zeros(1, cin, hw, hw), cfg)
    y = BACKEND.conv2d(t, BACKEND.prepare_conv(torch.zeros(cout, cin, k, k), None, spec, cfg, "c"), spec, cfg, "c")
    m = y.memory
    assert (m.layout, m.num_cores, m.grid, m.shard_shape) == (layout, num_cores, grid, shard)
    assert y.layout is Layout.TILE


def test_pool_keeps_input_cores():
    cfg = OpConfig(shard=ShardLayout.HEIGHT)
    spec = Conv2dSpec(64, 64, (1, 1))
    t = BACKEND.upload(torch.zeros(1, 64, 56, 56), cfg)
    conv = BACKEND.conv2d(t, BACKEND.prepare_conv(torch.zeros(64, 64, 1, 1), None, spec, cfg, "c"), spec, cfg, "c")
    pooled = BACKEND.max_pool2d(conv, Pool2dSpec((3, 3), (2, 2), ceil_mode=True), cfg, "pool")
    # ttnn: 784 output rows on the conv's 49 cores, 16 each, padded to a tile (output_layout=TILE)
    assert (pooled.memory.num_cores, pooled.memory.shard_shape, pooled.layout) == (49, (32, 64), Layout.TILE)


def test_to_memory_and_to_layout_change_only_metadata():
    t = BACKEND.upload(torch.randn(1, 64, 28, 28), EXACT)
    sharded = BACKEND.to_memory(t, ShardLayout.HEIGHT, "reshard")
    assert sharded.memory.layout is ShardLayout.HEIGHT and sharded.payload is t.payload
    auto = BACKEND.to_memory(t, ShardLayout.AUTO, "reshard")
    assert auto.memory.layout is ShardLayout.HEIGHT  # 784 rows >> 64 channels
    assert BACKEND.to_memory(sharded, ShardLayout.INTERLEAVED, "x").memory.layout is ShardLayout.INTERLEAVED
    tiled = BACKEND.to_layout(t, Layout.TILE, "tilize")
    assert tiled.layout is Layout.TILE and tiled.padded_shape == (1, 1, 800, 64) and tiled.payload is t.payload


# -- L1 budget -----------------------------------------------------------------------------------


def test_huge_act_block_is_rejected_naming_the_layer():
    spec = Conv2dSpec(256, 256, (3, 3), padding=(1, 1))
    cfg = OpConfig(shard=ShardLayout.HEIGHT, act_block_h=4096)
    t = BACKEND.upload(torch.zeros(1, 256, 56, 56), cfg)
    weights = BACKEND.prepare_conv(torch.zeros(256, 256, 3, 3), None, spec, cfg, "stages.2.conv")
    with pytest.raises(L1BudgetError, match="stages.2.conv") as info:
        BACKEND.conv2d(t, weights, spec, cfg, "stages.2.conv")
    assert info.value.layer == "stages.2.conv" and info.value.needed > L1_ALLOCATABLE_BYTES


@pytest.mark.parametrize("act_block_h, fits", [(64, True), (256, True), (512, False)])
def test_conv_l1_estimate_agrees_with_ttnn(act_block_h, fits):
    # ttnn 0.81.1 (mock) runs it with 256-row blocks (1.33 MB peak) and fails with 512 (2.12 MB).
    spec = Conv2dSpec(256, 256, (3, 3), padding=(1, 1))
    needed, parts = estimate_conv_l1(spec, 1, 56, 56, OpConfig(shard=ShardLayout.HEIGHT, act_block_h=act_block_h))
    assert (needed <= L1_ALLOCATABLE_BYTES) == fits
    assert {"weights", "act_row_major", "act_tilized", "halo", "output_shard"} <= parts.keys()


# (C_in, C_out, kernel, stride, input size) of YOLOv4's convs at 640x640 and of ese_vovnet19b_dw's at 224.
TYPICAL_CONVS = [
    (3, 32, 3, 1, 640), (32, 64, 3, 2, 640), (64, 64, 1, 1, 320), (32, 64, 3, 1, 320), (128, 64, 1, 1, 320),
    (64, 128, 3, 2, 320), (64, 64, 3, 1, 160), (128, 128, 1, 1, 160), (128, 256, 3, 2, 160), (128, 128, 3, 1, 80),
    (256, 512, 3, 2, 80), (256, 256, 3, 1, 40), (512, 512, 1, 1, 40), (512, 1024, 3, 2, 40), (512, 1024, 3, 1, 20),
    (1024, 1024, 1, 1, 20), (2048, 512, 1, 1, 20), (256, 255, 1, 1, 80), (128, 256, 3, 1, 80), (1024, 255, 1, 1, 20),
    (3, 64, 3, 2, 224), (64, 128, 1, 1, 56), (448, 256, 1, 1, 56), (256, 160, 1, 1, 28), (736, 512, 1, 1, 28),
    (1088, 768, 1, 1, 14), (768, 224, 1, 1, 7), (1440, 1024, 1, 1, 7),
]
TYPICAL_DEPTHWISE = [(64, 112, 1), (64, 112, 2), (128, 56, 1), (160, 28, 1), (192, 14, 1), (224, 7, 1)]


@pytest.mark.parametrize("act_block_h", [None, 32, 64, 128, 256])
def test_typical_layers_fit(act_block_h):
    cfg = OpConfig(act_block_h=act_block_h)
    specs = [(Conv2dSpec(ci, co, (k, k), (s, s), (k // 2, k // 2)), hw) for ci, co, k, s, hw in TYPICAL_CONVS]
    specs += [(Conv2dSpec(c, c, (3, 3), (s, s), (1, 1), groups=c), hw) for c, hw, s in TYPICAL_DEPTHWISE]
    for spec, hw in specs:
        needed, _ = estimate_conv_l1(spec, 1, hw, hw, cfg)
        # One exception, which ttnn 0.81.1 rejects too: 256-row blocks leave YOLOv4's 640x640 down4.conv1
        # (height-sharded, 1600 output rows) on 7 cores, whose shards and im2col block overflow L1.
        too_big = act_block_h == 256 and (spec.in_channels, spec.out_channels, spec.stride[0], hw) == (256, 512, 2, 80)
        assert (needed > L1_ALLOCATABLE_BYTES) == too_big, f"{spec} at {hw}x{hw}: {needed:,} B"


@pytest.mark.parametrize("channels,groups", [(128, 128), (192, 8)])
def test_grouped_matmul_conv_split_over_block_columns(channels, groups):
    """A 1x1 grouped conv (a standalone BatchNorm is a 1x1 depthwise conv) block-sharded over several
    columns sums its K-blocks one input-channel slice at a time; each slice holds its groups' products
    and zeros for every other output channel, as ttnn's block-diagonal weight matrix does."""
    spec = Conv2dSpec(channels, channels, (1, 1), groups=groups)
    cfg = OpConfig(shard=ShardLayout.BLOCK, act_dtype=DType.BFP8_B, weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4,
                   fp32_acc=False, packer_l1_acc=False)
    backend = EmulatedBackend(check_l1=False)
    x = torch.randn(1, channels, 28, 28)
    w, b = torch.randn(channels, channels // groups, 1, 1), torch.randn(channels)
    out = backend.conv2d(backend.upload(x, cfg), backend.prepare_conv(w, b, spec, cfg, "l"), spec, cfg, "l")
    assert pcc(backend.download(out), F.conv2d(x, w, b, groups=groups)) > 0.9998
