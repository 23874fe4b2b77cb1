"""``converted.pipeline(trace=True, command_queues=2)``: the full-speed runner.

Default tier (emulated backend): the pipeline gives exactly the plain forward's values, for one batch
and for an iterable of batches, with host work before and after the device part; a torch op between
device layers is refused, naming it. ``ttnn_mock`` tier: the pipeline runs both shipped models on ttnn
(persistent buffers, no trace: mock mode cannot capture one), and ttnn's graph capture of one forward
shows it could be traced. ``device`` tier: the trace itself, with two command queues.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ttswap
from ttswap.backends import tenstorrent_device_present
from ttswap.config import DType, Fidelity, OpConfig
from ttswap.metrics import pcc
from ttswap.pipeline import PipelineError, split_stages
from ttswap.recipe import Recipe

EXACT = Recipe(name="exact", defaults=OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True))


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TwoHeads(nn.Module):
    """Host work before the device (a scale), two device outputs, host work after them (a softmax)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16, 2)
        self.a = conv_bn_relu(16, 32)
        self.b = conv_bn_relu(16, 32, 2)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        scaled = x * 0.5
        y = self.stem(scaled)
        a = self.pool(self.a(y))
        b = self.b(y)
        # the host reads the scaled input again after the device part
        return F.softmax(torch.cat([a, b], dim=1).flatten(1), dim=1) + scaled.mean(), a


class FallbackInTheMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = conv_bn_relu(3, 16)
        self.second = conv_bn_relu(16, 16)

    def forward(self, x):
        return self.second(torch.flip(self.first(x), dims=[3]))


def _randomize_norms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def two_heads():
    torch.manual_seed(0)
    model = _randomize_norms(TwoHeads())
    return model, ttswap.convert(model, EXACT, input_shape=(1, 3, 32, 32), backend="emulated", cache=False)


def test_pipeline_gives_the_plain_forwards_values(two_heads):
    model, converted = two_heads
    batches = [torch.randn(1, 3, 32, 32) for _ in range(3)]
    plain = [converted(x) for x in batches]
    pipe = converted.pipeline(trace=True, command_queues=2)
    assert (pipe.traced, pipe.command_queues) == (False, 1)  # emulated: no trace, values testable
    one = pipe(batches[0])
    many = pipe(batches)  # an iterable of batches: a list of outputs
    streamed = list(pipe.stream(iter(batches)))
    assert len(many) == len(streamed) == 3
    for want, got_many, got_streamed in zip(plain, many, streamed):
        for w, g1, g2 in zip(want, got_many, got_streamed):
            assert torch.equal(w, g1) and torch.equal(w, g2)
    assert all(torch.equal(w, g) for w, g in zip(plain[0], one))
    # and those values are the model's: torch fp32 on the same inputs
    with torch.no_grad():
        reference = model(batches[1])
    assert pcc(many[1][1], reference[1]) > 0.999 and pcc(many[1][0], reference[0]) > 0.999


def test_pipeline_splits_host_and_device_work(two_heads):
    _, converted = two_heads
    stages = split_stages(converted.graph_module)
    assert len(stages.uploads) == 1 and len(stages.downloads) == 2
    # x * 0.5 and its mean stay on the host, before the device part
    assert [n.op for n in stages.head] == ["placeholder", "call_function", "call_method"]
    assert F.softmax in {n.target for n in stages.tail}  # softmax stays on the host, after the downloads
    assert len(stages.device) == 5  # stem, a, pool, b and the concat
    counter = converted.transfer_counter
    counter.reset()
    converted.pipeline()([torch.randn(1, 3, 32, 32) for _ in range(4)])
    assert (counter.uploads, counter.downloads) == (4, 8)


def test_a_torch_op_between_device_layers_cannot_be_traced():
    model = _randomize_norms(FallbackInTheMiddle())
    converted = ttswap.convert(model, EXACT, input_shape=(1, 3, 16, 16), backend="emulated", cache=False)
    assert converted.report.fallbacks  # flip stays in torch
    with pytest.raises(PipelineError, match=r"torch op 'flip'.*output of device layer 'first'.*device layer 'second'"):
        converted.pipeline()


def test_pipeline_refuses_bad_arguments(two_heads):
    _, converted = two_heads
    with pytest.raises(ValueError, match="command_queues must be 1 or 2"):
        converted.pipeline(command_queues=3)
    with pytest.raises(ValueError, match=r"converted for input shape \[1, 3, 32, 32\]"):
        converted.pipeline()(torch.randn(1, 3, 64, 64))


# -- ttnn: mock mode and device ----------------------------------------------------------------------
MODELS = [("ese_vovnet19b_dw", "ese_vovnet", 224), ("yolov4", "yolov4", 320)]


