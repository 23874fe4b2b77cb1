"""TT-NN numerics in plain torch: the number formats and the rounding each unit of a Wormhole Tensix core
applies: bfloat16 and bfloat8_b (host conversion and packer), the matrix engine's math fidelity, the
SFPU's stores into a 16-bit Dst, the unpacker's TF32 reads, and the rounding of a 16-bit Dst.

Every tensor here is float32 holding values that are exactly representable in the modelled format: float32
arithmetic on CPU is much faster than bfloat16 tensors, and the values stay bit-identical. The facts behind
each model, with the kernel and ISA sources they follow, are in docs/numerics.md; how the ops chain these
steps (K-blocks, partials, bias after the pack) is in ``ttswap.backends.kernels``.
"""

from __future__ import annotations

import math

import torch

from ttswap.config import DType, Fidelity, OpConfig

BFP_BLOCK = 16  # values sharing one exponent: one row of a 16x16 tile face

# Fidelity phases used by each setting: phase p multiplies SrcB's (p & 2 ? low : high) bits by SrcA's
# (p & 1 ? low : high) bits; the phases' products are summed into Dst.
FIDELITY_PHASES = {Fidelity.LOFI: 1, Fidelity.HIFI2: 2, Fidelity.HIFI3: 3, Fidelity.HIFI4: 4}

