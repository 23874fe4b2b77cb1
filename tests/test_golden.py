"""``backend="golden"``: the ttnn backend's code with every ttnn op computed by ttnn's CPU reference.

Every value is checked against torch fp32 (or exactly, where the op only moves bf16 values), never
against the emulated backend: golden is the independent check of the ttnn path. The bars are tight
enough that a transposed weight, a swapped concat order or a misplaced reshape fails them
(``test_the_bars_catch_a_wrong_ttnn_path`` breaks the path on purpose and checks that they do).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttswap
from ttswap.config import Activation, Conv2dSpec, DType, Fidelity, Layout, OpConfig, Pool2dSpec, ShardLayout
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

ttnn = pytest.importorskip("ttnn", reason="the golden backend needs ttnn (pip install 'ttswap[tt]')")

from ttswap.backends import BACKEND_NAMES, get_backend  # noqa: E402
from ttswap.backends.base import Backend  # noqa: E402
from ttswap.backends.golden import GoldenBackend, GoldenTtnn  # noqa: E402
from ttswap.backends.ttnn_backend import TtnnBackend, TtnnOpError  # noqa: E402

HEIGHT, BLOCK, WIDTH, INTERLEAVED = ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH, ShardLayout.INTERLEAVED
BF16 = OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True, deallocate=False)
# bf16 storage of inputs, weights and output: a few 2^-9 relative errors per value
BF16_PCC = 0.99995


@pytest.fixture(scope="module")
def golden() -> GoldenBackend:
    return GoldenBackend()


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def run_conv(backend, x, weight, bias, spec, cfg, activation=None):
    t = backend.upload(x, cfg, "input")
    prepared = backend.prepare_conv(weight, bias, spec, cfg, "conv")
    return backend.download(backend.conv2d(t, prepared, spec, cfg, "conv", activation))


# -- one code path ----------------------------------------------------------------------------------
def test_golden_backend_inherits_every_op_from_the_ttnn_backend():
    own = {name for name, member in vars(GoldenBackend).items()
           if callable(member) or isinstance(member, (property, staticmethod, classmethod))}
    assert own == {"__init__", "device"}, own  # no device to open; nothing else of its own
    ops = [name for name, member in vars(Backend).items() if getattr(member, "__isabstractmethod__", False)]
    helpers = [name for name, member in vars(TtnnBackend).items() if callable(member) and name.startswith("_")
               and name != "__init__"]
    assert {"conv2d", "concat", "add", "linear", "to_memory"} <= set(ops)
    assert {"_pool", "_activate", "_sharded_concat", "_as_dtype"} <= set(helpers)
    for name in ops + helpers:
        assert getattr(GoldenBackend, name) is getattr(TtnnBackend, name), name


def test_golden_namespace_refuses_ttnn_calls_it_has_no_reference_for():
    namespace = GoldenTtnn()
    assert namespace.TILE_LAYOUT is ttnn.TILE_LAYOUT and namespace.Conv2dConfig is ttnn.Conv2dConfig
    with pytest.raises(AttributeError, match="no CPU reference for ttnn.open_device"):
        namespace.open_device


def test_golden_namespace_has_every_ttnn_name_the_ttnn_backend_calls():
    import inspect
    import re

    import ttswap.backends.ttnn_backend as ttnn_backend

    called = set(re.findall(r"self\.ttnn\.(\w+)", inspect.getsource(ttnn_backend)))
    assert {"conv2d", "concat", "from_torch", "to_memory_config"} <= called
    namespace = GoldenTtnn()
    assert [name for name in sorted(called) if not hasattr(namespace, name)] == []


def test_selected_by_name(golden):
    assert "golden" in BACKEND_NAMES
    backend = get_backend("golden")
    assert isinstance(backend, GoldenBackend) and backend.name == "golden" and not backend.mock


# -- convolutions against torch fp32 -----------------------------------------------------------------
@pytest.mark.parametrize(
    "cin, cout, kernel, stride, groups, shard",
    [
        pytest.param(3, 32, 3, 1, 1, HEIGHT, id="stem-3x3"),
        pytest.param(32, 48, 3, 2, 1, BLOCK, id="stride2-block"),
        pytest.param(64, 64, 3, 1, 64, HEIGHT, id="depthwise"),
        pytest.param(32, 64, 3, 1, 4, HEIGHT, id="grouped"),
        pytest.param(48, 96, 1, 1, 1, WIDTH, id="1x1-width"),
        pytest.param(40, 24, (1, 3), 1, 1, HEIGHT, id="1x3-asymmetric"),
    ],
)
def test_conv2d_matches_torch(golden, cin, cout, kernel, stride, groups, shard):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (kernel[0] // 2, kernel[1] // 2)
    spec = Conv2dSpec(cin, cout, kernel, (stride, stride), padding, groups=groups)
    x, weight, bias = torch.randn(2, cin, 13, 11), torch.randn(cout, cin // groups, *kernel), torch.randn(cout)
    got = run_conv(golden, x, weight, bias, spec, BF16.replace(shard=shard))
    want = F.conv2d(x, weight, bias, (stride, stride), padding, groups=groups)
    assert got.shape == want.shape
    assert pcc(got, want) > BF16_PCC


@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "mish", "silu"])  # fused into conv2d, or run after it
def test_conv2d_activation(golden, kind):
    act = Activation(kind, 0.1 if kind == "leaky_relu" else None)
    spec = Conv2dSpec(16, 32, (3, 3), (1, 1), (1, 1))
    x, weight, bias = torch.randn(1, 16, 10, 10), torch.randn(32, 16, 3, 3), torch.randn(32)
    got = run_conv(golden, x, weight, bias, spec, BF16, act)
    y = F.conv2d(x, weight, bias, padding=1)
    want = {"relu": F.relu, "mish": F.mish, "silu": F.silu}.get(kind, lambda v: F.leaky_relu(v, 0.1))(y)
    assert pcc(got, want) > BF16_PCC


def test_conv2d_bfp8_weights_and_activations(golden):
    # bfloat8_b keeps 7 mantissa bits per value under a shared exponent: ~2^-8 relative per value
    cfg = BF16.replace(weight_dtype=DType.BFP8_B, act_dtype=DType.BFP8_B, shard=HEIGHT)
    spec = Conv2dSpec(32, 64, (3, 3), (1, 1), (1, 1))
    x, weight = torch.randn(1, 32, 12, 12), torch.randn(64, 32, 3, 3)
    got = run_conv(golden, x, weight, None, spec, cfg)
    assert 0.999 < pcc(got, F.conv2d(x, weight, padding=1)) < BF16_PCC


def test_conv_weights_are_prepared_once_and_reused(golden):
    spec = Conv2dSpec(8, 16, (3, 3), (1, 1), (1, 1))
    x, weight = torch.randn(1, 8, 8, 8), torch.randn(16, 8, 3, 3)
    prepared = golden.prepare_conv(weight, None, spec, BF16, "conv")
    first = golden.download(golden.conv2d(golden.upload(x, BF16), prepared, spec, BF16, "conv"))
    weights, bias = prepared.device_weights
    assert weights.shape == (1, 1, 9 * 8, 16) and bias is None  # ttnn's [kh*kw*C_in, C_out] matrix, on the device
    second = golden.download(golden.conv2d(golden.upload(x, BF16), prepared, spec, BF16, "conv"))
    assert torch.equal(first, second)


def test_a_freed_input_is_refused_as_on_ttnn(golden):
    spec = Conv2dSpec(8, 8, (1, 1))
    cfg = BF16.replace(deallocate=True)
    x = golden.upload(torch.randn(1, 8, 4, 4), cfg)
    golden.conv2d(x, golden.prepare_conv(torch.randn(8, 8, 1, 1), None, spec, cfg, "a"), spec, cfg, "a")
    with pytest.raises(TtnnOpError, match="already freed"):
        golden.conv2d(x, golden.prepare_conv(torch.randn(8, 8, 1, 1), None, spec, cfg, "b"), spec, cfg, "b")


def test_conv2d_with_four_sided_padding(golden):
    spec = Conv2dSpec(8, 16, (3, 3), (2, 2), (0, 0))
    x, weight = torch.randn(1, 8, 11, 12), torch.randn(16, 8, 3, 3)
    prepared = golden.prepare_conv(weight, None, spec, BF16, "conv")
    got = golden.download(golden.conv2d_padded(golden.upload(x, BF16), prepared, spec, (0, 1, 1, 0), BF16, "conv"))
    want = F.conv2d(F.pad(x, (1, 0, 0, 1)), weight, stride=2)  # TensorFlow's "same": the extra row below
    assert got.shape == want.shape and pcc(got, want) > BF16_PCC


def test_layer_norm_over_channels(golden):
    x, weight, bias = torch.randn(1, 48, 5, 5) * 3 + 1, torch.rand(48) + 0.5, torch.randn(48)
    prepared = golden.prepare_layer_norm(weight, bias, BF16, "norm")
    got = golden.download(golden.layer_norm(golden.upload(x, BF16), prepared, 1e-6, BF16, "norm"))
    want = F.layer_norm(x.permute(0, 2, 3, 1), (48,), weight, bias, 1e-6).permute(0, 3, 1, 2)
    assert pcc(got, want) > BF16_PCC


# -- ops that only move bf16 values: exact -----------------------------------------------------------
@pytest.mark.parametrize("start, stop, shard", [(32, 64, HEIGHT), (8, 40, HEIGHT), (16, 48, BLOCK)])
def test_slice_channels_is_exact(golden, start, stop, shard):
    x = bf16(torch.randn(1, 96, 8, 8))
    t = golden.to_memory(golden.to_layout(golden.upload(x, BF16), Layout.TILE, "in"), shard, "in")
    got = golden.download(golden.slice_channels(t, start, stop, BF16, "slice"))
    assert torch.equal(got, x[:, start:stop])


@pytest.mark.parametrize("shard", [HEIGHT, BLOCK, INTERLEAVED])
def test_max_pool2d_is_exact(golden, shard):
    x = bf16(torch.randn(2, 32, 13, 13))
    spec = Pool2dSpec((3, 3), (2, 2), (1, 1), ceil_mode=True)
    got = golden.download(golden.max_pool2d(golden.upload(x, BF16), spec, BF16.replace(shard=shard), "pool"))
    assert torch.equal(got, F.max_pool2d(x, 3, 2, 1, ceil_mode=True))


def test_avg_pool2d(golden):
    x = torch.randn(1, 16, 9, 9)
    spec = Pool2dSpec((3, 3), (2, 2), (1, 1))
    got = golden.download(golden.avg_pool2d(golden.upload(x, BF16), spec, BF16, "pool", count_include_pad=False))
    assert pcc(got, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)) > BF16_PCC


@pytest.mark.parametrize("n", [1, 2])
def test_upsample_nearest_is_exact(golden, n):
    x = bf16(torch.randn(n, 24, 5, 7))
    got = golden.download(golden.upsample_nearest(golden.upload(x, BF16), 2, BF16.replace(shard=HEIGHT), "up"))
    assert torch.equal(got, F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize(
    "channels, shard",
    [((64, 32), HEIGHT), ((48, 40, 8), HEIGHT), ((64, 64), BLOCK), ((24, 40), INTERLEAVED)],
)
def test_concat_is_exact_and_in_order(golden, channels, shard):
    cfg = BF16.replace(shard=shard)
    parts = [bf16(torch.randn(1, c, 16, 16)) for c in channels]
    # each part sharded as cfg says, as the ops that produce them in a model would leave them
    tensors = [golden.to_memory(golden.to_layout(golden.upload(p, cfg), Layout.TILE, "in"), shard, "in") for p in parts]
    got = golden.download(golden.concat(tensors, cfg, "cat"))
    assert torch.equal(got, torch.cat(parts, 1))


def test_concat_in_bfp8_requantizes_across_the_seams(golden):
    cfg = BF16.replace(act_dtype=DType.BFP8_B, shard=HEIGHT)
    parts = [torch.randn(1, 24, 8, 8) * 100, torch.randn(1, 40, 8, 8)]
    out = golden.concat([golden.upload(p, cfg) for p in parts], cfg, "cat")
    assert out.dtype is DType.BFP8_B
    want = torch.cat([ttnn_bfp8(p) for p in parts], 1)
    assert pcc(golden.download(out), want) > 0.999


def ttnn_bfp8(x: torch.Tensor) -> torch.Tensor:
    """ttnn's own host bfloat8_b round trip of an NCHW tensor, blocked along channels as on the device."""
    rows = x.permute(0, 2, 3, 1).reshape(1, 1, -1, x.shape[1])
    back = ttnn.to_torch(ttnn.from_torch(rows, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
    return back.reshape(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)


def test_bfp8_upload_is_ttnns_host_conversion(golden):
    x = torch.randn(1, 48, 6, 6) * torch.logspace(-3, 3, 48).view(1, 48, 1, 1)
    got = golden.download(golden.upload(x, OpConfig(act_dtype=DType.BFP8_B)))
    assert torch.equal(got, ttnn_bfp8(x))


# -- elementwise, reductions, linear -----------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, Activation("relu"), Activation("leaky_relu", 0.1), Activation("mish")])
def test_add(golden, activation):
    a, b = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    cfg = BF16.replace(shard=HEIGHT)
    got = golden.download(golden.add(golden.upload(a, cfg), golden.upload(b, cfg), cfg, "add", activation))
    want = a + b
    if activation is not None:
        want = {"relu": F.relu, "mish": F.mish}.get(activation.kind, lambda v: F.leaky_relu(v, 0.1))(want)
    assert pcc(got, want) > BF16_PCC


@pytest.mark.parametrize("n", [1, 2])
def test_multiply_broadcasts_a_per_image_channel_scale(golden, n):
    a, scale = torch.randn(n, 32, 6, 6), torch.rand(n, 32, 1, 1)
    got = golden.download(golden.multiply(golden.upload(a, BF16), golden.upload(scale, BF16), BF16, "se"))
    assert pcc(got, a * scale) > BF16_PCC


@pytest.mark.parametrize("kind", Activation.KINDS)
def test_activation(golden, kind):
    act = Activation(kind, 0.1 if kind == "leaky_relu" else None)
    x = torch.randn(1, 16, 6, 6) * 4
    torch_op = {"relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda v: F.leaky_relu(v, 0.1), "mish": F.mish,
                "silu": F.silu, "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid, "hardswish": F.hardswish,
                "gelu": F.gelu}[kind]
    got = golden.download(golden.activation(golden.upload(x, BF16), act, BF16, "act"))
    assert pcc(got, torch_op(x)) > BF16_PCC


@pytest.mark.parametrize("n", [1, 2])
def test_mean_hw_and_linear(golden, n):
    x, weight, bias = torch.randn(n, 64, 7, 7) + torch.randn(n, 64, 1, 1), torch.randn(10, 64), torch.randn(10)
    pooled = golden.mean_hw(golden.upload(x, BF16), BF16, "pool")
    assert pcc(golden.download(pooled), x.mean((2, 3), keepdim=True)) > BF16_PCC
    out = golden.download(golden.linear(pooled, golden.prepare_linear(weight, bias, BF16, "fc"), BF16, "fc"))
    assert pcc(out.reshape(n, 10), F.linear(x.mean((2, 3)), weight, bias)) > BF16_PCC


# -- a small network of every kind of layer, converted -----------------------------------------------
def conv_bn_act(cin: int, cout: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act or nn.ReLU())


class SmallNet(nn.Module):
    """Stem, separable conv, concat, SPP-style max pools, strided conv, upsample, residual add,
    squeeze-excitation, pooled linear head."""

    def __init__(self):
        super().__init__()
        from timm.layers import SEModule

        self.stem = conv_bn_act(3, 32, stride=2)
        self.dw = conv_bn_act(32, 32, groups=32)
        self.pw = nn.Sequential(nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48), nn.LeakyReLU(0.1))
        self.down = conv_bn_act(80, 64, stride=2, act=nn.Mish())
        self.reduce = nn.Sequential(nn.Conv2d(64 * 3, 80, 1), nn.BatchNorm2d(80), nn.LeakyReLU(0.1))
        self.se = SEModule(80, rd_ratio=0.25)
        self.fc = nn.Linear(80, 10)

    def forward(self, x):
        a = self.stem(x)
        b = self.pw(self.dw(a))
        c = torch.cat([a, b], 1)  # 32 + 48 channels
        d = self.down(c)
        spp = torch.cat([d, F.max_pool2d(d, 5, 1, 2), F.max_pool2d(d, 9, 1, 4)], 1)
        e = self.se(F.interpolate(self.reduce(spp), scale_factor=2) + c)
        return e, self.fc(e.mean((2, 3)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet().eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # trained-looking statistics, so that BN folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


BF16_RECIPE = Recipe(name="bf16", defaults=OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True))


def small_net_pccs(backend: str = "golden") -> list[float]:
    model = small_net()
    converted = ttswap.convert(model, BF16_RECIPE, input_shape=(1, 3, 32, 32), backend=backend, cache=False)
    assert converted.report.fallbacks == []
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    return [pcc(g, w) for g, w in zip(converted(x), want)]


def test_small_network_on_golden_matches_torch():
    assert min(small_net_pccs()) > 0.9999


def test_golden_reports_what_the_emulated_backend_models_for_every_op():
    """Shape, dtype, layout and placement of every op agree with the emulated backend's (which
    tests/test_mock_models.py holds to ttnn's), so the ttnn backend's placement logic took the same
    branches it takes on ttnn."""
    from ttswap.crosscheck import crosscheck

    result = crosscheck(small_net(), BF16_RECIPE, (1, 3, 32, 32), reference="emulated", checked="golden")
    assert result.ok, result.summary()
    assert {"conv2d", "concat", "max_pool2d", "upsample_nearest", "add", "multiply", "linear"} <= {
        check.op for check in result.checks}


def _transposed_weights(original):
    def prepare_conv(self, weight, bias, spec, cfg, layer):
        return original(self, weight.transpose(2, 3) if spec.kernel[0] == spec.kernel[1] else weight, bias, spec,
                        cfg, layer)
    return prepare_conv


def _reversed_concat(original):
    def concat(self, xs, cfg, layer):
        return original(self, list(xs)[::-1], cfg, layer)
    return concat


def _images_flattened_column_first(original):
    def upload(self, x, cfg, layer="input"):
        return original(self, x.transpose(2, 3), cfg, layer)  # square images: the shape cannot tell
    return upload


@pytest.mark.parametrize("method, mutation", [("prepare_conv", _transposed_weights), ("concat", _reversed_concat),
                                              ("upload", _images_flattened_column_first)])
def test_the_bars_catch_a_wrong_ttnn_path(monkeypatch, method, mutation):
    """Break the ttnn backend's code path the way a bug would: the golden check must fail."""
    monkeypatch.setattr(TtnnBackend, method, mutation(getattr(TtnnBackend, method)))
    try:
        pccs = small_net_pccs()
    except (ValueError, RuntimeError):
        return  # a shape error: caught as well
    assert min(pccs) < 0.9
