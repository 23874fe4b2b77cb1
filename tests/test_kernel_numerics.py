"""The emulated conv and matmul follow ttnn's K-block loop (conv_bmm_tilize.cpp and the matmul kernel):
partial sums rounded to the partials buffer's format between K-blocks, the bias added after the last
pack through SrcA, fp32 partials read as TF32, bfloat8_b im2col blocks that span two pixels.

Each reference is written here from the kernel sources' description (docs/numerics.md), in float64
with torch's own bfloat16 rounding and float64 truncation rules, not with ttswap's numerics helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ttswap.backends.emulated import EmulatedBackend, _im2col_rows
from ttswap.config import Conv2dSpec, DType, Fidelity, OpConfig, ShardLayout

HIFI4_FP32 = OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """torch's own round to nearest even, from float64 (the host conversion of inputs)."""
    return t.to(torch.bfloat16).double()


def packed(t: torch.Tensor) -> torch.Tensor:
    """float64 rule for the packer's bfloat16 (ISA Packers/FormatConversion.md): 8 significant bits,
    round to nearest, ties away from zero. (Sums of two bfloat16 values, as in the bias pass, are
    often exact ties, so the rule shows.)"""
    step = torch.exp2(torch.floor(torch.log2(t.abs())) - 7)
    return torch.where(t == 0, t, torch.sign(t) * torch.floor(t.abs() / step + 0.5) * step)


def tf32_truncated(t: torch.Tensor) -> torch.Tensor:
    """float64 rule for a float32 unpacked into SrcA: 10 mantissa bits kept, toward zero."""
    step = torch.exp2(torch.floor(torch.log2(t.abs())) - 10)
    return torch.where(t == 0, t, torch.sign(t) * torch.floor(t.abs() / step) * step)


def case(spec: Conv2dSpec, hw: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = bf16(torch.relu(torch.randn(1, spec.in_channels, hw, hw, generator=gen, dtype=torch.float64)))
    fan_in = spec.in_channels * spec.kernel[0] * spec.kernel[1]
    w = bf16(torch.randn(spec.out_channels, spec.in_channels, *spec.kernel, generator=gen, dtype=torch.float64)
             * math.sqrt(2 / fan_in))
    b = bf16(torch.randn(spec.out_channels, generator=gen, dtype=torch.float64) * 0.5)
    return x, w, b


def emulate(x, w, b, spec, cfg):
    backend = EmulatedBackend()
    t = backend.upload(x.float(), cfg)
    prepared = backend.prepare_conv(w.float(), None if b is None else b.float(), spec, cfg, "conv")
    return backend.download(backend.conv2d(t, prepared, spec, cfg, "conv")).double()


def row_partials(x, w, spec):
    """Each kernel row's contribution, float64: the K-blocks of a HEIGHT-sharded im2col conv."""
    ph, pw = spec.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    h_out = spec.output_hw(x.shape[2], x.shape[3])[0]
    rows = []
    for r in range(spec.kernel[0]):
        window = xp[:, :, r: r + (h_out - 1) * spec.stride[0] + 1, :]
        rows.append(F.conv2d(window, w[:, :, r: r + 1, :], stride=spec.stride))
    return rows


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).double().mean().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_3x3_conv_rounds_partials_per_kernel_row_and_adds_bias_after():
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    x, w, b = case(spec, 12)
    cfg = HIFI4_FP32.replace(shard=ShardLayout.HEIGHT)
    ours = emulate(x, w, b, spec, cfg)
    acc = None
    for partial in row_partials(x, w, spec):  # partials CB in the output dtype (no packer_l1_acc)
        acc = packed(partial if acc is None else acc + partial)
    expected = packed(acc + b[:, None, None])  # bias pass: partials (SrcA) + bias (SrcB), then packed
    # float32 vs float64 sums of 192 products cross a rounding boundary once in a few thousand values
    assert agreement(ours, expected) > 0.995
    exact = F.conv2d(x, w, b, padding=spec.padding)
    once = packed(exact)  # what a single rounding would give
    assert rel_err(ours, expected) < 0.05 * rel_err(ours, exact)
    assert rel_err(ours, exact) > 1.3 * rel_err(once, exact)


