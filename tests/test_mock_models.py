"""The converted models through the real ttnn library: mock mode here (ops validated and dispatched,
L1 really allocated, nothing computed), hardware in the ``device`` tier.

* ESE-VoVNet-19b-dw at 224 and YOLOv4 at 320 run in lockstep on the emulated backend and on ttnn
  (``ttswap.crosscheck``): every op's output shape, dtype, layout and placement must be the same on
  both, and neither may raise.
* ESE-VoVNet-39b at 224 and YOLOv4 at 640 run on ttnn alone, under the memory report's per-layer
  graph capture (``ttswap.memory_report``): every layer must dispatch, and the allocations ttnn
  reports are checked against sizes worked out by hand.
* An oversized ``act_block_h`` must be refused by the emulated L1 estimate and by ttnn alike.

Each test runs once per target: ``mock`` (tier ``ttnn_mock``, skipped when a device is present, as
the ``device`` variant then covers it) and ``device`` (tier ``device``, skipped without hardware).
On hardware the lockstep runs also compare the values the device computes with the emulated ones.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import ttswap
from ttswap.backends import tenstorrent_device_present
from ttswap.backends.base import L1_ALLOCATABLE_BYTES, L1BudgetError
from ttswap.calibration import recalibrate_batchnorm, sample_batch
from ttswap.config import Conv2dSpec, Layout, OpConfig, ShardLayout
from ttswap.converter import ConversionError
from ttswap.crosscheck import CrossCheckError, LockstepBackend, crosscheck
from ttswap.metrics import pcc
from ttswap.models.yolov4 import YOLOv4
from ttswap.recipe import Recipe

TARGETS = [pytest.param("mock", marks=pytest.mark.ttnn_mock), pytest.param("device", marks=pytest.mark.device)]


def ttnn_backend(target: str):
    """The ttnn backend for ``target``: mock mode is only possible where no device is present."""
    pytest.importorskip("ttnn", reason="ttnn is not installed (pip install 'ttswap[tt]')")
    if target == "mock" and tenstorrent_device_present():
        pytest.skip("a Tenstorrent device is present: the `device` variant of this test runs instead")
    from ttswap.backends.ttnn_backend import TtnnBackend

    backend = TtnnBackend()
    assert backend.mock == (target == "mock")
    return backend


def make_model(name: str, size: int, target: str) -> nn.Module:
    """The model with seeded random weights; on a device, with BatchNorm recalibrated on sample
    images so that the values compared there are those of a realistic network."""
    torch.manual_seed(0)
    model = (YOLOv4() if name == "yolov4" else timm.create_model(name, pretrained=False)).eval()
    if target == "device":
        recalibrate_batchnorm(model, sample_batch((size, size), crops=2))
    return model


RECIPES = {"ese_vovnet19b_dw": "ese_vovnet", "ese_vovnet39b": "ese_vovnet", "yolov4": "yolov4"}


# -- lockstep: emulated and ttnn op by op ------------------------------------------------------------
@pytest.fixture(scope="module", params=[("ese_vovnet19b_dw", 224), ("yolov4", 320)], ids=lambda p: f"{p[0]}-{p[1]}")
def lockstep_model(request):
    return request.param


@pytest.fixture(scope="module", params=TARGETS)
def lockstep_run(request, lockstep_model):
    name, size = lockstep_model
    checked = ttnn_backend(request.param)
    model = make_model(name, size, request.param)
    inputs = sample_batch((size, size))[:1] if request.param == "device" else None
    return request.param, crosscheck(model, RECIPES[name], (1, 3, size, size), checked=checked, inputs=inputs)


def test_every_op_runs_on_ttnn_as_on_the_emulated_backend(lockstep_run):
    _, result = lockstep_run
    assert result.ok, result.summary()  # each op that differs or failed, with its layer and recipe rules
    assert result.report.fallbacks == []
    ops = {check.op for check in result.checks}
    assert {"upload", "conv2d", "concat"} <= ops
    # every device layer of the report ran: as one op or as several (a separable conv is two)
    ran = {check.layer for check in result.checks}
    assert all(any(op == layer or op.startswith(layer + ".") for op in ran) for layer in result.report.layers)


def test_device_values_match_the_emulated_backend(lockstep_run):
    target, result = lockstep_run
    if target == "mock":
        pytest.skip("mock mode computes nothing: values are compared on a device only")
    assert len(result.downloads) == result.report.transfers.downloads
    for layer, (emulated, device) in result.downloads.items():
        assert pcc(emulated, device) > 0.99, layer


def test_a_failing_layer_is_named_with_the_rule_that_configured_it():
    # Width-sharded, this conv computes all 25 tile-rows of its output on every core, which ttnn
    # splits into act_block_h blocks: 4 tile-rows do not divide 25, and ttnn refuses the op. The
    # conversion cannot see it (the emulated backend does not model that validation): the run must.
    layer = "stages.1.blocks.0.conv_reduction"
    recipe = Recipe.load("ese_vovnet").override(layer, shard="width", act_block_h=128)
    result = crosscheck(make_model("ese_vovnet19b_dw", 224, "mock"), recipe, (1, 3, 224, 224),
                        checked=ttnn_backend("mock"))
    assert result.error is not None
    check = result.error.check
    assert check.layer == layer and check.reference_error is None
    assert "should be divisible by act_block_h_ntiles" in str(check.checked_error)
    assert check.rules[-1] == f"override({layer!r})"
    assert f"layer {layer!r}" in str(result.error) and f"override({layer!r})" in str(result.error)


# -- oversized overrides ---------------------------------------------------------------------------
# YOLOv4's down1.conv2 at 320: 3x3 stride 2, 32 -> 64 channels, on the 320 x 320 output of down1.conv1.
DOWN1_CONV2 = Conv2dSpec(32, 64, (3, 3), (2, 2), (1, 1))
# 25,600 output rows in blocks of 12,800: two cores, each holding a 12,800-row im2col block
OVERSIZED = Recipe.load("yolov4").override("down1.conv2*", act_block_h=12_800)


@pytest.mark.parametrize("target", TARGETS)
def test_oversized_act_block_h_is_refused_by_the_estimate_and_by_ttnn(target):
    from ttswap.backends.emulated import EmulatedBackend

    resolved = OVERSIZED.resolve("down1.conv2.conv", "conv", 160 * 160, 64, (320, 320))
    assert resolved.rules[-1] == "override('down1.conv2*')" and resolved.config.act_block_h == 12_800
    lock = LockstepBackend(EmulatedBackend(), ttnn_backend(target))
    x = lock.upload(torch.zeros(1, 32, 320, 320), OpConfig(), "down1.conv1.conv")
    x = lock.to_memory(lock.to_layout(x, Layout.TILE, "down1.conv1.conv"), ShardLayout.HEIGHT, "down1.conv1.conv")
    weights = lock.prepare_conv(torch.randn(64, 32, 3, 3), None, DOWN1_CONV2, resolved.config, "down1.conv2.conv")
    shipped = resolved.config.replace(act_block_h=None, deallocate=False)
    lock.conv2d(x, weights, DOWN1_CONV2, shipped, "down1.conv2.conv")  # the shipped recipe's config runs
    with pytest.raises(CrossCheckError) as raised:
        lock.conv2d(x, weights, DOWN1_CONV2, resolved.config, "down1.conv2.conv")
    check = raised.value.check
    assert isinstance(check.reference_error, L1BudgetError) and isinstance(check.checked_error, L1BudgetError)
    assert check.reference_error.layer == check.checked_error.layer == "down1.conv2.conv"
    assert check.reference_error.needed > L1_ALLOCATABLE_BYTES
    assert check.checked_error.needed > check.checked_error.available


def test_oversized_recipe_override_is_refused_at_conversion_naming_layer_and_rule():
    # stem.0 of ESE-VoVNet-19b-dw: 12,544 output rows; one im2col block of all of them on one core
    recipe = Recipe.load("ese_vovnet").override("stem.0", act_block_h=12_544)
    with pytest.raises(ConversionError, match=r"stem\.0: .*override\('stem\.0'\)"):
        ttswap.convert(make_model("ese_vovnet19b_dw", 224, "mock"), recipe, backend="emulated")


# -- ttnn alone, under the memory report --------------------------------------------------------------
@pytest.fixture(scope="module", params=TARGETS)
def memory_reports(request):
    from ttswap.memory_report import memory_report

    backend = ttnn_backend(request.param)
    reports = {}
    for name, size in (("ese_vovnet39b", 224), ("yolov4", 640)):
        converted = ttswap.convert(make_model(name, size, request.param), RECIPES[name],
                                   input_shape=(1, 3, size, size), backend=backend)
        reports[name, size] = converted, memory_report(converted)
    return reports


@pytest.mark.parametrize("name, size", [("ese_vovnet39b", 224), ("yolov4", 640)])
def test_every_layer_dispatches_and_fits(memory_reports, name, size):
    converted, report = memory_reports[name, size]
    assert report.failed == [], report.summary()
    called = [n for n in converted.graph_module.graph.nodes if n.op == "call_module"]
    assert [m.layer for m in report.layers] == [
        getattr(converted.graph_module.get_submodule(n.target), "layer", None)
        or converted.graph_module.get_submodule(n.target).name for n in called]
    assert report.l1_bank_bytes == L1_ALLOCATABLE_BYTES
    assert all(0 < m.peak_per_core <= report.l1_bank_bytes for m in report.layers)


def test_memory_report_matches_sizes_worked_out_by_hand(memory_reports):
    _, report = memory_reports["yolov4", 640]
    layers = {m.layer: m for m in report.layers}
    upload, conv1, conv2 = report.layers[0], layers["down1.conv1.conv"], layers["down1.conv2.conv"]
    # the input, row-major bf16 L1-interleaved: 640*640 pixels of 3 channels (6 B, padded to 16 B)
    # over 64 banks
    assert upload.kind == "upload" and upload.resident_l1_per_core == 0
    assert upload.l1_allocated_per_core == 640 * 640 // 64 * 16
    assert conv1.resident_l1_per_core == 640 * 640 // 64 * 16
    # conv1 frees its input and leaves its output: 409,600 rows of 32 channels height-sharded over
    # 64 cores, 200 bf16 tiles of 2 KiB each per core
    assert conv2.resident_l1_per_core == 640 * 640 // 64 // 32 * 2048
    assert conv1.l1_allocated_per_core >= conv2.resident_l1_per_core  # the output, and its halo input
    assert conv1.peak_cb_per_core > 0  # an im2col conv: the capture records its circular buffers
    # the 640 recipe's act_block_h for down1.conv6 keeps it below the clash it had without one
    assert layers["down1.conv6.conv"].rules[-1] == "resolutions.640x640.rules[2] 'down1.conv6*'"


def test_memory_report_table_and_json(memory_reports):
    _, report = memory_reports["ese_vovnet39b", 224]
    data = json.loads(report.to_json())
    assert [m["layer"] for m in data["layers"]] == [m.layer for m in report.layers]
    assert data["peak_per_core"] == max(m["peak_per_core"] for m in data["layers"]) == report.peak.peak_per_core
    table = report.table()
    assert all(m.layer in table for m in report.layers)
    assert report.peak.layer in report.summary()