def _model(name: str) -> nn.Module:
    from ttswap.models.yolov4 import YOLOv4

    torch.manual_seed(0)
    return (YOLOv4() if name == "yolov4" else timm.create_model(name, pretrained=False)).eval()


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("name,recipe,size", MODELS, ids=[m[0] for m in MODELS])
def test_pipeline_runs_on_ttnn_mock_and_could_be_traced(name, recipe, size):
    pytest.importorskip("ttnn")
    if tenstorrent_device_present():
        pytest.skip("a Tenstorrent device is present: test_trace_on_device covers it")
    from ttswap.pipeline import trace_safety

    converted = ttswap.convert(_model(name), recipe, input_shape=(1, 3, size, size), backend="ttnn")
    pipe = converted.pipeline(trace=True, command_queues=2)
    outputs = pipe([torch.rand(1, 3, size, size) for _ in range(2)])
    assert (pipe.traced, pipe.command_queues) == (False, 1)  # mock mode: no trace, no events
    plain = converted(torch.rand(1, 3, size, size))
    plain = plain if isinstance(plain, tuple) else (plain,)
    got = outputs[1] if isinstance(outputs[1], tuple) else (outputs[1],)
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in plain]

    safety = trace_safety(pipe, torch.rand(1, 3, size, size))
    assert safety.ok, safety.summary()
    assert safety.programs > 20  # the forward really ran under the capture
    assert safety.outputs == len(pipe.stages.device_outputs)


@pytest.mark.ttnn_mock
def test_trace_safety_finds_a_host_read_inside_a_layer(two_heads, monkeypatch):
    """A layer that reads its input back to the host and uploads it again cannot be traced: the graph
    capture names it."""
    pytest.importorskip("ttnn")
    if tenstorrent_device_present():
        pytest.skip("a Tenstorrent device is present")
    from ttswap.pipeline import trace_safety

    model, _ = two_heads
    converted = ttswap.convert(model, EXACT, input_shape=(1, 3, 32, 32), backend="ttnn", cache=False)
    pipe = converted.pipeline()
    x = torch.rand(1, 3, 32, 32)
    assert trace_safety(pipe, x).ok
    layer = converted.device_layers()["b"]
    forward, backend = layer.forward, converted.backend
    monkeypatch.setattr(layer, "forward", lambda t: forward(backend.upload(backend.download(t), layer.cfg)))
    safety = trace_safety(pipe, x)
    assert not safety.ok
    assert {name for name, _ in safety.host_transfers} == {"b"}
    assert "b: host transfer" in safety.summary()


@pytest.mark.device
def test_trace_on_device():
    """On hardware: the traced, two-queue pipeline gives the plain forward's values."""
    converted = ttswap.convert(_model("ese_vovnet19b_dw"), "ese_vovnet", input_shape=(1, 3, 224, 224), backend="ttnn")
    pipe = converted.pipeline(trace=True, command_queues=2)
    assert (pipe.traced, pipe.command_queues) == (True, 2)
    batches = [torch.rand(1, 3, 224, 224) for _ in range(4)]
    plain = [converted(x) for x in batches]
    for want, got in zip(plain, pipe(batches)):
        assert pcc(got, want) > 0.999
    pipe.close()


# -- the end-to-end FPS model (ttswap.tuning.e2e), against sums worked out by hand ------------------
def test_end_to_end_model_by_hand():
    from ttswap.tuning import N150
    from ttswap.tuning.e2e import BOARDS, Deployment, Profile, fps, frame_seconds

    dep = Deployment(device=N150, trace_op_gap_s=5e-6, host_frame_s=1e-3, host_bytes_per_s=1e9, pcie_bytes_per_s=1e9,
                     remote_transfer_factor=0.5, remote_sync_s=2e-3)
    profile = Profile(kernel_s=4e-3, ops=200, input_bytes=1_000_000, output_bytes=500_000)  # 1 ms up, 0.5 ms down
    n150, n300, t3k = BOARDS["n150"], BOARDS["n300"], BOARDS["t3k"]
    # plain: host (1 ms frame + 1 ms conversion) + max(4 + 200 x 5 us = 5 ms device, 200 x 15 us = 3 ms
    # dispatch) + 1 up + 0.5 down
    assert frame_seconds(profile, n150, "plain", dep) == pytest.approx(8.5e-3)
    assert frame_seconds(dataclasses.replace(profile, ops=1000), n150, "plain", dep) == pytest.approx(
        2e-3 + 15e-3 + 1.5e-3)  # dispatch-bound: 1000 x 15 us
    # trace: device 4 + 200 x 5 us = 5 ms; pipeline: max(5 + 0.5 download, 2 host, 1 upload)
    assert frame_seconds(profile, n150, "trace+2CQ", dep) == pytest.approx(5.5e-3)
    # serial (tt-metal's YOLOv4 test): inputs converted before the clock, so host is the 1 ms frame only
    assert frame_seconds(profile, n150, "trace+2CQ", dep, "serial") == pytest.approx(1e-3 + 1e-3 + 5e-3 + 0.5e-3)
    assert frame_seconds(profile, n150, "trace+2CQ", dep, "no_readback") == pytest.approx(5e-3)
    # n300: two images per step; the second chip's transfers cost 1 + 0.5 more, its sync 2 ms
    # serial: host 2 + upload 2.5 + device 5 + download 1.25 + sync 2
    assert frame_seconds(profile, n300, "trace+2CQ", dep, "serial") == pytest.approx(12.75e-3)
    assert fps(profile, n300, "trace+2CQ", dep, "serial") == pytest.approx(2 / 12.75e-3)
    # T3K: four n300 boards, each with its own PCIe link: per link as on an n300; host work for 8 images
    assert frame_seconds(profile, t3k, "trace+2CQ", dep) == pytest.approx(max(5e-3 + 1.25e-3, 16e-3 + 2e-3, 2.5e-3))
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        frame_seconds(profile, n150, "fast", dep)
