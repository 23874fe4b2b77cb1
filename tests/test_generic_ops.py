"""Generic CNN ops beyond ESE-VoVNet and YOLOv4, each converted from a small model (timm's own blocks
where timm has them) and checked against torch fp32: activations, average pooling, global pooling
feeding a 1x1 conv head, flatten + linear heads, standalone BatchNorm, squeeze-excitation variants,
strided residual blocks with projection shortcuts, and no-op views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttswap
from ttswap.backends.base import DeviceTensor
from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.numerics import round_bf16
from ttswap.config import DType, Fidelity, OpConfig, Pool2dSpec, ShardLayout
from ttswap.tuning.pricing import pool2d_cost
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

# Accurate numerics, so that what is checked is the pattern and the op, not LoFi's rounding.
EXACT = Recipe(name="exact", defaults=OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True))


def convert(model: nn.Module, hw: int = 16, channels: int = 8):
    model = model.eval()
    _randomize_norms(model)
    return ttswap.convert(model, EXACT, input_shape=(1, channels, hw, hw), backend="emulated", cache=False)


def _randomize_norms(model: nn.Module) -> None:
    """Trained-looking BatchNorm statistics, so that folding them is exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def check(converted, model: nn.Module, replacements: set[str], min_pcc: float = 0.999) -> None:
    x = torch.randn(converted.input_shape)
    with torch.no_grad():
        want = model(x)
    got = converted(x)
    assert got.shape == want.shape
    assert pcc(got, want) > min_pcc
    report = converted.report
    assert report.fallbacks == []
    assert (report.transfers.uploads, report.transfers.downloads) == (1, 1)
    assert replacements <= {r.replacement for r in report.records}


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


# -- activations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.SiLU(), nn.GELU(), nn.Hardswish(), nn.Hardsigmoid()])
def test_activation_fused_into_conv_and_after_add(act):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(conv_bn(8, 16), act)
            self.b = conv_bn(16, 16)
            self.act = act

        def forward(self, x):
            y = self.a(x)
            return self.act(y + self.b(y))

    model = Net()
    converted = convert(model)
    check(converted, model, {"conv", "add"})
    kind = {nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish",
            nn.Hardsigmoid: "hardsigmoid"}[type(act)]
    fused = [n for r in converted.report.records for n in r.notes if n.endswith(f"+{kind}")]
    assert len(fused) == 2  # into the first conv, and into the add


# -- average pooling ---------------------------------------------------------------------------------


def test_emulated_avg_pool2d_rounds_the_window_mean_like_mean_hw():
    backend = EmulatedBackend()
    # HiFi4: the pool reads the data through SrcA, so LoFi would also truncate it (docs/numerics.md)
    cfg = OpConfig(shard=ShardLayout.HEIGHT, fidelity=Fidelity.HIFI4)
    x = torch.randn(1, 32, 12, 12)
    t = backend.upload(x, cfg)
    xb = round_bf16(x)
    # 2x2: the scale 1/4 is exact, so the result is the exact mean rounded once
    y = backend.download(backend.avg_pool2d(t, Pool2dSpec((2, 2), (2, 2)), cfg, "pool"))
    assert torch.equal(y, round_bf16(F.avg_pool2d(xb, 2)))
    # 3x3 without padding in the divisor: each window's sum times bfloat16(1/count)
    spec = Pool2dSpec((3, 3), (1, 1), (1, 1))
    y = backend.download(backend.avg_pool2d(t, spec, cfg, "pool", count_include_pad=False))
    sums = F.conv2d(F.pad(xb, (1, 1, 1, 1)), torch.ones(32, 1, 3, 3), groups=32)
    counts = F.conv2d(F.pad(torch.ones(1, 1, 12, 12), (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))
    assert torch.equal(y, round_bf16(sums * round_bf16(1 / counts)))


@pytest.mark.parametrize("pool, hw", [
    (nn.AvgPool2d(2), 16),
    (nn.AvgPool2d(3, 1, 1, count_include_pad=False), 16),
    (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), 15),  # ResNet-D's shortcut pool
    (lambda x: F.avg_pool2d(x, 2, divisor_override=3), 16),
])
def test_avgpool_on_device(pool, hw):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(conv_bn(8, 32), nn.ReLU())
            self.pool = pool if isinstance(pool, nn.Module) else None

        def forward(self, x):
            x = self.conv(x)
            return self.pool(x) if self.pool is not None else pool(x)

    model = Net()
    check(convert(model, hw), model, {"avgpool"})


