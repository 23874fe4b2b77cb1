"""The conversion report says what runs: every device node's record carries the config its layer's ops
are called with, including what policy changed after the recipe (inputs kept for a second reader, the
bfloat8_b guard), and a layer's config cannot change after the report is made."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import ttswap
from ttswap.calibration import make_batchnorm_ill_conditioned, recalibrate_batchnorm, sample_batch
from ttswap.config import DType, OpConfig, ShardLayout
from ttswap.models.yolov4 import YOLOv4
from ttswap.modules import TTModule
from ttswap.recipe import Recipe

SMALL = (1, 3, 32, 32)


class Residual(nn.Module):
    """y = a(x); out = b(y) + y: y has two readers, so neither b nor the add may free it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, x):
        y = self.a(x)
        return self.b(y) + y


class Guarded(nn.Module):
    """Two conv+BN layers; the first gets near-zero running variances, which the bfloat8_b guard catches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, x):
        return self.body(self.stem(x))


def configs_seen(converted, x: torch.Tensor) -> dict[str, set[OpConfig]]:
    """Run ``converted`` once, recording the config every backend op is called with, by layer name."""
    seen: dict[str, set[OpConfig]] = {}
    backend = converted.backend
    ops = ("conv2d", "add", "activation", "max_pool2d", "avg_pool2d", "concat", "mean_hw", "linear", "multiply",
           "upsample_nearest")
    originals = {op: getattr(backend, op) for op in ops}

    def spy(op):
        def call(*args, **kwargs):
            cfg = next(a for a in (*args, *kwargs.values()) if isinstance(a, OpConfig))
            layer = kwargs.get("layer") or next(a for a in args if isinstance(a, str))
            seen.setdefault(layer, set()).add(cfg)
            return originals[op](*args, **kwargs)
        return call

    for op in ops:
        setattr(backend, op, spy(op))
    try:
        converted(x)
    finally:
        for op in ops:
            delattr(backend, op)
    return seen


def check_records_match_runtime(converted, x: torch.Tensor) -> None:
    seen = configs_seen(converted, x)
    layers = converted.device_layers()
    device = [r for r in converted.report.records if r.layer]
    assert device
    for record in device:
        part = layers[record.layer].part_for(record.node)
        assert seen[part.layer] == {record.config}, record.node


def test_shared_inputs_are_kept_in_the_report_and_at_run_time():
    torch.manual_seed(0)
    model = Residual().eval()
    converted = ttswap.convert(model, "ese_vovnet", input_shape=SMALL, backend="emulated", cache=False)
    by_node = {r.node: r for r in converted.report.records}
    assert by_node["a_0"].config.deallocate  # x has one reader
    assert not any(by_node[n].config.deallocate for n in ("b_0", "b_1", "b_2", "add"))  # y has two
    check_records_match_runtime(converted, torch.randn(SMALL))


def test_the_bfp8_guard_shows_in_the_report_as_it_runs():
    torch.manual_seed(0)
    model = Guarded().eval()
    make_batchnorm_ill_conditioned(model.stem, every=4)  # in place; the body's BatchNorm stays benign
    recipe = Recipe.from_toml('[recipe]\nname = "guarded"\nbfp8_guard = 0.05\n[defaults]\nweight_dtype = "bfp8_b"\n')
    converted = ttswap.convert(model, recipe, input_shape=SMALL, backend="emulated", cache=False)
    dtypes = {r.layer: r.config.weight_dtype for r in converted.report.records if r.layer}
    assert dtypes == {"stem": DType.BF16, "body": DType.BFP8_B}
    stem = next(r for r in converted.report.records if r.node == "stem_2")
    assert any(n.startswith("bf16 weights: bfp8_b would put") for n in stem.notes)
    check_records_match_runtime(converted, torch.randn(SMALL))


def test_separable_halves_report_their_own_configs():
    """ese_vovnet's depthwise and pointwise convs are one layer; each half's guard decision is its own."""
    torch.manual_seed(0)
    model = make_batchnorm_ill_conditioned(recalibrate_batchnorm(
        timm.create_model("ese_vovnet19b_dw", pretrained=False).eval(), sample_batch((64, 64), crops=1)))
    recipe = Recipe.load("ese_vovnet").override(weight_dtype="bfp8_b")
    converted = ttswap.convert(model, recipe, input_shape=(1, 3, 64, 64), backend="emulated", cache=False)
    separable = [r for r in converted.report.records if r.replacement == "separable_conv"]
    assert len({(r.layer, r.config) for r in separable}) > len({r.layer for r in separable})  # halves differ
    check_records_match_runtime(converted, sample_batch((64, 64))[:1])


def test_a_layers_config_is_frozen_once_built():
    converted = ttswap.convert(Residual().eval(), "ese_vovnet", input_shape=SMALL, backend="emulated", cache=False)
    layer = next(iter(converted.device_layers().values()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.info.config = layer.info.config.replace(deallocate=True)


# -- every layer of the shipped models and of the new-user table: conversion only -------------------

def _new_user_models() -> list[str]:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "new_user_table.py"
    spec = importlib.util.spec_from_file_location("new_user_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MODELS)


# bf16 weights: preparing them is cheaper than bfloat8_b's, and the report check does not depend on it
PLAIN = Recipe(name="plain", defaults=OpConfig(shard=ShardLayout.AUTO, weight_dtype=DType.BF16))


def check_report_describes_modules(converted) -> None:
    """Every device record shows the config, rules, notes and L1 of the (part of the) layer that computes
    its node; and a layer whose input another node also reads never frees it (counted on the converted
    graph, as ttnn would see the tensors)."""
    layers = converted.device_layers()
    records = [r for r in converted.report.records if r.layer]
    assert records
    for record in records:
        module = layers[record.layer]
        part = module.part_for(record.node)
        assert (record.config, record.rules) == (part.info.config, part.info.rules), record.node
        if record.node == module.info.nodes[-1]:
            assert (record.l1_bytes, tuple(record.notes)) == (module.l1_bytes, module.info.notes), record.node
    gm = converted.graph_module
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, TTModule) and any(len(arg.users) > 1 for arg in node.all_input_nodes):
            reader = module.part_for(module.info.nodes[0])  # the first node of a layer reads its inputs
            assert not reader.cfg.deallocate, module.layer


@pytest.mark.slow
def test_shipped_models_report_what_runs():
    torch.manual_seed(0)
    vovnet = timm.create_model("ese_vovnet19b_dw", pretrained=False).eval()
    check_report_describes_modules(ttswap.convert(vovnet, "ese_vovnet", input_shape=(1, 3, 64, 64),
                                                  backend="emulated", cache=False))
    check_report_describes_modules(ttswap.convert(YOLOv4().eval(), "yolov4", input_shape=(1, 3, 64, 64),
                                                  backend="emulated", cache=False))


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", _new_user_models())
def test_new_user_models_report_what_runs(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = 96 if name == "inception_v3" else 64  # Inception's last stage needs 3x3 maps left
    check_report_describes_modules(ttswap.convert(model, PLAIN, input_shape=(1, 3, size, size),
                                                  backend="emulated", cache=False))
