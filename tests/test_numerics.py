"""TT-NN numerics models: bfloat16 rounding (host and packer), bfloat8_b quantization (pinned by hand
and, with ttnn, bit for bit), SFPU stores and TF32 reads, math fidelity phases and the bfloat16 Dst
accumulation model. References are hand-derived from the ISA pages or written with integer or
float64 arithmetic, never with the helpers under test."""

from __future__ import annotations

import math
import os

import pytest
import torch

from ttswap.backends.numerics import (
    accumulate_in_bf16_dest,
    dest_rounding_steps,
    fidelity_matmul,
    pack,
    quantize_bfp8_b,
    round_bf16,
    round_bf16_packer,
    sfpu_store,
    srca_operand,
    srcb_operand,
    truncate_bf16,
    truncate_tf32,
)
from ttswap.config import DType
from ttswap.config import Fidelity


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# -- bfloat16 ------------------------------------------------------------------------------------


def test_round_bf16_is_round_to_nearest_even():
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 3.0, 0.0])
    expected = torch.tensor([1.0, 1 + 2**-6, 1 + 2**-7, -1.0, 3.0, 0.0])
    assert torch.equal(round_bf16(x), expected)


def test_round_bf16_matches_bit_level_reference():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e3
    b = bits(x).long()
    lsb = (b >> 16) & 1
    reference = (((b + 0x7FFF + lsb) >> 16) << 16).to(torch.int32)  # classic RNE on the bit pattern
    assert torch.equal(bits(round_bf16(x)), reference)