# -- heads -------------------------------------------------------------------------------------------


class ConvHead(nn.Module):
    """MobileNetV3 / GhostNet: global pool, 1x1 conv with bias, activation, flatten, dropout, linear."""

    def __init__(self, functional_linear: bool):
        super().__init__()
        self.features = nn.Sequential(conv_bn(8, 32, 2), nn.Hardswish())
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(32, 64, 1)
        self.act = nn.Hardswish()
        self.classifier = nn.Linear(64, 10)
        self.functional_linear = functional_linear

    def forward(self, x):
        x = self.act(self.conv_head(self.global_pool(self.features(x))))
        x = F.dropout(x.flatten(1), 0.2, training=self.training)
        if self.functional_linear:  # as timm's Linear traces: F.linear on the parameters
            return F.linear(x, self.classifier.weight, self.classifier.bias)
        return self.classifier(x)


@pytest.mark.parametrize("functional_linear", [False, True])
def test_pool_conv_head_flatten_linear(functional_linear):
    model = ConvHead(functional_linear)
    converted = convert(model)
    check(converted, model, {"global_pool", "conv", "linear"})


def test_flatten_of_a_1x1_conv_classifier_is_a_view():
    model = nn.Sequential(conv_bn(8, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 1), nn.Flatten())
    converted = convert(model)
    check(converted, model, {"global_pool", "flatten"})


# -- BatchNorm without a conv to fold into -----------------------------------------------------------


