"""How ttnn's compute kernels chain the roundings of ``numerics.py`` in the ops that accumulate.

A conv or matmul sums its inner dimension K in **K-blocks**. After each block the sums leave Dst: the
packer writes them to a partials buffer in L1 (rounded to that buffer's format) and the next block
reloads them, or, with ``packer_l1_acc``, the packer adds each block into L1 itself. A fused bias is
added only after the last block has been packed to the partials buffer, by an FPU add that reads the
partials through SrcA. Sources (paths inside the ttnn 0.81.1 wheel and tt-metal, lines in
docs/numerics.md): ``conv/conv2d/device/kernels/conv_bmm_tilize.cpp`` (im2col convs),
``matmul/device/kernels/compute/bmm_large_block_zm_fused_bias_activation.cpp`` (1x1 convs, linear),
tt-metal's ``conv2d_op_program_factory_common.cpp`` (partials format, ``determine_packer_l1_acc``),
``conv2d_utils.cpp`` (K-block sizes) and the matmul program factories (partials format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ttswap.backends.base import TILE, round_up
from ttswap.backends.l1 import STICK_ALIGN, ShardGrid, is_matmul_conv
from ttswap.backends.numerics import (
    accumulate_in_bf16_dest,
    pack,
    packer_l1_acc_active,
    partials_dtype,
    round_bf16,
    truncate_tf32,
)
from ttswap.config import Conv2dSpec, DType, OpConfig, ShardLayout


@dataclass(frozen=True)
class KSchedule:
    """How one output's K = kh*kw*C_in sum is split into K-blocks, in the order they are summed:
    for each kernel row (when ``kernel_rows``), each of ``channel_slices`` slices of the input channels."""

    kh: int
    kernel_rows: bool  # im2col convs on HEIGHT and BLOCK: one kernel row of the im2col matrix per block
    channel_slices: tuple[tuple[int, int], ...]  # [c0, c1) of the real input channels per slice
    matmul: bool  # the matmul kernel (1x1 stride-1 conv, linear), not conv_bmm_tilize

    @property
    def blocks(self) -> int:
        return (self.kh if self.kernel_rows else 1) * len(self.channel_slices)


def _channel_slices(channels: int, per_slice: int, count: int) -> tuple[tuple[int, int], ...]:
    """``count`` slices of ``per_slice`` (padded) channels; slices past the real channels hold only
    padding and add nothing, so they are dropped (re-rounding an unchanged partial is a no-op)."""
    bounds = [(i * per_slice, min((i + 1) * per_slice, channels)) for i in range(count)]
    return tuple((c0, c1) for c0, c1 in bounds if c0 < c1)


def conv_k_schedule(spec: Conv2dSpec, layout: ShardLayout, grid: ShardGrid) -> KSchedule:
    """The K-blocks ttnn 0.81.1 runs for a conv computed in ``layout`` on ``grid``.

    im2col (``determine_per_core_conv_block_config``): HEIGHT act_block_w = round_up(C_in * kw, 32), so
    K-blocks are the kh kernel rows; BLOCK splits each row over the grid columns (``in0_num_blocks_w =
    num_blocks_act_w * conv_act_c_blocks``); WIDTH act_block_w = C_in*kh*kw / cores, one block per core
    (modelled as that core's input channels over the whole window: the width-sharded weight order is
    not in the wheel). 1x1 convs run as a matmul with ``in0_block_w = act_block_w_ntiles``: the whole
    K on HEIGHT, K over the grid columns on BLOCK. A grouped conv is split by kernel rows only.
    """
    kh = spec.kernel[0]
    cin = spec.in_channels
    whole = ((0, cin),)
    if is_matmul_conv(spec) and layout is not ShardLayout.WIDTH:
        if layout is ShardLayout.BLOCK and grid.col_cores > 1:
            per = round_up(-(-round_up(cin, TILE) // grid.col_cores), TILE)
            return KSchedule(1, False, _channel_slices(cin, per, grid.col_cores), True)
        return KSchedule(1, False, whole, True)
    if spec.groups > 1:
        return KSchedule(kh, layout is not ShardLayout.WIDTH, whole, False)
    if layout is ShardLayout.HEIGHT:
        return KSchedule(kh, True, whole, False)
    if layout is ShardLayout.BLOCK:
        per = round_up(-(-round_up(cin, STICK_ALIGN) // grid.col_cores), TILE)
        return KSchedule(kh, True, _channel_slices(cin, per, grid.col_cores), False)
    cores = grid.num_cores  # WIDTH: padded_in_channels % (32 * cores) == 0
    per = round_up(cin, TILE * cores) // cores
    return KSchedule(kh, False, _channel_slices(cin, per, cores), False)


def blocks_mergeable(schedule: KSchedule, cfg: OpConfig, has_bias: bool) -> bool:
    """Whether the packs between K-blocks leave the running sum unchanged, so that the blocks'
    products can be computed as one (much faster on CPU): a single block; fp32 partials that are
    not cut to TF32 before the last block (matmul reloads are exact; a conv's fp32 partials in L1
    pass through SrcA only in the bias pass, when it has a bias); or, without fp32_acc, bfloat16
    partials, which hold a bfloat16 Dst's value exactly (the Dst's own roundings are modelled over
    the whole sum by ``accumulate_in_bf16_dest``)."""
    n = schedule.blocks
    if n == 1:
        return True
    l1_acc = packer_l1_acc_active(cfg.packer_l1_acc, has_bias, n)
    part_dtype = partials_dtype(schedule.matmul, cfg, l1_acc)
    if not cfg.fp32_acc:
        return part_dtype is DType.BF16
    return part_dtype is DType.FLOAT32 and (schedule.matmul or has_bias)


def _read_srca(partials: torch.Tensor, dtype: DType) -> torch.Tensor:
    """Partials unpacked into SrcA (the bias add, a conv's reload): fp32 is cut to TF32 on the way."""
    return truncate_tf32(partials) if dtype is DType.FLOAT32 else partials


def accumulate_k_blocks(
    blocks: Iterable[torch.Tensor],
    schedule: KSchedule,
    bias: torch.Tensor | None,
    cfg: OpConfig,
    steps_per_block: int,
    merged: bool = False,
) -> torch.Tensor:
    """Run the K-block loop of ``conv_bmm_tilize.cpp`` / ``bmm_large_block_zm_fused_bias_activation.cpp``
    on the blocks' exact products and return the final Dst (before a fused activation and the pack).

    ``blocks`` yields each K-block's sum of products (float32, fidelity already applied). Without
    fp32_acc, Dst is bfloat16 and rounds after every MVMUL: ``accumulate_in_bf16_dest`` models that
    within each block (``steps_per_block`` roundings), and the block's result is a bfloat16 value.
    ``merged``: ``blocks`` holds one sum of all the K-blocks, allowed when ``blocks_mergeable`` says so.
    """
    l1_acc = packer_l1_acc_active(cfg.packer_l1_acc, bias is not None, schedule.blocks)
    part_dtype = partials_dtype(schedule.matmul, cfg, l1_acc)
    n = 1 if merged else schedule.blocks
    # The matmul kernel reloads fp32 partials through an UnpackToDestFp32 alias (exact); the conv
    # kernel's copy_block goes through SrcA (TF32 for fp32 partials; not reached without L1 acc).
    reload = (lambda t: t) if schedule.matmul else (lambda t: _read_srca(t, part_dtype))

    def in_dst(t: torch.Tensor) -> torch.Tensor:
        if cfg.fp32_acc:
            return t
        return round_bf16(accumulate_in_bf16_dest(t, steps_per_block))

    partials = None  # the partials buffer in L1, in part_dtype
    final = None  # Dst holding the finished sum, when the last block is not packed to partials
    for j, block in enumerate(blocks):
        last = j == n - 1
        if l1_acc:
            if last and bias is None and partials is not None:
                # conv_bmm_tilize: the last block reloads the partials and packs to the output
                final = in_dst(reload(partials) + block)
                break
            dst = in_dst(block)  # Dst holds this block only; the packer adds it into L1
            packed = pack(dst, part_dtype)
            partials = packed if partials is None else pack(partials + packed, part_dtype)
            continue
        dst = in_dst(block if partials is None else reload(partials) + block)
        if last and bias is None:
            final = dst
            break
        partials = pack(dst, part_dtype)
    if final is None:
        if bias is None:  # L1 accumulation over one merged block: the output pack reads the partials
            final = reload(partials)
        else:
            # the bias pass: partials (SrcA) + bias row (SrcB), an FPU add into Dst; SrcB holds at
            # most TF32 too, which only changes a float32 bias (weights_dtype float32)
            final = _read_srca(partials, part_dtype) + truncate_tf32(bias)
            if not cfg.fp32_acc:
                final = round_bf16(final)
    return final