def _truncate_to_bits(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float64 reference: |x| cut down to ``mantissa_bits`` bits after the leading one, toward zero."""
    x = x.double()
    step = torch.exp2(torch.floor(torch.log2(x.abs())) - mantissa_bits)
    return torch.where(x == 0, x, torch.sign(x) * torch.floor(x.abs() / step) * step)


def test_packer_rounds_ties_away_from_zero():
    # ISA Packers/FormatConversion.md: round to nearest, ties away from zero
    x = torch.tensor([1 + 2**-8, -(1 + 2**-8), 1 + 3 * 2**-8, 1 + 2**-8 - 2**-20, 1 + 2**-8 + 2**-20, 2.0**127 * 1.999])
    expected = [1 + 2**-7, -(1 + 2**-7), 1 + 2**-6, 1.0, 1 + 2**-7, float("inf")]
    assert round_bf16_packer(x).tolist() == expected
    assert pack(x[:2], DType.BF16).tolist() == expected[:2]
    assert pack(x[:2], DType.FLOAT32).tolist() == x[:2].tolist()


def test_packer_bfp8_rounds_to_bf16_first():
    # Early conversion to bfloat16, then the block rounding: 1 + 2^-7 + 2^-9 is first 1 + 2^-7 (step
    # 2^-7: 129.25 -> 129), a tie in the block's 7-bit mantissa next to 1.0 (step 2^-6: 64.5), which
    # goes to even: 1.0. The host conversion rounds once: 64.625 -> 65, i.e. 1 + 2^-6.
    block = torch.zeros(16)
    block[:2] = torch.tensor([1.0, 1 + 2**-7 + 2**-9])
    assert pack(block, DType.BFP8_B)[:2].tolist() == [1.0, 1.0]
    assert quantize_bfp8_b(block)[:2].tolist() == [1.0, 1 + 2**-6]


def test_sfpu_store_truncates_unless_the_kernel_rounds():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4096, generator=gen) * 3
    assert torch.equal(truncate_bf16(x).double(), _truncate_to_bits(x, 7))
    assert torch.equal(sfpu_store(x, "leaky_relu", fp32_dest=False).double(), _truncate_to_bits(x, 7))
    assert torch.equal(sfpu_store(x, "hardsigmoid", fp32_dest=False).double(), _truncate_to_bits(x, 7))
    assert torch.equal(sfpu_store(x, "silu", fp32_dest=False), x.bfloat16().float())  # RoundMode::Nearest
    assert torch.equal(sfpu_store(x, "leaky_relu", fp32_dest=True), x)  # a float32 Dst keeps it whole
    assert truncate_bf16(torch.tensor([1e-40, -1e-40])).tolist() == [0.0, -0.0]  # denormals flushed


def test_srca_reads_fp32_partials_as_tf32():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4096, generator=gen) * 100
    assert torch.equal(truncate_tf32(x).double(), _truncate_to_bits(x, 10))


# -- bfloat8_b: hand-computed blocks -------------------------------------------------------------


def test_bfp8_block_hand_computed():
    # Shared exponent from 64 (2^6): one mantissa step is 64 / 64 = 1.
    block = torch.zeros(32)
    block[:7] = torch.tensor([64.0, 2.5 + 2**-20, -(2.5 + 2**-20), 4.5 + 2**-19, 2.5, 3.5, 2.5 + 2**-16])
    out = quantize_bfp8_b(block)
    # 2.5 + 2^-20 -> 2: the 2^-20 is shifted out before rounding, leaving a tie that goes to even.
    # 2.5 + 2^-16 -> 3: that bit survives the shift, so it is above the tie.
    assert out[:7].tolist() == [64.0, 2.0, -2.0, 4.0, 2.0, 4.0, 3.0]


def test_bfp8_block_saturates_and_flushes():
    block = torch.zeros(16)
    block[:7] = torch.tensor([1.0, 0.9999, 1.99999, 1e-3, 2**-7, 0.75 * 2**-6, 0.75 * 2**-5])
    out = quantize_bfp8_b(block)
    # Exponent from 1.99999 (2^0): step 2^-6. 1.99999 would round to 2 but clamps to 127/64.
    assert out[:7].tolist() == [1.0, 1.0, 127 / 64, 0.0, 0.0, 2**-6, 2**-5]


def test_bfp8_blocks_are_16_wide_along_last_dim():
    x = torch.ones(2, 40)
    x[0, 20] = 1000.0  # only the block [16, 32) of row 0 sees the large exponent
    out = quantize_bfp8_b(x * 1.01)
    assert torch.equal(out[1], torch.full((40,), 1.015625))
    assert torch.equal(out[0, :16], torch.full((16,), 1.015625))
    assert torch.equal(out[0, 32:], torch.full((8,), 1.015625))
    # That block's step is 2^9 / 64 = 8: 1.01 rounds to 0 and 1010 to 1008.
    assert out[0, 16].item() == 0.0
    assert out[0, 20].item() == 1008.0


def test_bfp8_zero_sign_subnormals_and_specials():
    x = torch.zeros(16)
    x[:6] = torch.tensor([-0.0, -1e-30, 1.0, 1e-40, float("inf"), -3.0])
    out = quantize_bfp8_b(x)
    assert bits(out[:2]).tolist() == [0, 0]  # negative zero and flushed values come back as +0
    assert out[3].item() == 0.0 and out[4].item() == float("inf")
    y = torch.full((16,), 1e-40)  # a block of float32 subnormals reads as zero
    assert torch.equal(bits(quantize_bfp8_b(y)), torch.zeros(16, dtype=torch.int32))
    assert torch.isnan(quantize_bfp8_b(torch.tensor([float("nan"), 1.0]))[0])


def test_bfp8_depthwise_values_keep_7_bit_mantissa():
    # Alone in its block (as in a block-diagonal depthwise weight), a value keeps 1 + 6 mantissa bits.
    x = torch.tensor([1 + 2**-6 + 2**-8, 3.1415926, -0.0123])
    alone = torch.stack([quantize_bfp8_b(torch.nn.functional.pad(v.view(1), (0, 15)))[0] for v in x])
    # 1 + 2^-6 + 2^-8: the 2^-8 is below the last kept bit (2^-6) and below half of it: dropped.
    # pi: step 2^-5, pi / 2^-5 = 100.53 -> 101. -0.0123: step 2^-13, 100.76 -> 101.
    assert alone.tolist() == [1 + 2**-6, 101 * 2**-5, -101 * 2**-13]


# -- bfloat8_b: bit-exact against ttnn ----------------------------------------------------------


@pytest.fixture(scope="module")
def ttnn_module():
    # Host-side conversion to bfloat8_b needs only ttnn's mock cluster descriptor, not a device.
    from ttswap.backends import tenstorrent_device_present
    from ttswap.mock import CLUSTER_DESCRIPTOR

    if not tenstorrent_device_present():
        os.environ.setdefault("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(CLUSTER_DESCRIPTOR))
    return pytest.importorskip("ttnn")


def _wide_range_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    decade = torch.randint(-30, 30, (1,), generator=gen).item()
    scale = torch.exp(torch.randn(shape, generator=gen) * 6) * 10.0**decade
    x = torch.randn(shape, generator=gen) * scale
    x[torch.rand(shape, generator=gen) < 0.1] = 0.0
    x[torch.rand(shape, generator=gen) < 0.05] *= -0.0
    ties = torch.rand(shape, generator=gen) < 0.05  # exact ties on a power-of-two grid
    x[ties] = (torch.randint(-64, 64, shape, generator=gen).float() + 0.5)[ties] * 2.0 ** -3
    return x


@pytest.mark.ttnn_mock
def test_bfp8_bit_exact_against_ttnn(ttnn_module):
    ttnn = ttnn_module
    gen = torch.Generator().manual_seed(1234)
    shapes = [(32, 32), (64, 96), (7, 33), (3, 5, 40, 70), (1, 1, 100, 48), (2, 17), (1, 1, 31, 257), (1, 300)]
    for trial in range(48):
        x = _wide_range_tensor(shapes[trial % len(shapes)], gen)
        theirs = ttnn.to_torch(ttnn.from_torch(x, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
        mismatched = (bits(theirs) != bits(quantize_bfp8_b(x))).sum().item()
        assert mismatched == 0, f"trial {trial} shape {tuple(x.shape)}: {mismatched} values differ from ttnn"


@pytest.mark.ttnn_mock
def test_bfp8_bit_exact_extremes_against_ttnn(ttnn_module):
    ttnn = ttnn_module
    x = torch.zeros(4, 64)
    x[0, :6] = torch.tensor([3e38, 1.0, -1e-38, 1e-40, 2.5 + 2**-20, 1.99999])
    x[1] = torch.full((64,), 1e-39)  # subnormals only
    x[2, :3] = torch.tensor([1.2e-38, 3e-39, -1.5e-38])  # block maximum near the smallest normal
    x[3] = torch.arange(64).float() - 31.5  # ties and a sign change inside blocks
    theirs = ttnn.to_torch(ttnn.from_torch(x, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
    assert torch.equal(bits(theirs), bits(quantize_bfp8_b(x)))


@pytest.mark.ttnn_mock
def test_bfp8_inf_and_nan_inside_blocks_against_ttnn(ttnn_module):
    ttnn = ttnn_module
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(4, 64, generator=gen) * 10
    x[0, 3], x[0, 20], x[0, 21] = float("inf"), float("-inf"), 1e30  # an infinity in two blocks
    x[1, 5], x[1, 40] = float("nan"), float("-inf")  # NaN with finite neighbours; -inf alone
    x[2, 16:32] = float("inf")  # a whole block of infinities
    x[3, 0], x[3, 1], x[3, 2] = float("nan"), float("inf"), 2.5  # NaN and inf sharing a block
    theirs = ttnn.to_torch(ttnn.from_torch(x, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
    ours = quantize_bfp8_b(x)
    assert torch.equal(torch.isnan(theirs), torch.isnan(ours))
    finite_or_inf = ~torch.isnan(theirs)
    assert torch.equal(bits(theirs)[finite_or_inf], bits(ours)[finite_or_inf])


# -- math fidelity -------------------------------------------------------------------------------


def test_operand_bits_per_fidelity_phase():
    w = torch.tensor([1 + 2**-1 + 2**-5 + 2**-7, -(1 + 2**-4)])
    assert srca_operand(w, "high").tolist() == [1.5, -(1 + 2**-4)]  # implicit 1 + 4 mantissa bits
    assert srca_operand(w, "low").tolist() == [2**-5 + 2**-7, 0.0]
    x = torch.tensor([1 + 2**-6 + 2**-7, 2.0 + 2**-9 + 2**-20])
    assert srcb_operand(x, "high").tolist() == [1 + 2**-6, 2.0]  # implicit 1 + 6 mantissa bits
    assert srcb_operand(x, "low").tolist() == [2**-7, 2**-9]  # up to TF32's 10th mantissa bit


def _phase_bits(t: torch.Tensor, keep_mask: int, isolate_mask: int, low: bool) -> torch.Tensor:
    """The ISA documentation's SrcA/SrcBFidelityBits, written out literally."""
    b = t.contiguous().view(torch.int32)
    if not low:
        return (b & keep_mask).view(torch.float32)
    return t - (b & isolate_mask).view(torch.float32)


@pytest.mark.parametrize("fidelity", list(Fidelity))
def test_fidelity_matmul_equals_sum_of_phase_products(fidelity):
    gen = torch.Generator().manual_seed(3)
    a = round_bf16(torch.randn(8, 64, generator=gen))  # SrcB: activations
    b = round_bf16(torch.randn(64, 16, generator=gen))  # SrcA: weights
    phases = {Fidelity.LOFI: 1, Fidelity.HIFI2: 2, Fidelity.HIFI3: 3, Fidelity.HIFI4: 4}[fidelity]
    expected = torch.zeros(8, 16, dtype=torch.float64)
    for p in range(phases):
        src_b = _phase_bits(a, -(1 << 17), 0xFFFE1FFF - (1 << 32), low=bool(p & 2))
        src_a = _phase_bits(b, -(1 << 19), 0xFFF83FFF - (1 << 32), low=bool(p & 1))
        expected += src_b.double() @ src_a.double()
    assert torch.allclose(fidelity_matmul(a, b, fidelity).double(), expected, rtol=0, atol=1e-5)


def test_fidelity_error_decreases_with_phases():
    gen = torch.Generator().manual_seed(4)
    a = round_bf16(torch.rand(64, 576, generator=gen))
    b = round_bf16(torch.randn(576, 64, generator=gen) * 0.05)
    exact = a.double() @ b.double()
    errors = [(fidelity_matmul(a, b, f).double() - exact).norm().item() for f in Fidelity]
    assert errors[0] > 3 * errors[1] > 0  # LoFi drops 3 weight bits, HiFi2 one activation bit
    assert errors[1] > 3 * errors[2]
    assert errors[3] < 1e-3 * errors[0]  # HiFi4 reads bfloat16 operands whole


# -- accumulation --------------------------------------------------------------------------------


def _significand_part(t: torch.Tensor, high_bits: int, low_bits: int, low: bool) -> torch.Tensor:
    """What a fidelity phase feeds the multiplier, from the ISA's SrcA/SrcBFidelityBits, in integer
    arithmetic on the bit fields: the 24-bit significand (hidden one included) is split into its top
    ``high_bits`` (phase bit 0) and the next ``low_bits`` (phase bit 1); the value is sign * part *
    2^(exponent - 150), exact in float64."""
    b = t.contiguous().view(torch.int32).long()
    exponent = (b >> 23) & 0xFF
    significand = torch.where(exponent > 0, (b & 0x7FFFFF) | (1 << 23), torch.zeros_like(b))
    high_shift = 24 - high_bits
    if low:
        low_shift = high_shift - low_bits
        part = ((significand >> low_shift) & ((1 << low_bits) - 1)) << low_shift
    else:
        part = (significand >> high_shift) << high_shift
    sign = torch.where(b < 0, -1.0, 1.0).double()
    return sign * part.double() * torch.exp2(exponent.double() - 150)


def _srca_part(t: torch.Tensor, low: bool) -> torch.Tensor:
    return _significand_part(t, 5, 5, low)  # SrcA: hidden one + 4 bits, then 5 more (TF32's 10th unread)


def _srcb_part(t: torch.Tensor, low: bool) -> torch.Tensor:
    return _significand_part(t, 7, 4, low)  # SrcB: hidden one + 6 bits, then TF32's last 4


def test_integer_reference_agrees_with_hand_values():
    w = torch.tensor([1 + 2**-1 + 2**-5 + 2**-7, -(1 + 2**-4)])
    assert _srca_part(w, False).tolist() == [1.5, -(1 + 2**-4)]
    assert _srca_part(w, True).tolist() == [2**-5 + 2**-7, -0.0]
    x = torch.tensor([1 + 2**-6 + 2**-7, 2.0 + 2**-9 + 2**-20])
    assert _srcb_part(x, False).tolist() == [1 + 2**-6, 2.0] and _srcb_part(x, True).tolist() == [2**-7, 2**-9]


@pytest.mark.parametrize("fidelity", list(Fidelity))
def test_fidelity_matmul_equals_integer_phase_products(fidelity):
    gen = torch.Generator().manual_seed(13)
    a = round_bf16(torch.randn(8, 64, generator=gen))  # SrcB: activations
    b = round_bf16(torch.randn(64, 16, generator=gen))  # SrcA: weights
    expected = sum(_srcb_part(a, bool(p & 2)) @ _srca_part(b, bool(p & 1)) for p in range(_PHASES[fidelity]))
    assert torch.allclose(fidelity_matmul(a, b, fidelity).double(), expected, rtol=0, atol=1e-5)


_PHASES = {Fidelity.LOFI: 1, Fidelity.HIFI2: 2, Fidelity.HIFI3: 3, Fidelity.HIFI4: 4}


def _stepwise_bf16_dest(a: torch.Tensor, b: torch.Tensor, fidelity: Fidelity) -> torch.Tensor:
    """Dst += one MVMUL (16 products) per fidelity phase, rounded to bfloat16 every time, in the
    order the matmul kernel issues them: per 32-wide K tile, phase-major, then the two faces. The
    operands come from the integer reference above, not from the code under test."""
    acc = torch.zeros(a.shape[0], b.shape[1])
    for tile in range(0, a.shape[1], 32):
        for p in range(_PHASES[fidelity]):
            for face in (tile, tile + 16):
                src_b = _srcb_part(a[:, face : face + 16], bool(p & 2))
                src_a = _srca_part(b[face : face + 16], bool(p & 1))
                acc = (acc.double() + src_b @ src_a).bfloat16().float()
    return acc


@pytest.mark.parametrize("fidelity", [Fidelity.HIFI2, Fidelity.HIFI4])
def test_bf16_dest_model_matches_stepwise_error_size(fidelity):
    gen = torch.Generator().manual_seed(5)
    a = round_bf16(torch.relu(torch.randn(256, 576, generator=gen)))
    b = round_bf16(torch.randn(576, 32, generator=gen) * math.sqrt(2 / 576))
    exact = a.double() @ b.double()

    def rel_err(y: torch.Tensor) -> float:
        return ((y.double() - exact).norm() / exact.norm()).item()

    stepwise = rel_err(_stepwise_bf16_dest(a, b, fidelity))
    steps = dest_rounding_steps(576 // 16, fidelity)
    modelled = rel_err(round_bf16(accumulate_in_bf16_dest(fidelity_matmul(a, b, fidelity), steps)))
    fp32_dest = rel_err(round_bf16(fidelity_matmul(a, b, fidelity)))
    assert fp32_dest < 0.5 * stepwise
    assert 0.75 < modelled / stepwise < 1.33


def test_dest_rounding_steps():
    assert dest_rounding_steps(36, Fidelity.LOFI) == 36
    assert dest_rounding_steps(36, Fidelity.HIFI2) == 72
    assert dest_rounding_steps(36, Fidelity.HIFI4) == 72  # phases 2, 3 add terms below half an ulp
    y = torch.tensor([1 + 2**-9])
    assert torch.equal(accumulate_in_bf16_dest(y, 1), y)