def test_standalone_batchnorm_pre_activation():
    class PreAct(nn.Module):
        """DenseNet / ResNetV2 style: the residual sum is normalised and activated before the conv."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(8, 16, 3, 1, 1)
            self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)
            self.norm = nn.BatchNorm2d(16)
            self.act = nn.ReLU()
            self.conv3 = nn.Conv2d(16, 16, 1)

        def forward(self, x):
            x = self.conv1(x)
            return self.conv3(self.act(self.norm(x + self.conv2(x))))

    model = PreAct()
    converted = convert(model)
    check(converted, model, {"batchnorm"})
    bn = next(r for r in converted.report.records if r.replacement == "batchnorm" and r.l1_bytes)
    assert "+relu" in bn.notes[0]  # the activation fused into the scale-and-shift


def test_timm_batchnorm_act_after_concat():
    timm_layers = pytest.importorskip("timm.layers")

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, 1, 1)
            self.norm = timm_layers.BatchNormAct2d(16)  # ReLU inside
            self.out = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.out(self.norm(torch.cat([x, self.conv(x)], 1)))

    model = Dense()
    check(convert(model), model, {"batchnorm", "concat"})


# -- squeeze-excitation ------------------------------------------------------------------------------


def test_timm_squeeze_excitation_modules():
    timm_layers = pytest.importorskip("timm.layers")
    from timm.models._efficientnet_blocks import SqueezeExcite

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(conv_bn(8, 32), nn.ReLU())
            self.se_resnet = timm_layers.SEModule(32, rd_ratio=1 / 4)  # x * x_se.sigmoid(), ReLU MLP
            self.se_mbconv = SqueezeExcite(32, rd_ratio=0.25, act_layer=nn.SiLU, gate_layer=nn.Hardsigmoid)

        def forward(self, x):
            return self.se_mbconv(self.se_resnet(self.a(x)))

    model = Net()
    converted = convert(model)
    check(converted, model, {"squeeze_excite"})
    notes = [r.notes[-1] for r in converted.report.records if r.replacement == "squeeze_excite" and r.l1_bytes]
    assert [n.split(" -> ")[-2] for n in notes] == ["sigmoid", "hardsigmoid"]


# -- residual blocks ---------------------------------------------------------------------------------


def test_timm_strided_basic_and_bottleneck_blocks_with_projection_shortcuts():
    resnet = pytest.importorskip("timm.models.resnet")

    def shortcut(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    model = nn.Sequential(
        resnet.BasicBlock(8, 16, stride=2, downsample=shortcut(8, 16)),
        resnet.Bottleneck(16, 8, stride=2, downsample=shortcut(16, 32)),  # 8 * expansion 4 = 32 out
    )
    converted = convert(model)
    check(converted, model, {"conv", "add"})
    strided = [r for r in converted.report.records if r.notes and r.notes[0].startswith(("conv 3x3/2", "conv 1x1/2"))]
    assert len(strided) == 4  # each block's strided conv and its projection


# -- views -------------------------------------------------------------------------------------------


def test_whole_tensor_slice_is_a_view_and_a_channel_slice_runs_on_device():
    class Ghost(nn.Module):
        def __init__(self, keep: int):
            super().__init__()
            self.primary = nn.Sequential(conv_bn(8, 8), nn.ReLU())
            self.cheap = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU())
            self.keep = keep

        def forward(self, x):
            x1 = self.primary(x)
            return torch.cat([x1, self.cheap(x1)], 1)[:, :self.keep]

    whole = Ghost(16)
    check(convert(whole), whole, {"slice"})
    part = Ghost(12)
    check(convert(part), part, {"channel_slice"})  # tests/test_patterns_cnn_families.py covers the rest


def test_pool_of_an_interleaved_input_runs_on_the_cores_of_its_output_rows():
    """The emulated backend and the cost model place an interleaved pool input alike (the
    ttnn_mock cases below pin the rule against ttnn): 27x27 pooled to 14x14 is 7 tiles of rows."""
    backend = EmulatedBackend()
    cfg = OpConfig(shard=ShardLayout.AUTO, deallocate=False)
    spec = Pool2dSpec((2, 2), (2, 2), ceil_mode=True)
    x = backend.upload(torch.randn(1, 64, 27, 27), cfg, "in")
    y = backend.max_pool2d(x, spec, cfg, "pool")
    assert (y.memory.layout, y.memory.num_cores, y.memory.shard_shape) == (ShardLayout.HEIGHT, 7, (32, 64))
    # sharding it reads the interleaved pages from all 64 banks
    assert {c.op: c.cores for c in pool2d_cost(x, spec, cfg)} == {"shard input": 64, "halo": 7, "max_pool2d": 7}


# -- ttnn in mock mode -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ttnn_backend():
    pytest.importorskip("ttnn", reason="ttnn is not installed (pip install 'ttswap[tt]')")
    from ttswap.backends.ttnn_backend import TtnnBackend

    backend = TtnnBackend()
    yield backend
    backend.close()


def pool_placement(backend, x: torch.Tensor, op: str, spec: Pool2dSpec, cfg: OpConfig, sharded: bool = False) -> tuple:
    """Where a pool of ``x`` (uploaded interleaved, or height-sharded first) leaves its output."""
    t: DeviceTensor = backend.upload(x, cfg, "in")
    if sharded:
        t = backend.to_memory(t, ShardLayout.HEIGHT, "in")
    if op == "max":
        y = backend.max_pool2d(t, spec, cfg, "pool")
    else:
        y = backend.avg_pool2d(t, spec, cfg, "pool", count_include_pad=False)
    return y.n, y.h, y.w, y.c, y.dtype, y.layout, y.memory


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("sharded", [True, False])
def test_ttnn_avg_pool2d_places_its_output_like_the_emulated_backend(ttnn_backend, sharded):
    cfg = OpConfig(shard=ShardLayout.AUTO, deallocate=False)
    spec = Pool2dSpec((2, 2), (2, 2), ceil_mode=True)
    x = torch.randn(1, 64, 27, 27)
    got = pool_placement(ttnn_backend, x, "avg", spec, cfg, sharded)
    assert got == pool_placement(EmulatedBackend(), x, "avg", spec, cfg, sharded)
    assert got[1:3] == (14, 14)


_AUTO, _H, _B, _W = ShardLayout.AUTO, ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH

# Interleaved pool inputs as measured against ttnn 0.81.1 in mock mode: (N, H=W, C, kernel, stride,
# padding, ceil_mode, cfg.shard, act dtype). ttnn shards them over the cores their output rows
# need; the comments give those, and in brackets the cores the input rows would have filled.
# bfloat8_b uploads tiled, bfloat16 row-major: both input layouts take the same path.
INTERLEAVED_POOLS = [
    pytest.param(1, 27, 64, 2, 2, 0, True, _AUTO, DType.BF16, id="27-2x2-ceil"),  # HEIGHT 7 (23)
    pytest.param(1, 27, 64, 2, 2, 0, False, _AUTO, DType.BF16, id="27-2x2-floor"),  # HEIGHT 6 (23)
    pytest.param(1, 27, 64, 3, 2, 0, True, _AUTO, DType.BFP8_B, id="27-3x3-ceil-bfp8"),  # HEIGHT 6 (23)
    pytest.param(2, 27, 64, 2, 2, 0, True, _AUTO, DType.BF16, id="2x27-2x2-ceil"),  # HEIGHT 13 (46)
    pytest.param(1, 28, 48, 2, 2, 0, False, _AUTO, DType.BF16, id="28-c48"),  # HEIGHT 7 (25), 64 wide
    pytest.param(1, 56, 128, 3, 2, 1, False, _AUTO, DType.BF16, id="56-3x3-pad"),  # HEIGHT 25 (49)
    pytest.param(1, 112, 64, 3, 2, 1, False, _AUTO, DType.BF16, id="112-3x3-pad"),  # HEIGHT 49 x 64 rows (56)
    pytest.param(1, 130, 64, 2, 2, 0, True, _AUTO, DType.BF16, id="130-2x2-ceil"),  # HEIGHT 45 x 96 rows (59)
    pytest.param(1, 27, 512, 2, 2, 0, True, _AUTO, DType.BF16, id="27-c512"),  # BLOCK 7 rows x 8 (8 x 8)
    pytest.param(1, 56, 512, 3, 2, 0, True, _AUTO, DType.BF16, id="56-c512"),  # BLOCK 7 rows of 4 tiles (8)
    pytest.param(1, 13, 1024, 2, 2, 0, True, _AUTO, DType.BF16, id="13-c1024"),  # BLOCK 2 rows x 8 (6 x 8)
    pytest.param(1, 13, 1024, 3, 2, 1, False, _AUTO, DType.BFP8_B, id="13-c1024-bfp8"),  # BLOCK 2 x 8 (6 x 8)
    pytest.param(1, 28, 160, 3, 2, 1, True, _AUTO, DType.BF16, id="28-c160"),  # BLOCK 8 rows x 5 (7 x 5)
    pytest.param(1, 27, 64, 2, 2, 0, True, _B, DType.BF16, id="27-block"),  # BLOCK 7 rows x 2 (8 x 2)
    pytest.param(1, 34, 320, 2, 2, 0, False, _B, DType.BF16, id="34-block"),  # BLOCK 5 rows x 5 (8 x 5)
    pytest.param(1, 13, 1024, 3, 2, 1, False, _H, DType.BF16, id="13-c1024-height"),  # HEIGHT 2 (6)
    pytest.param(1, 13, 512, 5, 1, 2, False, _AUTO, DType.BF16, id="13-5x5-s1"),  # BLOCK 6 x 8: out = in
    pytest.param(1, 7, 1024, 2, 2, 0, True, _AUTO, DType.BF16, id="7-c1024"),  # WIDTH 32, rows unsplit
    pytest.param(1, 14, 2080, 2, 2, 0, False, _AUTO, DType.BF16, id="14-c2080"),  # WIDTH 13 x 5 tiles
    pytest.param(1, 27, 64, 2, 2, 0, True, _W, DType.BF16, id="27-width"),  # WIDTH 2
]


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("op", ["max", "avg"])
@pytest.mark.parametrize("n, size, channels, kernel, stride, padding, ceil_mode, shard, dtype", INTERLEAVED_POOLS)
def test_ttnn_pools_shard_an_interleaved_input_like_the_emulated_backend(
    ttnn_backend, op, n, size, channels, kernel, stride, padding, ceil_mode, shard, dtype
):
    cfg = OpConfig(shard=shard, act_dtype=dtype, deallocate=False)
    spec = Pool2dSpec((kernel, kernel), (stride, stride), (padding, padding), ceil_mode=ceil_mode)
    x = torch.randn(n, channels, size, size)
    got = pool_placement(ttnn_backend, x, op, spec, cfg)
    assert got == pool_placement(EmulatedBackend(), x, op, spec, cfg)
    assert got[1:3] == spec.output_hw(size, size)
