"""The op layer in plain torch, modelling what TT-NN computes and where it keeps the result.

A payload is an [N, H, W, C] float32 tensor (contiguous, so channels are innermost as in ttnn's
[1, 1, N*H*W, C]) holding values already rounded to the tensor's dtype. Convolutions run through
``F.conv2d`` on channels-last views of the same memory. Numerics live in ``numerics.py``, placement on
the core grid and per-core L1 budgets in ``l1.py``; docs/numerics.md explains both.

Dtypes, layouts, placement and activation fusion follow ``TtnnBackend`` (see its module docstring),
so that both backends describe the same tensors: every compute op writes ``cfg.act_dtype`` in tiles
(``activation`` keeps its input's dtype), and an explicit ``cfg.shard`` moves an op's output there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ttswap.backends import l1
from ttswap.backends.base import CONV_FUSED_ACTIVATIONS, ELTWISE_FUSED_ACTIVATIONS, TILE, Backend, DeviceTensor, MemorySpec
from ttswap.backends.numerics import (
    BFP_BLOCK,
    accumulate_in_bf16_dest,
    dest_rounding_steps,
    fidelity_terms,
    quantize,
    round_bf16,
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
    phase reads precomputed (``operands['high' | 'full']``)."""

    operands: dict[str, torch.Tensor]
    bias: torch.Tensor | None


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


def _tiled(payload: torch.Tensor, n: int, h: int, w: int, c: int, dtype: DType, memory: MemorySpec) -> DeviceTensor:
    return DeviceTensor(payload, n, h, w, c, dtype, Layout.TILE, memory)


class EmulatedBackend(Backend):
    """Pure-torch model of TT-NN on a Wormhole n150: numerics, tensor placement and L1 limits."""

    name = "emulated"

    def __init__(self, check_l1: bool = True) -> None:
        # the live tensors' L1, counted against every op's budget as ttnn's allocator counts it
        self.resident = l1.ResidentTensors()
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
        self._check_l1(layer, l1.estimate_conv_l1(spec, x.n, x.h, x.w, cfg), *(() if kept_apart else (x,)))
        grid = l1.conv_shard_grid(layout, spec, x.n * h_out * w_out, cfg.act_block_h)

        y = None
        for bits_b, bits_a in fidelity_terms(cfg.fidelity):
            term = F.conv2d(
                _srcb(x.payload, x.dtype, bits_b).permute(0, 3, 1, 2),
                weights.operands[bits_a],
                weights.bias if y is None else None,
                spec.stride,
                spec.padding,
                spec.dilation,
                spec.groups,
            )
            y = term if y is None else y.add_(term)
        y = y.permute(0, 2, 3, 1)  # NHWC view; contiguous because the conv ran channels-last
        if not cfg.fp32_acc:
            y = accumulate_in_bf16_dest(y, dest_rounding_steps(_conv_k_chunks(spec), cfg.fidelity))
        fused = activation is not None and activation.kind in CONV_FUSED_ACTIVATIONS
        if fused:
            y = _activate(y, activation, inplace=True)
        out = _tiled(quantize(y, cfg.act_dtype).contiguous(), x.n, h_out, w_out, spec.out_channels,
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
        y = (pool(x.payload.permute(0, 3, 1, 2), 1) * scale).permute(0, 2, 3, 1)
        memory = l1.pool_shard_grid(grid, x.n * h_out * w_out).memory_spec()
        out = _tiled(quantize(y, cfg.act_dtype).contiguous(), x.n, h_out, w_out, x.c, cfg.act_dtype, memory)
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
        out = self._eltwise((a, b), _activate(y, activation, inplace=True) if fused else y, cfg, layer)
        if activation is not None and not fused:
            out = self._activate_own(out, activation, cfg, layer)
        return out

    def multiply(self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        if (b.n, b.c) != (a.n, a.c) or (b.h, b.w) not in ((a.h, a.w), (1, 1)):
            raise ValueError(f"layer {layer!r}: cannot multiply {a.describe()} by {b.describe()}")
        return self._eltwise((a, b), a.payload * b.payload, cfg, layer)

    def activation(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, x.c, 1, l1.grid_of(x.memory), cfg), x)
        out = dataclasses.replace(x, payload=quantize(_activate(x.payload, act), x.dtype))  # keeps its dtype
        return self._place(out, cfg, layer)

    def _activate_own(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        """An activation an op could not fuse, on the op's own output: in place, as TtnnBackend runs
        it, so it needs no L1 beyond ``x``."""
        self._check_l1(layer, l1.estimate_eltwise_l1(x.nhw, x.c, 0, l1.grid_of(x.memory), cfg), x)
        out = dataclasses.replace(x, payload=quantize(_activate(x.payload, act, inplace=True), x.dtype))
        return self._place(out, cfg, layer)

    def _eltwise(
        self, inputs: tuple[DeviceTensor, ...], y: torch.Tensor, cfg: OpConfig, layer: str
    ) -> DeviceTensor:
        """A binary result: float32 math on the inputs, rounded once, placed like its first input."""
        like = inputs[0]
        estimate = l1.estimate_eltwise_l1(like.nhw, like.c, len(inputs), l1.grid_of(like.memory), cfg)
        self._check_l1(layer, estimate, *inputs)
        out = _tiled(quantize(y, cfg.act_dtype), like.n, like.h, like.w, like.c, cfg.act_dtype, like.memory)
        return self._place(out, cfg, layer)

    def mean_hw(self, x: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        # ttnn reduces with a 1/(H*W) scaler held in a bfloat16 tile, so the scale itself is rounded.
        scaler = round_bf16(torch.tensor(1.0 / (x.h * x.w))).item()
        y = quantize(x.payload.sum(dim=(1, 2), keepdim=True) * scaler, cfg.act_dtype)
        return self._place(_tiled(y, x.n, 1, 1, x.c, cfg.act_dtype, _L1_INTERLEAVED), cfg, layer)

    def linear(self, x: DeviceTensor, weights: PreparedWeights, cfg: OpConfig, layer: str) -> DeviceTensor:
        k, n_out = weights.operands["full"].shape
        if (x.h, x.w, x.c) != (1, 1, k):
            raise ValueError(f"layer {layer!r}: linear expects [N,1,1,{k}], got {x.describe()}")
        rows = x.payload.reshape(x.n, k)
        y = None
        for bits_b, bits_a in fidelity_terms(cfg.fidelity):
            term = _srcb(rows, x.dtype, bits_b) @ weights.operands[bits_a]
            y = term if y is None else y + term
        if weights.bias is not None:
            y = y + weights.bias
        if not cfg.fp32_acc:
            y = accumulate_in_bf16_dest(y, dest_rounding_steps(math.ceil(k / BFP_BLOCK), cfg.fidelity))
        payload = quantize(y, cfg.act_dtype).reshape(x.n, 1, 1, n_out)
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
