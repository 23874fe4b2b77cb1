"""The op layer in plain torch, modelling what TT-NN computes and where it keeps the result.

A payload is an [N, H, W, C] float32 tensor (contiguous, so channels are innermost as in ttnn's
[1, 1, N*H*W, C]) holding values already rounded to the tensor's dtype. Convolutions run through
``F.conv2d`` on channels-last views of the same memory, one call per K-block (a kernel row of the
im2col matrix, or a slice of its channels) so that the partial sums can be rounded between blocks as
ttnn's kernels do. Number formats and roundings live in ``numerics.py``, the kernels' K-block loop in
``kernels.py``, placement on the core grid and per-core L1 budgets in ``l1.py``; docs/numerics.md
explains all three with the kernel sources they follow.

Dtypes, layouts, placement and activation fusion follow ``TtnnBackend`` (see its module docstring),
so that both backends describe the same tensors: every compute op writes ``cfg.act_dtype`` in tiles
(``activation`` keeps its input's dtype), and an explicit ``cfg.shard`` moves an op's output there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ttswap.backends import kernels, l1
from ttswap.backends.base import (
    CONV_FUSED_ACTIVATIONS,
    ELTWISE_FUSED_ACTIVATIONS,
    TILE,
    Backend,
    DeviceTensor,
    MemorySpec,
    mesh_shape,
    round_up,
)
from ttswap.backends.numerics import (
    BFP_BLOCK,
    accumulate_in_bf16_dest,
    dest_rounding_steps,
    fidelity_terms,
    pack,
    quantize,
    round_bf16,
    sfpu_store,
    srca_operand,
    srcb_operand,
)
from ttswap.config import Activation, Conv2dSpec, DType, Layout, OpConfig, Pool2dSpec, ShardLayout

# Activations ttnn applies to Dst inside the op (before rounding to the output dtype); the others run
# as a separate op on the rounded result. Same sets as TtnnBackend, measured on ttnn 0.81.1.

_L1_INTERLEAVED = MemorySpec()


@dataclass(frozen=True)
class PreparedWeights:
    """Weights as the device holds them, quantized to the weight dtype, with the bits each fidelity
    phase reads precomputed (``operands['high' | 'full']``: conv [C_out, C_in/groups, kh, kw]
    channels-last, linear [K, N]). ``rows`` caches a conv's per-kernel-row slices."""

    operands: dict[str, torch.Tensor]
    bias: torch.Tensor | None
    rows: dict[tuple[str, int], torch.Tensor] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def kernel_row(self, bits: str, row: int) -> torch.Tensor:
        key = (bits, row)
        if key not in self.rows:
            self.rows[key] = self.operands[bits][:, :, row:row + 1, :].contiguous(memory_format=torch.channels_last)
        return self.rows[key]


def _activate(y: torch.Tensor, act: Activation, inplace: bool = False) -> torch.Tensor:
    """Apply an activation in float32, as the SFPU does. ``inplace`` may overwrite ``y``."""
    kind = act.kind
    if kind == "relu":
        return F.relu(y, inplace=inplace)
    if kind == "relu6":
        return F.relu6(y, inplace=inplace)
    if kind == "leaky_relu":
        return F.leaky_relu(y, act.param, inplace=inplace)
    if kind == "mish":
        return F.mish(y, inplace=inplace)
    if kind == "silu":
        return F.silu(y, inplace=inplace)
    if kind == "sigmoid":
        return torch.sigmoid_(y) if inplace else torch.sigmoid(y)
    if kind == "hardsigmoid":
        return F.hardsigmoid(y, inplace=inplace)  # relu6(x + 3) / 6, like ttnn.hardsigmoid
    if kind == "hardswish":
        return F.hardswish(y, inplace=inplace)
    if kind == "gelu":
        return F.gelu(y)
    raise ValueError(f"unsupported activation {kind!r}")


def _unary(values: torch.Tensor, act: Activation, dtype: DType, inplace: bool = False) -> torch.Tensor:
    """A ttnn unary op: the input unpacked to a 16-bit Dst (unary ops run without fp32 accumulation on
    bfloat16 data), the SFPU's result stored into it, packed back to ``dtype``."""
    return pack(sfpu_store(_activate(values, act, inplace=inplace), act.kind, fp32_dest=False), dtype)


def _srcb(values: torch.Tensor, dtype: DType, bits: str) -> torch.Tensor:
    """The activation bits a fidelity phase reads; bfloat16 and bfloat8_b values are read whole."""
    if bits == "full" and dtype is not DType.FLOAT32:
        return values
    return srcb_operand(values, bits)


def _weight_operands(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"high": srca_operand(matrix, "high"), "full": srca_operand(matrix, "full")}