# Masks on float32 bit patterns. SrcA (matmul in1: weights) feeds the multiplier 1 hidden + 4 mantissa
# bits per phase; SrcB (in0: activations) 1 hidden + 6. The "full" masks are all bits any phase reads:
# SrcA holds at most TF32 and ignores its last mantissa bit, SrcB holds TF32.
_SRCA_HIGH = -(1 << 19)  # 0xFFF80000: sign, exponent, 4 mantissa bits
_SRCA_FULL = -(1 << 14)  # 0xFFFFC000: sign, exponent, 9 mantissa bits
_SRCB_HIGH = -(1 << 17)  # 0xFFFE0000: sign, exponent, 6 mantissa bits
_SRCB_FULL = -(1 << 13)  # 0xFFFFE000: sign, exponent, 10 mantissa bits (TF32)


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bfloat16, ties to even (what ttnn's host conversion does), as float32."""
    return t.float().bfloat16().float()


def quantize_bfp8_b(t: torch.Tensor) -> torch.Tensor:
    """Bit-exact model of ttnn's host conversion to bfloat8_b and back (``ttnn.from_torch(t,
    dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)`` then ``ttnn.to_torch``), returned as float32.

    Blocks are 16 consecutive values along the last dim, starting at index 0 (tile padding is zeros and
    cannot change a block's exponent). Per block: the shared exponent is the largest biased exponent;
    each 24-bit significand is shifted right to it (the bits shifted out are lost, not used for
    rounding), then rounded to 7 bits half-to-even on the remaining bits and clamped to 127 (no carry
    into the exponent). float32 subnormals read as zero; zero results are +0.
    """
    t = t.float()
    width = t.shape[-1]
    pad = -width % BFP_BLOCK
    padded = torch.nn.functional.pad(t, (0, pad)) if pad else t
    blocks = padded.reshape(-1, BFP_BLOCK)

    # The block maximum's exponent field, read as a float, is 2^(e - 127) for the shared exponent e.
    exponent_bits = _block_max_abs(blocks).view(torch.int32) & 0x7F800000
    if bool((exponent_bits < 8 << 23).any()):
        # Subnormal inputs only matter next to a tiny block maximum; elsewhere they round to zero anyway.
        blocks = blocks.masked_fill(blocks.abs() < 2.0**-126, 0.0)
        exponent_bits = exponent_bits.clamp(min=1 << 23)  # an all-zero block: any exponent gives zeros
    special = exponent_bits == 0x7F800000
    non_finite = bool(special.any())
    if non_finite:  # an inf or NaN sets e = 255, whose power of two is no float: use 2^127, then halve
        exponent_bits = exponent_bits.clamp(max=254 << 23)
    scale = exponent_bits.view(torch.float32)
    to_unit = scale.reciprocal()  # 2^(127 - e), exact: 2^-127 is a subnormal
    from_unit = scale * 2.0**-6  # 2^(e - 133), one step of the 7-bit mantissa
    if non_finite:
        to_unit = torch.where(special, to_unit * 0.5, to_unit)
        from_unit = torch.where(special, from_unit * 2.0, from_unit)

    # |x| * 2^(150 - e) is the significand aligned to the shared exponent: truncate the bits shifted
    # out, then round the remaining 17 fraction bits half-to-even and saturate. 2^(150 - e) is a
    # float only for e >= 23 (blocks below 2^-104 take two exact steps).
    if bool((exponent_bits >= 23 << 23).all()):
        aligned = torch.mul(blocks, to_unit * 2.0**23)
    else:
        aligned = torch.mul(blocks, to_unit).mul_(2.0**23)
    # (|aligned| < 2^24: the int32 round trip truncates, several times faster than trunc)
    mantissa = aligned.to(torch.int32).to(torch.float32).mul_(2.0**-17).round_().clamp_(-127, 127)
    out = mantissa.mul_(from_unit).add_(0.0)  # adding +0 turns -0 into +0, as ttnn drops a zero's sign
    if non_finite:
        out = torch.where(torch.isfinite(blocks), out, blocks)  # inf and NaN survive, as in ttnn
    out = out.reshape(padded.shape)
    return out[..., :width].contiguous() if pad else out


def _block_max_abs(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| of each row of 16, by halving: faster than ``amax`` over such a short last dim."""
    m = blocks.abs()
    while m.shape[1] > 1:
        half = m.shape[1] // 2
        m = torch.maximum(m[:, :half], m[:, half:])
    return m


def quantize(t: torch.Tensor, dtype: DType) -> torch.Tensor:
    """Round to a storage dtype as ttnn's *host* conversion does (``ttnn.from_torch``: uploads, weights,
    biases); bfloat8_b blocks run along the last dim (channels for [N,H,W,C])."""
    if dtype is DType.BF16:
        return round_bf16(t)
    if dtype is DType.BFP8_B:
        return quantize_bfp8_b(t)
    return t.float()


# -- what the device's own units do to a value -----------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


def round_bf16_packer(t: torch.Tensor) -> torch.Tensor:
    """The packer's rounding of a float32 Dst value to bfloat16: to nearest, **ties away from zero**
    (ISA Packers/FormatConversion.md; ``llk_defs.h`` says ties to even, and the packer configuration
    code has no tie-mode bit to settle it, so the ISA page's, the more pessimistic reading, is used).
    Adding half an ulp to the magnitude bits and truncating is exactly that; it carries into the
    exponent, and past the largest bfloat16 into infinity, as rounding must."""
    return (_bits(t) + 0x8000).bitwise_and_(-(1 << 16)).view(torch.float32)


def truncate_bf16(t: torch.Tensor) -> torch.Tensor:
    """An SFPU store of a float32 lane into a 16-bit (bfloat16) Dst: mantissa truncated toward zero,
    denormals flushed (ISA SFPSTORE.md, ``ToBF16``)."""
    bits = _bits(t)
    flushed = torch.where((bits & 0x7F800000) == 0, bits & -(1 << 31), bits)
    return flushed.bitwise_and_(-(1 << 16)).view(torch.float32)


def truncate_tf32(t: torch.Tensor) -> torch.Tensor:
    """An unpack of float32 data into SrcA or SrcB, which hold at most TF32 (10 mantissa bits; ISA
    Unpackers/FormatConversion.md). Whether the unpacker rounds or truncates is not documented:
    truncation, the pessimistic reading."""
    return _bits(t).bitwise_and(-(1 << 13)).view(torch.float32)


def pack(t: torch.Tensor, dtype: DType) -> torch.Tensor:
    """What the packer writes to L1 from a float32 Dst: bfloat16 rounded to nearest, ties away; bfloat8_b
    first rounded to bfloat16 (the early conversion), then to blocks of 16 sharing an exponent (the late
    conversion, modelled by the host conversion's block rounding); float32 as is."""
    if dtype is DType.FLOAT32:
        return t.float()
    rounded = round_bf16_packer(t)
    return quantize_bfp8_b(rounded) if dtype is DType.BFP8_B else rounded


# Activations whose SFPU kernel rounds its float32 result to bfloat16 (``sfpi::convert<vFloat16b>(...,
# RoundMode::Nearest)``) before storing it into a 16-bit Dst: ckernel_sfpu_mish.h, _silu.h, _sigmoid.h,
# _gelu.h (bf16 accurate mode). The others store with SFPSTORE's truncation (relu and relu6 only ever
# store an input value or a constant, which truncation leaves alone).
SFPU_ROUNDING_ACTIVATIONS = frozenset({"mish", "silu", "sigmoid", "gelu"})


def sfpu_store(t: torch.Tensor, kind: str, fp32_dest: bool) -> torch.Tensor:
    """An activation's float32 result as the SFPU leaves it in Dst: unchanged in a float32 Dst; in a
    16-bit Dst rounded to nearest by the kernels that say so, truncated by the others."""
    if fp32_dest:
        return t
    return round_bf16(t) if kind in SFPU_ROUNDING_ACTIVATIONS else truncate_bf16(t)


# -- math fidelity -------------------------------------------------------------------------------


def _mask(t: torch.Tensor, mask: int) -> torch.Tensor:
    return (t.contiguous().view(torch.int32) & mask).view(torch.float32)


def srca_operand(w: torch.Tensor, bits: str) -> torch.Tensor:
    """What the multiplier reads of a weight (matmul in1, SrcA): ``high`` (phases 0, 2), ``low`` (1, 3)
    or ``full`` (their sum)."""
    if bits == "high":
        return _mask(w, _SRCA_HIGH)
    full = _mask(w, _SRCA_FULL)
    return full if bits == "full" else full - _mask(w, _SRCA_HIGH)


def srcb_operand(x: torch.Tensor, bits: str) -> torch.Tensor:
    """What the multiplier reads of an activation (matmul in0, SrcB): ``high`` (phases 0, 1), ``low``
    (2, 3) or ``full``."""
    if bits == "high":
        return _mask(x, _SRCB_HIGH)
    full = _mask(x, _SRCB_FULL)
    return full if bits == "full" else full - _mask(x, _SRCB_HIGH)


def fidelity_terms(fidelity: Fidelity) -> tuple[tuple[str, str], ...]:
    """(SrcB bits, SrcA bits) pairs whose products sum to the sum of the fidelity's phase products.

    Phases 0..n-1 are run; phases sharing an operand are merged (e.g. phases 0 and 1 are
    high(B)*high(A) + high(B)*low(A) = high(B)*full(A)), so a model needs at most two products.
    """
    return {
        Fidelity.LOFI: (("high", "high"),),
        Fidelity.HIFI2: (("high", "full"),),
        Fidelity.HIFI3: (("high", "full"), ("low", "high")),
        Fidelity.HIFI4: (("full", "full"),),
    }[fidelity]


def fidelity_matmul(a: torch.Tensor, b: torch.Tensor, fidelity: Fidelity) -> torch.Tensor:
    """``a @ b`` as the matrix engine computes it with ``a`` in SrcB and ``b`` in SrcA, fp32 accumulation."""
    out = None
    for bits_b, bits_a in fidelity_terms(fidelity):
        term = srcb_operand(a, bits_b) @ srca_operand(b, bits_a)
        out = term if out is None else out + term
    return out


# -- accumulation --------------------------------------------------------------------------------


def dest_rounding_steps(k_chunks: int, fidelity: Fidelity) -> int:
    """How often a 16-bit Dst rounds one output's running sum: once per MVMUL (a 16-wide chunk of K)
    per fidelity phase. Phases 2 and 3 only add SrcB's low bits (one bit of a bfloat16), terms far
    below half a bfloat16 ulp of the sum, whose rounding costs next to nothing: they are not counted."""
    return k_chunks * min(FIDELITY_PHASES[fidelity], 2)


def accumulate_in_bf16_dest(exact: torch.Tensor, steps: int) -> torch.Tensor:
    """Model of summing in a bfloat16 Dst that rounds after each of ``steps`` partial sums.

    Running the real recurrence needs one partial product per step, which costs several times a plain
    convolution. Instead, the rounding error of the finished fp32 sum is scaled to the size that
    ``steps`` roundings of a random-walk running sum have: sum over c of ulp(S_c)^2, with
    ulp(S_c)^2 ~ c/steps * ulp(S)^2, is (steps + 1)/2 times one rounding's. Deterministic, and within
    ~10% of the step-by-step emulation's error for K >= 500 (docs/numerics.md); the caller then rounds
    to the output dtype.
    """
    if steps <= 1:
        return exact
    return torch.lerp(exact, round_bf16(exact), math.sqrt((steps + 1) / 2))


# -- partial sums between K-blocks ----------------------------------------------------------------


def packer_l1_acc_active(requested: bool, has_bias: bool, k_blocks: int) -> bool:
    """``determine_packer_l1_acc`` (tt-metal conv2d_utils.cpp): ttnn only accumulates in L1 when that
    saves reloads, i.e. with a fused bias and more than one K-block, or more than two K-blocks."""
    return requested and ((has_bias and k_blocks > 1) or k_blocks > 2)


def partials_dtype(matmul: bool, cfg: OpConfig, l1_acc: bool) -> DType:
    """The format of the partials buffer between K-blocks. conv2d (``get_cb_info``): fp32 or bfloat16
    when L1 accumulation is in effect, otherwise the output dtype, even with fp32_acc. Matmul program
    factories (``interm0_data_format``): fp32 whenever fp32_acc, else bfloat16 with L1 accumulation,
    else the output dtype. A buffer of the output dtype shares the output's memory."""
    if matmul and cfg.fp32_acc:
        return DType.FLOAT32
    if l1_acc:
        return DType.FLOAT32 if cfg.fp32_acc else DType.BF16
    return cfg.act_dtype