def test_packer_l1_acc_keeps_fp32_partials_read_as_tf32_for_the_bias():
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    x, w, b = case(spec, 12, seed=1)
    ours = emulate(x, w, b, spec, HIFI4_FP32.replace(shard=ShardLayout.HEIGHT, packer_l1_acc=True))
    total = F.conv2d(x, w, padding=spec.padding)
    expected = packed(tf32_truncated(total) + b[:, None, None])
    assert agreement(ours, expected) > 0.995


def test_block_sharded_conv_splits_each_kernel_row_over_the_grid_columns():
    # 64 output channels = 2 tiles: 2 grid columns of 32 input channels each, so 3 rows x 2 slices
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    x, w, b = case(spec, 12, seed=2)
    ours = emulate(x, w, b, spec, HIFI4_FP32.replace(shard=ShardLayout.BLOCK))
    acc = None
    for r in range(3):
        for c0 in (0, 32):
            xs, ws = x[:, c0:c0 + 32], w[:, c0:c0 + 32]
            partial = row_partials(xs, ws, spec)[r]
            acc = packed(partial if acc is None else acc + partial)
    expected = packed(acc + b[:, None, None])
    assert agreement(ours, expected) > 0.995


def test_1x1_conv_matmul_keeps_fp32_partials_and_adds_bias_through_srca():
    # the matmul kernel's partials are fp32 whenever fp32_acc; HEIGHT: one K-block
    spec = Conv2dSpec(96, 64, (1, 1))
    x, w, b = case(spec, 10, seed=3)
    ours = emulate(x, w, b, spec, HIFI4_FP32.replace(shard=ShardLayout.HEIGHT))
    expected = packed(tf32_truncated(F.conv2d(x, w)) + b[:, None, None])
    assert agreement(ours, expected) > 0.995


def test_conv_without_bias_packs_the_last_block_straight_to_the_output():
    spec = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
    x, w, _ = case(spec, 12, seed=4)
    ours = emulate(x, w, None, spec, HIFI4_FP32.replace(shard=ShardLayout.HEIGHT))
    p0, p1, p2 = row_partials(x, w, spec)
    expected = packed(packed(packed(p0) + p1) + p2)  # two partial packs, then the output pack
    assert agreement(ours, expected) > 0.995


@pytest.mark.ttnn_mock
def test_bfp8_im2col_blocks_span_pixels_when_channels_are_not_16_aligned():
    """The 3-channel stem: a kernel row of the im2col matrix is 3 pixels of 8 (padded) channels, padded
    to 32, and bfloat8_b blocks of 16 along it share one exponent between two pixels."""
    from ttswap.mock import ensure_mock_mode

    ensure_mock_mode()
    ttnn = pytest.importorskip("ttnn")
    spec = Conv2dSpec(3, 32, (3, 3), stride=(2, 2), padding=(1, 1))
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([1.0, 30.0, 0.01], dtype=torch.float64)[:, None, None]  # channels far apart
    x = bf16(torch.randn(1, 3, 10, 10, generator=gen, dtype=torch.float64) * scales)
    h_out, w_out = spec.output_hw(10, 10)
    ours = _im2col_rows(x.float().permute(0, 2, 3, 1).contiguous(), spec, h_out, w_out)

    cols = F.unfold(x, 3, padding=1, stride=2)  # [1, C * kh * kw, L], ordered (c, kh, kw)
    cols = cols.reshape(3, 3, 3, -1).permute(3, 1, 2, 0)  # [L, kh, kw, c]
    cols = F.pad(cols, (0, 5)).reshape(-1, 3, 24)  # channels padded to 8, one kernel row = 24 values
    cols = F.pad(cols, (0, 8)).reshape(-1, 32).float()  # rows padded to a tile
    theirs = ttnn.to_torch(ttnn.from_torch(cols, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
    assert torch.equal(ours.reshape(-1, 32), theirs)
    # the per-pixel alternative (blocks within one pixel's channels) gives other values
    per_pixel = ttnn.to_torch(ttnn.from_torch(F.pad(cols.reshape(-1, 4, 8), (0, 8)).reshape(-1, 16),
                                              dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
    assert not torch.equal(theirs, per_pixel.reshape(-1, 4, 16)[..., :8].reshape(-1, 32))
