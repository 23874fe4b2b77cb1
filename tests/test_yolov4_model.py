"""The torch YOLOv4 reference: structure and checkpoint keys against the TT-NN tech report's facts."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from ttswap.calibration import recalibrate_batchnorm
from ttswap.models.yolov4 import YOLOv4, conv_layers

# Every conv's input (H, C) at a 320 x 320 input, and its (stride, padding), as the TT-NN YOLOv4 tech
# report lists them (Conv(torch_model, path, [1, H, W, C], (stride, stride, pad, pad))).
_S1P0, _S1P1, _S2P1 = (1, 0), (1, 1), (2, 1)
REPORT_CONVS: dict[str, tuple[int, int, tuple[int, int]]] = {
    "down1.conv1": (320, 3, _S1P1), "down1.conv2": (320, 32, _S2P1), "down1.conv3": (160, 64, _S1P0),
    "down1.conv4": (160, 64, _S1P0), "down1.conv5": (160, 64, _S1P0), "down1.conv6": (160, 32, _S1P1),
    "down1.conv7": (160, 64, _S1P0), "down1.conv8": (160, 128, _S1P0),
    "neck.conv1": (10, 1024, _S1P0), "neck.conv2": (10, 512, _S1P1), "neck.conv3": (10, 1024, _S1P0),
    "neck.conv4": (10, 2048, _S1P0), "neck.conv5": (10, 512, _S1P1), "neck.conv6": (10, 1024, _S1P0),
    "neck.conv7": (10, 512, _S1P0), "neck.conv8": (20, 512, _S1P0), "neck.conv9": (20, 512, _S1P0),
    "neck.conv10": (20, 256, _S1P1), "neck.conv11": (20, 512, _S1P0), "neck.conv12": (20, 256, _S1P1),
    "neck.conv13": (20, 512, _S1P0), "neck.conv14": (20, 256, _S1P0), "neck.conv15": (40, 256, _S1P0),
    "neck.conv16": (40, 256, _S1P0), "neck.conv17": (40, 128, _S1P1), "neck.conv18": (40, 256, _S1P0),
    "neck.conv19": (40, 128, _S1P1), "neck.conv20": (40, 256, _S1P0),
    "head.conv1": (40, 128, _S1P1), "head.conv2": (40, 256, _S1P0), "head.conv3": (40, 128, _S2P1),
    "head.conv4": (20, 512, _S1P0), "head.conv5": (20, 256, _S1P1), "head.conv6": (20, 512, _S1P0),
    "head.conv7": (20, 256, _S1P1), "head.conv8": (20, 512, _S1P0), "head.conv9": (20, 256, _S1P1),
    "head.conv10": (20, 512, _S1P0), "head.conv11": (20, 256, _S2P1), "head.conv12": (10, 1024, _S1P0),
    "head.conv13": (10, 512, _S1P1), "head.conv14": (10, 1024, _S1P0), "head.conv15": (10, 512, _S1P1),
    "head.conv16": (10, 1024, _S1P0), "head.conv17": (10, 512, _S1P1), "head.conv18": (10, 1024, _S1P0),
}  # fmt: skip
# CSP stages 2-5: (input size, input channels, residual units); each lists conv1-5 and module_list.i.{0,1}
for _stage, (_size, _cin, _blocks) in {2: (160, 64, 2), 3: (80, 128, 8), 4: (40, 256, 8), 5: (20, 512, 4)}.items():
    _out, _half, _s = 2 * _cin, _cin, _size // 2
    REPORT_CONVS.update({
        f"down{_stage}.conv1": (_size, _cin, _S2P1), f"down{_stage}.conv2": (_s, _out, _S1P0),
        f"down{_stage}.conv3": (_s, _out, _S1P0), f"down{_stage}.conv4": (_s, _half, _S1P0),
        f"down{_stage}.conv5": (_s, _out, _S1P0),
    })  # fmt: skip
    for _i in range(_blocks):
        REPORT_CONVS[f"down{_stage}.resblock.module_list.{_i}.0"] = (_s, _half, _S1P0)
        REPORT_CONVS[f"down{_stage}.resblock.module_list.{_i}.1"] = (_s, _half, _S1P1)

UNFUSED_HEAD_CONVS = {"head.conv2", "head.conv10", "head.conv18"}  # the report's fused_op=False convs


@pytest.fixture(scope="module")
def model() -> YOLOv4:
    return YOLOv4().eval()


def test_conv_count_and_parameters(model):
    convs = conv_layers(model)
    assert len(REPORT_CONVS) == 110
    assert len(convs) == 110
    assert sorted(name for name, _ in convs) == sorted(REPORT_CONVS)
    assert {name for name, m in convs if m.conv[0].bias is not None} == UNFUSED_HEAD_CONVS
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 107
    assert sum(p.numel() for p in model.parameters()) == 64_363_101  # YOLOv4's published size


def test_checkpoint_keys(model):
    state = model.state_dict()
    assert len(state) == 107 * 6 + 3 * 2  # BN convs: weight + 5 BN tensors; head outputs: weight + bias
    for key in (
        "down1.conv1.conv.0.weight",
        "down1.conv1.conv.1.num_batches_tracked",
        "down2.resblock.module_list.0.0.conv.0.weight",
        "down5.resblock.module_list.3.1.conv.1.running_var",
        "neck.conv20.conv.1.running_mean",
        "head.conv18.conv.0.bias",
    ):
        assert key in state, key
    assert tuple(state["head.conv2.conv.0.weight"].shape) == (255, 256, 1, 1)
    assert "head.conv2.conv.1.weight" not in state


def test_every_conv_sees_the_reports_input(model):
    seen: dict[str, tuple[int, int, tuple[int, int]]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(
                name, (args[0].shape[2], args[0].shape[1], (mod.conv[0].stride[0], mod.conv[0].padding[0]))
            )
        )
        for name, m in conv_layers(model)
    ]
    try:
        with torch.no_grad():
            outputs = model(torch.rand(1, 3, 320, 320))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == REPORT_CONVS
    assert [tuple(o.shape) for o in outputs] == [(1, 255, 40, 40), (1, 255, 20, 20), (1, 255, 10, 10)]


def test_output_shapes_non_square_and_other_class_count():
    model = YOLOv4(num_classes=3).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]


def test_fx_traceable_and_equal(model):
    traced = torch.fx.symbolic_trace(model)
    ops = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.cat) == 5 + 1 + 2 + 2  # CSP joins, SPP, neck laterals, head joins
    assert ops.count(operator.add) == 1 + 2 + 8 + 8 + 4  # residual units per stage
    assert ops.count(torch.nn.functional.interpolate) == 2
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), traced(x)):
            assert torch.equal(a, b)


def test_recalibrate_batchnorm_measures_exact_statistics():
    model = YOLOv4().eval()
    batches = [torch.rand(2, 3, 64, 64), torch.rand(1, 3, 64, 64)]
    bn = model.down1.conv1.conv[1]
    momentum = bn.momentum
    recalibrate_batchnorm(model, batches)
    # the first conv sees the raw input, so its statistics can be computed independently
    conv = model.down1.conv1.conv[0]
    with torch.no_grad():
        per_batch = [conv(b).transpose(0, 1).flatten(1) for b in batches]
    mean = torch.stack([p.mean(1) for p in per_batch]).mean(0)  # cumulative average over batches
    var = torch.stack([p.var(1, unbiased=True) for p in per_batch]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == momentum and not bn.training