def _conv_k_chunks(spec: Conv2dSpec) -> int:
    """16-wide chunks of ttnn's [kh*kw*C_in, C_out] weight matrix holding one output's nonzero terms.
    A grouped conv is expanded block-diagonally, so its zeros add nothing to the running sum."""
    kh, kw = spec.kernel
    if spec.groups == 1:
        return math.ceil(kh * kw * spec.in_channels / BFP_BLOCK)
    return kh * kw * math.ceil(spec.in_channels // spec.groups / BFP_BLOCK)


def _im2col_operand(x: DeviceTensor, spec: Conv2dSpec, cfg: OpConfig, layout: ShardLayout,
                    schedule: kernels.KSchedule) -> torch.Tensor | None:
    """The activations the matrix engine reads, when they differ from ``x.payload``; None when equal.

    conv2d tilizes its im2col block into a buffer in the *output* dtype (``get_cb_info``: ACT_TILIZED
    takes ``output_df``; a 1x1 conv's input is ``to_layout(TILE, output_dtype)``), so bfloat8_b outputs
    re-quantize the activations in blocks of 16 along K. When a kernel position's channels (padded to
    8 on HEIGHT, whole tiles per core otherwise) are a multiple of 16, those blocks are the input's
    own 16-channel blocks: a quantization of the input along channels. Otherwise see ``_im2col_rows``.
    """
    if cfg.act_dtype is not DType.BFP8_B or _needs_im2col_rows(spec, cfg, layout, schedule):
        return None
    if x.dtype is DType.BFP8_B:
        return None  # already quantized in these very blocks
    return pack(x.payload, DType.BFP8_B)


def _needs_im2col_rows(spec: Conv2dSpec, cfg: OpConfig, layout: ShardLayout, schedule: kernels.KSchedule) -> bool:
    """bfloat8_b output and HEIGHT sharding with C_in (padded to 8) not a multiple of 16: a block of the
    im2col row spans two pixels (the 3-channel stem), so it is built explicitly (dense convs only)."""
    return (cfg.act_dtype is DType.BFP8_B and layout is ShardLayout.HEIGHT and not schedule.matmul
            and spec.groups == 1 and round_up(spec.in_channels, l1.STICK_ALIGN) % BFP_BLOCK != 0)


def _im2col_rows(x: torch.Tensor, spec: Conv2dSpec, h_out: int, w_out: int) -> torch.Tensor:
    """ttnn's im2col matrix of an NHWC input, [N, H_out, W_out, kh, round_up(kw * C_pad, 32)]: per
    output pixel and kernel row, kw pixels of C_in channels padded to 8, the row padded to a tile,
    quantized to bfloat8_b in blocks of 16 along it."""
    n, _, _, c = x.shape
    kh, kw = spec.kernel
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    c_pad = round_up(c, l1.STICK_ALIGN)
    xp = F.pad(x, (0, c_pad - c, pw, pw, ph, ph))
    taps = [
        xp[:, r * dh: r * dh + (h_out - 1) * sh + 1: sh, q * dw: q * dw + (w_out - 1) * sw + 1: sw, :]
        for r in range(kh) for q in range(kw)
    ]
    rows = torch.stack(taps, dim=3).reshape(n, h_out, w_out, kh, kw * c_pad)
    width = round_up(kw * c_pad, TILE)
    rows = F.pad(rows, (0, width - kw * c_pad))
    return pack(rows, DType.BFP8_B)


def _conv_k_block_products(x: DeviceTensor, weights: PreparedWeights, spec: Conv2dSpec, cfg: OpConfig,
                           schedule: kernels.KSchedule, layout: ShardLayout) -> Iterator[torch.Tensor]:
    """Each K-block's exact sum of fidelity-masked products, NHWC float32, in the kernel's order."""
    h_out, w_out = spec.output_hw(x.h, x.w)
    terms = fidelity_terms(cfg.fidelity)
    if _needs_im2col_rows(spec, cfg, layout, schedule):
        rows = _im2col_rows(x.payload, spec, h_out, w_out)
        kh, kw = spec.kernel
        c, c_pad = spec.in_channels, round_up(spec.in_channels, l1.STICK_ALIGN)
        taps = rows[..., : kw * c_pad].reshape(x.n, h_out, w_out, kh, kw, c_pad)[..., :c]
        total = None
        for r in range(kh):
            tap = taps[:, :, :, r].reshape(-1, kw * c)
            block = None
            for bits_b, bits_a in terms:
                # weight row r as [kw * C_in, C_out], matching the tap order (kw, c)
                w_row = weights.operands[bits_a][:, :, r, :].permute(2, 1, 0).reshape(kw * c, -1)
                term = _srcb(tap, DType.BFP8_B, bits_b) @ w_row
                block = term if block is None else block.add_(term)
            block = block.reshape(x.n, h_out, w_out, -1)
            if schedule.kernel_rows:
                yield block
            else:
                total = block if total is None else total.add_(block)
        if total is not None:
            yield total
        return

    operand = _im2col_operand(x, spec, cfg, layout, schedule)
    values, dtype = (x.payload, x.dtype) if operand is None else (operand, cfg.act_dtype)
    (sh, _), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    # the activation bits each fidelity term reads, NCHW views of channels-last memory, padded once
    inputs = {}
    for bits_b, _ in terms:
        if bits_b not in inputs:
            image = _srcb(values, dtype, bits_b).permute(0, 3, 1, 2)
            if schedule.kernel_rows:  # (made channels-last explicitly: torch's slow path otherwise)
                image = F.pad(image, (pw, pw, ph, ph)).contiguous(memory_format=torch.channels_last)
            inputs[bits_b] = image
    full_channels = schedule.channel_slices == ((0, spec.in_channels),)
    for r in range(schedule.kh if schedule.kernel_rows else 1):
        for c0, c1 in schedule.channel_slices:
            block = None
            for bits_b, bits_a in terms:
                image = inputs[bits_b]
                if schedule.kernel_rows:
                    image = image[:, :, r * dh: r * dh + (h_out - 1) * sh + 1, :]
                    weight = weights.kernel_row(bits_a, r)
                    padding, dilation = (0, 0), (1, dw)
                else:
                    weight = weights.operands[bits_a]
                    padding, dilation = spec.padding, spec.dilation
                if full_channels:
                    term = F.conv2d(image, weight, None, spec.stride, padding, dilation, spec.groups)
                else:
                    term = _channel_block_conv(image, weight, spec, c0, c1, padding, dilation)
                block = term if block is None else block.add_(term)
            yield block.permute(0, 2, 3, 1)  # NHWC view: the conv ran channels-last


def _channel_block_conv(image: torch.Tensor, weight: torch.Tensor, spec: Conv2dSpec, c0: int, c1: int,
                        padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The products of input channels [c0, c1) only, for every output channel. ttnn expands a grouped
    conv's weights block-diagonally, so a K-block of input channels holds the groups inside it and
    zeros for every other output channel."""
    if spec.groups == 1:
        return F.conv2d(image[:, c0:c1], weight[:, c0:c1], None, spec.stride, padding, dilation)
    cin_g, cout_g = spec.in_channels // spec.groups, spec.out_channels // spec.groups
    g0, g1 = c0 // cin_g, -(-c1 // cin_g)  # the groups the block touches, the edge ones perhaps in part
    kept = torch.zeros(spec.in_channels, dtype=torch.bool)
    kept[c0:c1] = True
    inputs = image[:, g0 * cin_g:g1 * cin_g] * kept[g0 * cin_g:g1 * cin_g].view(1, -1, 1, 1).to(image.dtype)
    term = F.conv2d(inputs, weight[g0 * cout_g:g1 * cout_g], None, spec.stride, padding, dilation, g1 - g0)
    out = term.new_zeros(term.shape[0], spec.out_channels, *term.shape[2:])
    out[:, g0 * cout_g:g1 * cout_g] = term
    return out.contiguous(memory_format=torch.channels_last)


def _tiled(payload: torch.Tensor, n: int, h: int, w: int, c: int, dtype: DType, memory: MemorySpec) -> DeviceTensor:
    return DeviceTensor(payload, n, h, w, c, dtype, Layout.TILE, memory)


class EmulatedBackend(Backend):
    """Pure-torch model of TT-NN on a Wormhole n150: numerics, tensor placement and L1 limits."""

    name = "emulated"

    def __init__(self, check_l1: bool = True, mesh: tuple[int, int] = (1, 1)) -> None:
        # the live tensors' L1, counted against every op's budget as ttnn's allocator counts it
        self.resident = l1.ResidentTensors()
        # data parallel: every image is computed as on one chip, so the values are one chip's; the L1
        # budget is checked for the whole batch on one chip, which errs on the safe side
        self.mesh = mesh_shape(mesh)
        # False: values and placement only, for observing a configuration that does not fit (the
        # auto recipe does, to see every op before choosing layouts that do)
        self.check_l1 = check_l1

    def _check_l1(self, layer: str, estimate: tuple[int, dict[str, int]], *inputs: DeviceTensor) -> None:
        if self.check_l1:
            l1.check_l1(layer, estimate, self.resident.bytes_besides(inputs))

    # -- transfers -------------------------------------------------------------------------------
    def upload(self, x: torch.Tensor, cfg: OpConfig, layer: str = "input") -> DeviceTensor:
        if x.dim() != 4:
            raise ValueError(f"layer {layer!r}: upload expects an NCHW tensor, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        self.check_batch(n, layer)
        payload = quantize(x.detach().float().permute(0, 2, 3, 1).contiguous(), cfg.act_dtype)
        layout = Layout.TILE if cfg.act_dtype is DType.BFP8_B else Layout.ROW_MAJOR  # bfloat8_b only tiles
        return self.resident.add(DeviceTensor(payload, n, h, w, c, cfg.act_dtype, layout, _L1_INTERLEAVED))

    def download(self, t: DeviceTensor, layer: str = "output") -> torch.Tensor:
        return t.payload.permute(0, 3, 1, 2).contiguous()

    # -- weights ---------------------------------------------------------------------------------
    def prepare_conv(
        self, weight: torch.Tensor, bias: torch.Tensor | None, spec: Conv2dSpec, cfg: OpConfig, layer: str
    ) -> PreparedWeights:
        expected = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)
        if tuple(weight.shape) != expected:
            raise ValueError(f"layer {layer!r}: conv weight has shape {tuple(weight.shape)}, spec says {expected}")
        weight = weight.detach().float()
        if spec.groups == 1:
            # ttnn's weight matrix is [kh*kw*C_in, C_out]: quantization blocks run along C_out.
            quantized = quantize(weight.permute(2, 3, 1, 0), cfg.weight_dtype).permute(3, 2, 0, 1)
        else:
            quantized = self._quantize_grouped(weight, spec, cfg.weight_dtype)
        operands = {
            bits: w.contiguous(memory_format=torch.channels_last) for bits, w in _weight_operands(quantized).items()
        }
        # ttnn tilizes the bias as one [1, C_out] row in the weight dtype: blocks of 16 channels.
        qbias = quantize(bias.detach().float(), cfg.weight_dtype) if bias is not None else None
        return PreparedWeights(operands, qbias)

    @staticmethod
    def _quantize_grouped(weight: torch.Tensor, spec: Conv2dSpec, dtype: DType) -> torch.Tensor:
        """ttnn expands a grouped conv to a block-diagonal dense [kh*kw*C_in, C_out] weight before
        tilizing, so a block of 16 output channels holds one group's weights next to zeros (in a
        depthwise conv every weight gets its own exponent). Quantize that matrix, then read back."""
        cout, cin_per_group, kh, kw = weight.shape
        cout_per_group = cout // spec.groups
        rows = weight.permute(2, 3, 1, 0).reshape(kh * kw, cin_per_group, cout)
        # Output channel co reads its group's input channels: their rows in the dense matrix.
        group_start = (torch.arange(cout) // cout_per_group) * cin_per_group
        dense_row = (group_start + torch.arange(cin_per_group)[:, None]).expand(kh * kw, cin_per_group, cout)
        dense = rows.new_zeros(kh * kw, spec.in_channels, cout).scatter_(1, dense_row, rows)
        back = quantize(dense, dtype).gather(1, dense_row)
        return back.view(kh, kw, cin_per_group, cout).permute(3, 2, 0, 1)

    def prepare_linear(
        self, weight: torch.Tensor, bias: torch.Tensor | None, cfg: OpConfig, layer: str
    ) -> PreparedWeights:
        if weight.dim() != 2:
            raise ValueError(f"layer {layer!r}: linear weight must be [out, in], got shape {tuple(weight.shape)}")
        matrix = quantize(weight.detach().float().t(), cfg.weight_dtype).contiguous()  # [K, N], blocks along N
        qbias = round_bf16(bias.detach().float()) if bias is not None else None  # TtnnBackend keeps it bf16
        return PreparedWeights(_weight_operands(matrix), qbias)

    # -- compute ---------------------------------------------------------------------------------
    def conv2d(
        self,
        x: DeviceTensor,
        weights: PreparedWeights,
        spec: Conv2dSpec,
        cfg: OpConfig,
        layer: str,
        activation: Activation | None = None,
    ) -> DeviceTensor:
        if x.c != spec.in_channels:
            raise ValueError(f"layer {layer!r}: input has {x.c} channels, conv expects {spec.in_channels}")
        h_out, w_out = spec.output_hw(x.h, x.w)
        layout = l1.resolve_conv_layout(spec, x.nhw, cfg)
        # The estimate counts the input shard the conv computes from. An input laid out otherwise
        # is resharded into it first, and unless deallocate frees the original then, both stay.
        kept_apart = x.memory.layout is not layout and not cfg.deallocate
        has_bias = weights.bias is not None
        estimate = l1.estimate_conv_l1(spec, x.n, x.h, x.w, cfg, has_bias=has_bias)
        self._check_l1(layer, estimate, *(() if kept_apart else (x,)))
        grid = l1.conv_shard_grid(layout, spec, x.n * h_out * w_out, cfg.act_block_h)

        schedule = kernels.conv_k_schedule(spec, layout, grid)
        steps = dest_rounding_steps(_conv_k_chunks(spec), cfg.fidelity)
        # blocks whose intermediate packs change nothing are computed as one product (same values up
        # to float32 summation order, several times faster than one conv call per block)
        merged = kernels.blocks_mergeable(schedule, cfg, has_bias)
        products = dataclasses.replace(schedule, kernel_rows=False, channel_slices=((0, spec.in_channels),)) \
            if merged else schedule
        blocks = _conv_k_block_products(x, weights, spec, cfg, products, layout)
        steps_per_block = steps if merged else -(-steps // schedule.blocks)
        y = kernels.accumulate_k_blocks(blocks, schedule, weights.bias, cfg, steps_per_block, merged=merged)
        fused = activation is not None and activation.kind in CONV_FUSED_ACTIVATIONS
        if fused:  # on the SFPU, in Dst, before the pack
            y = sfpu_store(_activate(y, activation, inplace=True), activation.kind, cfg.fp32_acc)
        out = _tiled(pack(y, cfg.act_dtype).contiguous(), x.n, h_out, w_out, spec.out_channels,
                     cfg.act_dtype, grid.memory_spec())
        if cfg.deallocate:  # ttnn frees the input once the conv has read it
            self.resident.discard(x)
        out = self._place(out, cfg, layer)
        if activation is not None and not fused:
            out = self._activate_own(out, activation, cfg, layer)
        return out

    def max_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str) -> DeviceTensor:
        h_out, w_out = spec.output_hw(x.h, x.w)
        grid = self._pool_input_grid(x, x.n * h_out * w_out, cfg)
        self._check_l1(layer, l1.estimate_pool_l1(spec, x.n, x.h, x.w, x.c, grid, cfg), x)
        y = F.max_pool2d(
            x.payload.permute(0, 3, 1, 2), spec.kernel, spec.stride, spec.padding, spec.dilation, spec.ceil_mode
        ).permute(0, 2, 3, 1)
        if tuple(y.shape[1:3]) != (h_out, w_out):
            raise RuntimeError(f"layer {layer!r}: pooled to {tuple(y.shape[1:3])}, Pool2dSpec says {(h_out, w_out)}")
        memory = l1.pool_shard_grid(grid, x.n * h_out * w_out).memory_spec()
        out = _tiled(quantize(y, cfg.act_dtype).contiguous(), x.n, h_out, w_out, x.c, cfg.act_dtype, memory)
        return self._place(out, cfg, layer)

    def avg_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str, count_include_pad: bool = True,
                   divisor_override: int | None = None) -> DeviceTensor:
        if spec.dilation != (1, 1):
            raise ValueError(f"layer {layer!r}: avg_pool2d has no dilation, got {spec.dilation}")
        h_out, w_out = spec.output_hw(x.h, x.w)
        grid = self._pool_input_grid(x, x.n * h_out * w_out, cfg)
        self._check_l1(layer, l1.estimate_pool_l1(spec, x.n, x.h, x.w, x.c, grid, cfg), x)

        def pool(images: torch.Tensor, divisor: int | None) -> torch.Tensor:
            return F.avg_pool2d(images, spec.kernel, spec.stride, spec.padding, spec.ceil_mode, count_include_pad,
                                divisor)

        # Each window's sum times 1/divisor held in bfloat16, as ttnn scales reductions (see mean_hw).
        # 1/divisor per window, from pooling ones: the count summed over the count averaged.
        ones = x.payload.new_ones(1, 1, x.h, x.w)
        scale = round_bf16(pool(ones, divisor_override) / pool(ones, 1))
        # compute_pool_2d.cpp reduces with the window in SrcA and the scaler in SrcB (tilizeA_B_reduce),
        # so the math fidelity truncates the data to SrcA's bits, the scaler to SrcB's.
        images = x.payload.permute(0, 3, 1, 2)
        y = None
        for bits_b, bits_a in fidelity_terms(cfg.fidelity):
            term = pool(srca_operand(images, bits_a), 1) * srcb_operand(scale, bits_b)
            y = term if y is None else y.add_(term)
        y = y.permute(0, 2, 3, 1)
        if not cfg.fp32_acc:
            y = round_bf16(y)  # one window's sum rounds in a 16-bit Dst
        memory = l1.pool_shard_grid(grid, x.n * h_out * w_out).memory_spec()
        out = _tiled(pack(y, cfg.act_dtype).contiguous(), x.n, h_out, w_out, x.c, cfg.act_dtype, memory)
        return self._place(out, cfg, layer)

    def upsample_nearest(self, x: DeviceTensor, scale: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        if scale < 1:
            raise ValueError(f"layer {layer!r}: upsample scale must be a positive integer, got {scale}")
        self._check_l1(layer, l1.estimate_upsample_l1(x.nhw, x.c, scale, cfg), x)
        n, h, w, c = x.payload.shape
        y = x.payload[:, :, None, :, None, :].expand(n, h, scale, w, scale, c).reshape(n, h * scale, w * scale, c)
        out = _tiled(quantize(y, cfg.act_dtype), n, h * scale, w * scale, c, cfg.act_dtype, _L1_INTERLEAVED)
        return self._place(out, cfg, layer)

    def concat(self, xs: Sequence[DeviceTensor], cfg: OpConfig, layer: str) -> DeviceTensor:
        if not xs:
            raise ValueError(f"layer {layer!r}: concat of no tensors")
        first = xs[0]
        if any((t.n, t.h, t.w) != (first.n, first.h, first.w) for t in xs):
            shapes = ", ".join(f"[{t.n},{t.h},{t.w},{t.c}]" for t in xs)
            raise ValueError(f"layer {layer!r}: concat needs equal N, H, W; got {shapes}")
        channels = [t.c for t in xs]
        memory = self._concat_memory(xs)
        grids = [l1.grid_of(t.memory) for t in xs]
        self._check_l1(layer, l1.estimate_concat_l1(first.nhw, channels, grids, l1.grid_of(memory), cfg), *xs)
        payload = quantize(torch.cat([t.payload for t in xs], dim=-1), cfg.act_dtype)
        out = _tiled(payload, first.n, first.h, first.w, sum(channels), cfg.act_dtype, memory)
        return self._place(out, cfg, layer)

    @staticmethod
    def _concat_memory(xs: Sequence[DeviceTensor]) -> MemorySpec:
        """Concat stays on the cores when every input shares one height- or block-sharded grid and
        shard height (block: each input a whole number of tiles per column); else L1 interleaved."""
        first = xs[0].memory

        def placement(m: MemorySpec) -> tuple:
            return m.layout, m.grid, m.num_cores, m.shard_shape and m.shard_shape[0]

        if first.shard_shape is None or any(placement(t.memory) != placement(first) for t in xs):
            return _L1_INTERLEAVED
        channels = sum(t.c for t in xs)
        if first.layout is ShardLayout.HEIGHT and channels % TILE == 0:
            width = channels
        elif first.layout is ShardLayout.BLOCK and all(
            t.layout is Layout.TILE and t.c % (TILE * first.grid[0]) == 0 for t in xs
        ):
            width = channels // first.grid[0]
        else:
            return _L1_INTERLEAVED
        return dataclasses.replace(first, shard_shape=(first.shard_shape[0], width))

    def add(
        self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str, activation: Activation | None = None
    ) -> DeviceTensor:
        if a.payload.shape != b.payload.shape:
            raise ValueError(f"layer {layer!r}: add of {a.describe()} and {b.describe()}")
        fused = activation is not None and activation.kind in ELTWISE_FUSED_ACTIVATIONS
        y = a.payload + b.payload
        if fused:  # the FPU's sum in a 16-bit Dst, then the SFPU activation stored into it
            y = sfpu_store(_activate(round_bf16(y), activation, inplace=True), activation.kind, fp32_dest=False)
        out = self._eltwise((a, b), y, cfg, layer)
        if activation is not None and not fused:
            out = self._activate_own(out, activation, cfg, layer)
        return out

    def multiply(self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        if (b.n, b.c) != (a.n, a.c) or (b.h, b.w) not in ((a.h, a.w), (1, 1)):
            raise ValueError(f"layer {layer!r}: cannot multiply {a.describe()} by {b.describe()}")
        return self._eltwise((a, b), a.payload * b.payload, cfg, layer)

    def activation(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, x.c, 1, l1.grid_of(x.memory), cfg), x)
        out = dataclasses.replace(x, payload=_unary(x.payload, act, x.dtype))  # keeps its dtype
        return self._place(out, cfg, layer)

    def _activate_own(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        """An activation an op could not fuse, on the op's own output: in place, as TtnnBackend runs
        it, so it needs no L1 beyond ``x``."""
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, x.c, 0, l1.grid_of(x.memory), cfg), x)
        out = dataclasses.replace(x, payload=_unary(x.payload, act, x.dtype, inplace=True))
        return self._place(out, cfg, layer)

    def _eltwise(
        self, inputs: tuple[DeviceTensor, ...], y: torch.Tensor, cfg: OpConfig, layer: str
    ) -> DeviceTensor:
        """A binary result: float32 math on the inputs, rounded once, placed like its first input.

        ttnn's binary ops run on the FPU into a 16-bit Dst (no fp32 accumulation for bfloat16 inputs),
        whose narrowing is taken to round to nearest even (ISA ELWADD/ELWMUL: "hardware rounds", mode
        not stated); the pack to bfloat16 is then exact."""
        like = inputs[0]
        estimate = l1.estimate_eltwise_l1(like.nhw, like.c, len(inputs), l1.grid_of(like.memory), cfg)
        self._check_l1(layer, estimate, *inputs)
        out = _tiled(pack(round_bf16(y), cfg.act_dtype), like.n, like.h, like.w, like.c, cfg.act_dtype, like.memory)
        return self._place(out, cfg, layer)

    def mean_hw(self, x: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        # ttnn reduces with a 1/(H*W) scaler held in a bfloat16 tile, so the scale itself is rounded.
        # llk_unpack_reduce.h unpacks the data into SrcA and the scaler into SrcB, and GAPOOL runs the
        # fidelity phases: at LoFi the data keeps 1 + 4 mantissa bits (truncated), the scaler 1 + 6.
        scaler = round_bf16(torch.tensor(1.0 / (x.h * x.w)))
        y = None
        for bits_b, bits_a in fidelity_terms(cfg.fidelity):
            term = srca_operand(x.payload, bits_a).sum(dim=(1, 2), keepdim=True) * srcb_operand(scaler, bits_b)
            y = term if y is None else y + term
        if not cfg.fp32_acc:
            steps = dest_rounding_steps(math.ceil(x.h * x.w / BFP_BLOCK), cfg.fidelity)
            y = round_bf16(accumulate_in_bf16_dest(y, steps))
        y = pack(y, cfg.act_dtype)
        return self._place(_tiled(y, x.n, 1, 1, x.c, cfg.act_dtype, _L1_INTERLEAVED), cfg, layer)

    def linear(self, x: DeviceTensor, weights: PreparedWeights, cfg: OpConfig, layer: str) -> DeviceTensor:
        k, n_out = weights.operands["full"].shape
        if (x.h, x.w, x.c) != (1, 1, k):
            raise ValueError(f"layer {layer!r}: linear expects [N,1,1,{k}], got {x.describe()}")
        rows = x.payload.reshape(x.n, k)
        if x.dtype is not cfg.act_dtype and cfg.act_dtype is DType.BFP8_B:
            rows = pack(rows, cfg.act_dtype)  # ttnn.linear's in0 takes the output dtype, as a 1x1 conv's
        y = None
        for bits_b, bits_a in fidelity_terms(cfg.fidelity):
            term = _srcb(rows, x.dtype, bits_b) @ weights.operands[bits_a]
            y = term if y is None else y + term
        # one K-block (ttnn's auto in0_block_w for this shape is not in the wheel): the sum is packed to
        # the partials buffer, and the bias added after it, as in every matmul with a fused bias
        schedule = kernels.KSchedule(1, False, ((0, k),), True)
        steps = dest_rounding_steps(math.ceil(k / BFP_BLOCK), cfg.fidelity)
        y = kernels.accumulate_k_blocks([y], schedule, weights.bias, cfg, steps)
        payload = pack(y, cfg.act_dtype).reshape(x.n, 1, 1, n_out)
        return self._place(_tiled(payload, x.n, 1, 1, n_out, cfg.act_dtype, _L1_INTERLEAVED), cfg, layer)

    # -- memory and layout -----------------------------------------------------------------------
    def to_memory(self, x: DeviceTensor, layout: ShardLayout, layer: str) -> DeviceTensor:
        try:
            grid = l1.tensor_shard_grid(layout, x.nhw, x.c, tiled=x.layout is Layout.TILE)
        except ValueError as error:
            raise ValueError(f"layer {layer!r}: {error}") from error
        return self.resident.add(dataclasses.replace(x, memory=grid.memory_spec() if grid else _L1_INTERLEAVED))

    def to_layout(self, x: DeviceTensor, layout: Layout, layer: str) -> DeviceTensor:
        # bfloat8_b exists only in tiles: untilizing gives bfloat16 (the values are exact in it)
        dtype = DType.BF16 if layout is Layout.ROW_MAJOR and x.dtype is DType.BFP8_B else x.dtype
        return self.resident.add(dataclasses.replace(x, layout=layout, dtype=dtype))

    def _place(self, t: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        """Move an op's output where an explicit ``cfg.shard`` asks; AUTO keeps the op's choice."""
        if cfg.shard is ShardLayout.AUTO or t.memory.layout is cfg.shard:
            return self.resident.add(t)
        return self.to_memory(t, cfg.shard, layer)

    @staticmethod
    def _pool_input_grid(x: DeviceTensor, nhw_out: int, cfg: OpConfig) -> l1.ShardGrid:
        """Pools work on their input's shards; an interleaved one is sharded by ``l1.pool_input_grid``."""
        return l1.grid_of(x.memory) or l1.pool_input_grid(cfg.shard, x.nhw, nhw_out, x.c)

    # -- channel slices, four-sided conv padding, LayerNorm over channels ------------------------
    def slice_channels(self, x: DeviceTensor, start: int, stop: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        if not 0 <= start < stop <= x.c:
            raise ValueError(f"layer {layer!r}: channels [{start}, {stop}) of {x.describe()}")
        on_cores = _slice_stays_sharded(x, start, stop)
        memory = dataclasses.replace(x.memory, shard_shape=(x.memory.shard_shape[0], stop - start)) if on_cores \
            else _L1_INTERLEAVED
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, stop - start, 0, l1.grid_of(memory), cfg), x)
        # bfloat8_b cut inside a tile: ttnn slices it as bfloat16, which holds its values exactly
        dtype = DType.BF16 if x.dtype is DType.BFP8_B and not _tile_aligned(start, stop) else x.dtype
        payload = x.payload[..., start:stop].contiguous()
        return self._place(DeviceTensor(payload, x.n, x.h, x.w, stop - start, dtype, x.layout, memory), cfg, layer)

    def conv2d_padded(self, x: DeviceTensor, weights: PreparedWeights, spec: Conv2dSpec,
                      padding: tuple[int, int, int, int], cfg: OpConfig, layer: str,
                      activation: Activation | None = None) -> DeviceTensor:
        # Zeros add nothing to any product, so the conv of the zero-padded image is the padded conv,
        # bit for bit. (Its L1 estimate and AUTO layout read the padded N*H*W, a few rows more.)
        if spec.padding != (0, 0):
            raise ValueError(f"layer {layer!r}: conv2d_padded takes its padding apart, got spec padding {spec.padding}")
        top, bottom, left, right = padding
        padded = dataclasses.replace(x, payload=F.pad(x.payload, (0, 0, left, right, top, bottom)),
                                     h=x.h + top + bottom, w=x.w + left + right)
        if cfg.deallocate:
            self.resident.discard(x)
        return self.conv2d(padded, weights, spec, cfg, layer, activation)

    def prepare_layer_norm(self, weight: torch.Tensor | None, bias: torch.Tensor | None, cfg: OpConfig,
                           layer: str) -> NormWeights:
        # ttnn holds gamma and beta as bfloat16 tiles
        return NormWeights(None if weight is None else round_bf16(weight.detach().float().flatten()),
                           None if bias is None else round_bf16(bias.detach().float().flatten()))

    def layer_norm(self, x: DeviceTensor, weights: NormWeights, eps: float, cfg: OpConfig, layer: str) -> DeviceTensor:
        """ttnn's layernorm kernel: E[x] and E[(x - E[x])^2] by reductions with a 1/C scaler held in
        bfloat16, rsqrt(var + eps), then gamma and beta. With fp32 accumulation its intermediate buffers
        are float32; without, each intermediate is rounded to bfloat16."""
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, x.c, 1, None, cfg), x)
        keep = (lambda t: t) if cfg.fp32_acc else round_bf16
        scaler = round_bf16(torch.tensor(1.0 / x.c))
        values = x.payload
        mean = keep(values.sum(dim=-1, keepdim=True) * scaler)
        centred = keep(values - mean)
        var = keep((centred * centred).sum(dim=-1, keepdim=True) * scaler)
        y = keep(centred * keep(torch.rsqrt(var + eps)))
        if weights.weight is not None:
            y = keep(y * weights.weight)
        if weights.bias is not None:
            y = y + weights.bias
        out = _tiled(pack(y, cfg.act_dtype).contiguous(), x.n, x.h, x.w, x.c, cfg.act_dtype, _L1_INTERLEAVED)
        return self._place(out, cfg, layer)

    def global_response_norm(self, x: DeviceTensor, weights: NormWeights, eps: float, cfg: OpConfig,
                             layer: str) -> DeviceTensor:
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, x.c, 2, None, cfg), x)
        y = _grn_values(x, weights, eps)
        out = _tiled(pack(y, cfg.act_dtype).contiguous(), x.n, x.h, x.w, x.c, cfg.act_dtype, _L1_INTERLEAVED)
        return self._place(out, cfg, layer)


