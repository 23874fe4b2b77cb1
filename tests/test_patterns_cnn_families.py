"""The patterns that bring more CNN families wholly onto the device (issue 14): channel slices
(``x[:, a:b]``, ``split`` / ``chunk``, ``contiguous``), ConvNeXt blocks (LayerNorm over channels with
its permutes, GELU, layer scale), TF "same" convs, VGG's ConvMlp head, ResNeSt's split attention, and
shape arithmetic folded at trace time.

Each small module is converted with accurate numerics and compared with torch fp32 (default tier),
then run in lockstep on the emulated backend and on ttnn in mock mode with every op's shape, dtype,
layout and placement compared (``ttnn_mock`` tier), and on the golden backend (ttnn's CPU reference
for each op, through the ttnn backend's own code) with the values compared."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttswap
from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.numerics import round_bf16
from ttswap.config import DType, Fidelity, Layout, OpConfig, ShardLayout
from ttswap.metrics import pcc
from ttswap.recipe import Recipe
from ttswap.simplify import simplify
from ttswap.trace import propagate_shapes, trace

EXACT = Recipe(name="exact", defaults=OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True))


def randomize_norms(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorm and LayerNorm parameters, so that folding them is exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


# -- the small modules, one per kind -------------------------------------------------------------------


class CspSplit(nn.Module):
    """CSP / C2f style: split in halves (torch.split, uneven channel counts), one half through convs, an add
    and a concat; a ``chunk`` and ``contiguous`` as timm's CSPDarkNet writes them."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(8, 40)
        self.block = conv_bn_relu(20, 20)
        self.tail = conv_bn_relu(40, 24, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.split(x, 20, dim=1)
        b = b.contiguous()
        b = self.block(b) + b
        c, d = torch.cat([a, b], 1).chunk(2, dim=1)
        return self.tail(torch.cat([d, c], dim=1))


class IndexSlices(nn.Module):
    """DPN / Res2Net style: ``x[:, a:b]`` getitems at offsets inside tiles and on tile boundaries, a bound
    computed from ``x.shape`` (folded at trace time), and the parts into conv, add and concat."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(8, 96)
        self.conv = conv_bn_relu(32, 32)

    def forward(self, x):
        x = self.stem(x)
        half = x.shape[1] // 3  # 32: a tile boundary
        aligned = self.conv(x[:, :half])
        inside = x[:, 40:72] + x[:, half * 2:]
        return torch.cat([aligned, inside, x[:, 5:13]], 1)


def convnext_block(conv_mlp: bool = True):
    from timm.models.convnext import ConvNeXtBlock

    return ConvNeXtBlock(32, conv_mlp=conv_mlp, ls_init_value=0.5)


class PermutedLayerNorm(nn.Module):
    """ConvNeXt with ``conv_mlp=False`` normalises with ``nn.LayerNorm`` between permutes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 48, 3, 1, 1)
        self.norm = nn.LayerNorm(48, eps=1e-6)
        self.pw = nn.Conv2d(48, 16, 1)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        return F.gelu(self.pw(self.norm(x).permute(0, 3, 1, 2)))


class TfSame(nn.Module):
    """tf_efficientnet's stem and a strided depthwise conv: asymmetric padding at stride 2, even at 1."""

    def __init__(self):
        from timm.layers import BatchNormAct2d, Conv2dSame

        super().__init__()
        self.stem = Conv2dSame(8, 32, 3, stride=2, bias=False)
        self.bn = BatchNormAct2d(32, act_layer=nn.SiLU)
        self.dw = Conv2dSame(32, 32, 5, stride=2, groups=32, bias=False)
        self.same1 = Conv2dSame(32, 16, 3, stride=1)

    def forward(self, x):
        return self.same1(self.dw(self.bn(self.stem(x))))


def vgg_head():
    from timm.models.vgg import ConvMlp

    return nn.Sequential(conv_bn_relu(8, 32), nn.MaxPool2d(2), ConvMlp(32, 64, kernel_size=4))


def split_attention(radix: int = 2):
    from timm.layers import SplitAttn

    return nn.Sequential(conv_bn_relu(8, 32), SplitAttn(32, 32, groups=1, radix=radix, norm_layer=nn.BatchNorm2d))


