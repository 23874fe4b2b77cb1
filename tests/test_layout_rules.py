"""A conversion that returns must run: layouts are checked against the backends' constraints when the
model is converted. An explicit layout the backend cannot run stops the conversion, naming the layer,
the rule and the constraint; ``shard = "auto"`` picks a valid one instead and says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ttswap
from ttswap.config import OpConfig, ShardLayout
from ttswap.converter import ConversionError
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

SHAPE = (1, 3, 28, 28)


class HostThenDevice(nn.Module):
    """A 228-channel map computed on the host (a torch fallback), then an activation and a BatchNorm on
    the device: their input arrives row-major, with channels that are not a multiple of 32."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 228, 1)
        self.act = nn.ReLU6()
        self.post = nn.Conv2d(228, 228, 1)
        self.bn = nn.BatchNorm2d(228)

    def forward(self, x):
        y = torch.roll(self.pre(x), 1, 1)  # no device pattern: the value stays on the host
        return self.bn(torch.roll(self.post(self.act(y)), 1, 1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HostThenDevice().eval()


def recipe(shard: str, rules=()) -> Recipe:
    text = f'[recipe]\nname = "t"\n[defaults]\nshard = "{shard}"\n' + "".join(
        f'[[rules]]\nmatch = "{m}"\nshard = "{s}"\n' for m, s in rules)
    return Recipe.from_toml(text, source="t.toml")


def test_an_explicit_layout_the_backend_cannot_run_stops_the_conversion_naming_layer_and_rule(model):
    with pytest.raises(ConversionError) as error:
        ttswap.convert(model, recipe("height", [("act", "block")]), input_shape=SHAPE, backend="emulated",
                       cache=False)
    message = str(error.value)
    assert "layer 'act' (activation), shard set by rules[0] 'act': block sharding a row-major tensor" in message
    assert "needs channels in multiples of 32, got 228" in message
    assert "'bn'" not in message  # height, from the defaults: valid


def test_auto_picks_a_valid_layout_says_why_and_runs(model):
    converted = ttswap.convert(model, recipe("auto"), input_shape=SHAPE, backend="emulated", cache=False)
    records = {r.layer: r for r in converted.report.records
               if r.layer and not any(n.startswith("absorbed") for n in r.notes)}
    for layer in ("act", "bn"):
        assert records[layer].config.shard is ShardLayout.HEIGHT
        assert any(n.startswith("shard auto: height, because block sharding a row-major tensor") for n in
                   records[layer].notes), records[layer].notes
    x = torch.randn(SHAPE)
    with torch.no_grad():
        want = model(x)
    assert pcc(converted(x), want) > 0.999  # bf16 activations, default numerics
    # the recipe the model carries reproduces the conversion: the rules that fixed the layouts are in it
    again = ttswap.convert(model, converted.recipe, input_shape=SHAPE, backend="emulated", cache=False)
    assert [(r.layer, r.config) for r in again.report.records] == \
        [(r.layer, r.config) for r in converted.report.records]


def test_a_layer_fed_on_the_device_keeps_the_auto_choice():
    # the same activation fed by a device conv gets a tiled input: block sharding is fine there
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 228, 1), nn.Conv2d(228, 228, 1), nn.ReLU6()).eval()
    auto = OpConfig(shard=ShardLayout.AUTO)
    converted = ttswap.convert(net, Recipe("t", defaults=auto), input_shape=SHAPE, backend="emulated", cache=False)
    assert not any("shard auto:" in n for r in converted.report.records for n in r.notes)
    converted(torch.randn(SHAPE))