@dataclass(frozen=True)
class NormWeights:
    """A LayerNorm's gamma and beta as the device holds them (bfloat16), [C] each."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _tile_aligned(start: int, stop: int) -> bool:
    return start % TILE == 0 and stop % TILE == 0


def _slice_stays_sharded(x: DeviceTensor, start: int, stop: int) -> bool:
    """ttnn slices a height-sharded tiled tensor on its own cores when the cut falls on tile columns."""
    return (x.memory.layout is ShardLayout.HEIGHT and x.memory.shard_shape is not None and x.layout is Layout.TILE
            and _tile_aligned(start, stop))


def _grn_values(x: DeviceTensor, weights: NormWeights, eps: float) -> torch.Tensor:
    """TtnnBackend's GRN op by op, each result rounded to bfloat16 as the op stores it: the squares, their
    mean over H*W (a 1/(H*W) scaler in bfloat16), its square root (the norm over sqrt(H*W)), the mean of
    that over channels, 1/(mean + eps/sqrt(H*W)), the per-channel scale 1 + gamma * norm / mean, x times
    it, plus beta."""
    values = x.payload
    squares = round_bf16(values * values)
    mean_sq = round_bf16(squares.sum(dim=(1, 2), keepdim=True) * round_bf16(torch.tensor(1.0 / (x.h * x.w))))
    norm = round_bf16(torch.sqrt(mean_sq))
    mean = round_bf16(norm.sum(dim=-1, keepdim=True) * round_bf16(torch.tensor(1.0 / x.c)))
    inverse = round_bf16(1.0 / round_bf16(mean + eps / math.sqrt(x.h * x.w)))
    scale = round_bf16(round_bf16(norm * inverse) * (weights.weight if weights.weight is not None else 1.0))
    y = round_bf16(values * round_bf16(scale + 1.0))
    return round_bf16(y + weights.bias) if weights.bias is not None else y