class ResizeNet(nn.Module):
    """Nearest interpolation 10 -> 15 (upsample x3, keep every 2nd pixel) and back 15 -> 10 (x2, every 3rd)."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn_relu(8, 32)
        self.b = conv_bn_relu(32, 16)

    def forward(self, x):
        y = F.interpolate(self.a(x), size=(15, 15), mode="nearest")
        return F.interpolate(self.b(y), size=(10, 10), mode="nearest")


def convnextv2_block():
    from timm.models.convnext import ConvNeXtBlock

    block = ConvNeXtBlock(40, conv_mlp=True, use_grn=True, ls_init_value=None)
    grn = block.mlp.grn
    gen = torch.Generator().manual_seed(2)  # GRN starts as the identity (zero weight and bias): not what is tested
    grn.weight.data.copy_(torch.randn(grn.weight.shape, generator=gen))
    grn.bias.data.copy_(torch.randn(grn.bias.shape, generator=gen) * 0.1)
    return block


# module factory, input (C, H=W), rewriters it must use
CASES = {
    "csp_split": (CspSplit, 8, 32, {"channel_slice", "concat", "add", "conv"}),
    "index_slices": (IndexSlices, 8, 32, {"channel_slice", "concat", "add"}),
    "convnext_block": (convnext_block, 32, 16, {"layer_norm", "conv", "add"}),
    "convnext_block_linear": (lambda: convnext_block(conv_mlp=False), 32, 16, {"nhwc_mlp", "conv", "add"}),
    "convnextv2_block": (convnextv2_block, 40, 16, {"global_response_norm", "layer_norm", "conv", "add"}),
    "permuted_layer_norm": (PermutedLayerNorm, 8, 16, {"layer_norm", "conv"}),
    "tf_same": (TfSame, 8, 32, {"conv"}),
    "vgg_conv_mlp": (vgg_head, 8, 16, {"conv_mlp"}),
    "split_attention": (split_attention, 8, 16, {"split_attention"}),
    "resize_nearest": (ResizeNet, 8, 10, {"resize_nearest"}),
}


def make(name: str):
    factory, channels, size, replacements = CASES[name]
    torch.manual_seed(0)
    model = randomize_norms(factory())
    if getattr(model, "gamma", None) is not None:  # a trained-looking layer scale, not its init constant
        model.gamma.data.copy_(torch.rand(32) + 0.2)
    return model, (1, channels, size, size), replacements


@pytest.mark.parametrize("name", list(CASES))
def test_module_runs_wholly_on_device_and_matches_torch(name):
    model, shape, replacements = make(name)
    converted = ttswap.convert(model, EXACT, input_shape=shape, backend="emulated", cache=False)
    report = converted.report
    assert [r.node for r in report.records if r.replacement == "torch"] == []
    assert (report.transfers.uploads, report.transfers.downloads) == (1, 1)
    assert replacements <= {r.replacement for r in report.records}
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        want = model(x)
    got = torch.cat([converted(x[i:i + 1]) for i in range(2)])
    assert got.shape == want.shape
    assert pcc(got, want) > 0.9995
    # every backend op the layers call has a price (ttswap.tuning.pricing)
    from ttswap.tuning import estimate

    cost = estimate(converted)
    ops = {o.op for layer in cost.layers for o in layer.ops}
    assert cost.device_seconds > 0
    priced = {"channel_slice": "slice", "split_attention": "slice", "layer_norm": "layer_norm", "nhwc_mlp": "layer_norm"}
    assert {priced[r] for r in replacements if r in priced} <= ops


def test_split_attention_softmax_is_two_sigmoids_of_the_logit_difference():
    """The identity the split-attention layer rests on, for a radix of 2 (independent of ttswap)."""
    logits = torch.randn(5, 2, 7)
    assert torch.allclose(torch.softmax(logits, dim=1)[:, 0], torch.sigmoid(logits[:, 0] - logits[:, 1]), atol=1e-6)


def test_other_radixes_fall_back_naming_why():
    model, shape, _ = make("split_attention")
    model = randomize_norms(split_attention(radix=4))
    converted = ttswap.convert(model, EXACT, input_shape=shape, backend="emulated", cache=False)
    fallbacks = [r for r in converted.report.records if r.replacement == "torch"]
    assert len(fallbacks) == 1 and "radix 4" in fallbacks[0].fallback_reason


@pytest.mark.parametrize("size, out, plan", [((10, 10), (15, 15), (3, (2, 2))), ((15, 15), (10, 10), (2, (3, 3))),
                                             ((6, 8), (9, 12), (3, (2, 2))), ((4, 6), (6, 4), (6, (4, 9)))])
def test_resize_plan_reads_torchs_nearest_pixels(size, out, plan):
    from ttswap.patterns.resize_nearest import resize_plan

    assert resize_plan(*size, *out) == plan
    factor, (sh, sw) = plan
    x = torch.randn(1, 1, *size)
    up = x.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    assert torch.equal(up[:, :, ::sh, ::sw], F.interpolate(x, size=out, mode="nearest"))


def test_tf_same_padding_is_timms_pad():
    model, shape, _ = make("tf_same")
    converted = ttswap.convert(model, EXACT, input_shape=shape, backend="emulated", cache=False)
    notes = {r.layer: " ".join(r.notes) for r in converted.report.records if r.replacement == "conv"}
    assert "0/1/0/1" in notes["stem"]  # 3x3/2 on 32x32: one row and column more after than before
    assert "1/2/1/2" in notes["dw"]  # 5x5/2 on 16x16
    assert "1/1/1/1" in notes["same1"]  # stride 1: even, an ordinary conv


# -- the backend ops against torch ---------------------------------------------------------------------


SLICES = [(0, 32, ShardLayout.HEIGHT), (32, 64, ShardLayout.HEIGHT), (5, 37, ShardLayout.HEIGHT),
          (8, 40, ShardLayout.INTERLEAVED), (0, 32, ShardLayout.BLOCK)]


def sliced(backend, x: torch.Tensor, start: int, stop: int, shard: ShardLayout, dtype: DType = DType.BF16):
    cfg = OpConfig(shard=ShardLayout.AUTO, act_dtype=dtype, deallocate=False)
    t = backend.to_memory(backend.to_layout(backend.upload(x, cfg), Layout.TILE, "in"), shard, "in")
    return t, backend.slice_channels(t, start, stop, cfg, "slice")


@pytest.mark.parametrize("start, stop, shard", SLICES)
def test_emulated_slice_moves_values_unchanged_and_stays_on_cores_at_tile_columns(start, stop, shard):
    backend = EmulatedBackend()
    x = torch.randn(1, 64, 16, 16)
    t, y = sliced(backend, x, start, stop, shard)
    assert torch.equal(backend.download(y), round_bf16(x)[:, start:stop])
    on_cores = shard is ShardLayout.HEIGHT and start % 32 == 0 and stop % 32 == 0
    assert y.memory.layout is (ShardLayout.HEIGHT if on_cores else ShardLayout.INTERLEAVED)
    if on_cores:
        assert y.memory.shard_shape == (t.memory.shard_shape[0], stop - start)


# relative RMS error against fp64 on the same bf16 inputs: the 1/C scaler in bf16 (1/80: 0.1%), bf16 gamma,
# the bf16 output (and without fp32 accumulation, bf16 intermediates)
@pytest.mark.parametrize("fp32_acc, bound", [(True, 0.003), (False, 0.006)])
def test_emulated_layer_norm_against_torch(fp32_acc, bound):
    backend = EmulatedBackend()
    cfg = OpConfig(fidelity=Fidelity.HIFI4, fp32_acc=fp32_acc)
    x = torch.randn(1, 80, 8, 8) * 3 + 1
    weight, bias = torch.rand(80) + 0.5, torch.randn(80) * 0.1
    y = backend.download(backend.layer_norm(backend.upload(x, cfg), backend.prepare_layer_norm(weight, bias, cfg, "ln"),
                                            1e-6, cfg, "ln"))
    want = F.layer_norm(round_bf16(x).double().permute(0, 2, 3, 1), (80,), weight.double(), bias.double(), 1e-6)
    want = want.permute(0, 3, 1, 2)
    assert (y.double() - want).norm() / want.norm() < bound


def test_emulated_four_sided_padding_is_the_asymmetrically_padded_conv():
    backend = EmulatedBackend()
    cfg = OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True, deallocate=False)
    from ttswap.config import Conv2dSpec

    spec = Conv2dSpec(16, 16, (3, 3), (2, 2), (0, 0))
    x, w = torch.randn(1, 16, 10, 10), torch.randn(16, 16, 3, 3)
    y = backend.download(backend.conv2d_padded(backend.upload(x, cfg), backend.prepare_conv(w, None, spec, cfg, "c"),
                                               spec, (0, 1, 1, 0), cfg, "c"))
    want = F.conv2d(F.pad(round_bf16(x), (1, 0, 0, 1)), round_bf16(w), stride=2)
    assert y.shape == want.shape == (1, 16, 5, 5)
    assert pcc(y, want) > 0.9999


# -- shape arithmetic and constants folded at trace time ------------------------------------------------


def test_shape_arithmetic_and_constant_ops_fold_away():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, 1, 1)
            self.scale = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            y = self.conv(x)
            b, c, h, w = y.shape
            y = y.reshape(b, c // 2, 2, h * w).reshape(y.size(0), c, h, w)
            return y * self.scale.reshape(1, -1, 1, 1)

    model = Net().eval()
    gm = trace(model, None)
    propagate_shapes(gm, torch.zeros(1, 4, 6, 6))
    simplify(gm)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert getattr not in targets and "size" not in targets and operator.floordiv not in targets
    reshapes = [n.args[1:] for n in gm.graph.nodes if n.target == "reshape"]
    assert reshapes == [(1, 4, 2, 36), (1, 8, 6, 6)]
    assert sum(n.target is operator.mul and n.args[1].op == "get_attr" for n in gm.graph.nodes) == 1
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(gm(x), model(x))


# -- ttnn in mock mode, and ttnn's golden functions -----------------------------------------------------


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("dtype", [DType.BF16, DType.BFP8_B])
@pytest.mark.parametrize("start, stop, shard", SLICES)
def test_ttnn_slices_and_places_like_the_emulated_backend(start, stop, shard, dtype):
    pytest.importorskip("ttnn", reason="ttnn is not installed (pip install 'ttswap[tt]')")
    from ttswap.backends.ttnn_backend import TtnnBackend

    x = torch.randn(1, 64, 16, 16)
    ttnn_backend = TtnnBackend()
    try:
        got = sliced(ttnn_backend, x, start, stop, shard, dtype)[1]
        want = sliced(EmulatedBackend(), x, start, stop, shard, dtype)[1]
        assert (got.n, got.h, got.w, got.c, got.dtype, got.layout, got.memory) == \
            (want.n, want.h, want.w, want.c, want.dtype, want.layout, want.memory)
    finally:
        ttnn_backend.close()


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("name", list(CASES))
def test_ttnn_places_every_op_like_the_emulated_backend(name):
    pytest.importorskip("ttnn", reason="ttnn is not installed (pip install 'ttswap[tt]')")
    from ttswap.crosscheck import crosscheck

    model, shape, _ = make(name)
    result = crosscheck(model, EXACT, shape)
    assert result.ok, result.summary()


@pytest.mark.parametrize("name", list(CASES))
def test_golden_ttnn_path_computes_what_the_emulated_backend_does(name):
    """Through the ttnn backend's own calls (slice bounds, four-sided padding, LayerNorm's gamma and
    beta rows), ttnn's CPU reference for each op gives the emulated backend's values to within bf16
    rounding, and places every op alike."""
    pytest.importorskip("ttnn", reason="the golden backend needs ttnn (pip install 'ttswap[tt]')")
    from ttswap.crosscheck import crosscheck

    model, shape, _ = make(name)
    result = crosscheck(model, EXACT, shape, checked="golden")
    assert result.ok, result.summary()
    (reference, golden), = result.downloads.values()
    assert pcc(golden, reference) > 0.9999
