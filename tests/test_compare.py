"""Per-layer comparison: reference values, the two modes, and the flags, on a toy CNN."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import ttswap
from ttswap.layers import fold_batchnorm
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

SHAPE = (1, 3, 32, 32)
RECIPE = Recipe.from_toml('[recipe]\nname = "defaults"\n')  # bfloat8_b weights, LoFi


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.pool(torch.cat([x, self.branch(x)], 1)))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Toy().eval()
    converted = ttswap.convert(model, RECIPE, input_shape=SHAPE, backend="emulated", cache=False)
    return model, converted, torch.randn(SHAPE)


def _replace_branch_weights(model, converted, weight_fn, bias_fn):
    """Give the device layer ``branch`` other weights (the torch model keeps its own)."""
    layer = converted.device_layers()["branch"]
    w, b = fold_batchnorm(model.branch[0].weight, None, model.branch[1])
    layer.weights = converted.backend.prepare_conv(weight_fn(w), bias_fn(b), layer.spec, layer.cfg, layer.layer)


def test_rows_follow_the_device_layers_against_independent_torch_values(setup):
    model, converted, x = setup
    result = ttswap.compare(model, converted, x)
    assert [r.layer for r in result.layers] == list(converted.device_layers())  # graph order
    assert [r.layer for r in result.layers][:2] == ["stem", "branch"] and result.layers[-1].layer == "head"

    with torch.no_grad():
        stem_ref, final_ref = model.stem(x), model(x)
        final = converted(x)
    stem = result["stem"]
    assert stem.shape == tuple(stem_ref.shape)
    # the first layer reads the uploaded input in both modes, so both see the same error
    assert stem.metrics["propagated"] == stem.metrics["isolated"]
    # the last layer's propagated values are the model's output
    assert result.output_pcc == [pytest.approx(pcc(final, final_ref), abs=1e-12)]
    assert result["head"].metrics["propagated"].pcc == pytest.approx(pcc(final, final_ref), abs=1e-12)
    assert result["head"].metrics["propagated"].max_abs_error == pytest.approx(float((final - final_ref).abs().max()))
    for row in result.layers:
        for m in row.metrics.values():
            assert m.finite and 0.99 < m.pcc <= 1.0
    assert result.first_below("propagated") is None and result.first_below("isolated") is None


def test_isolated_mode_localises_a_bad_layer_that_propagated_mode_spreads(setup):
    model, converted, x = setup
    _replace_branch_weights(model, converted, lambda w: -w, lambda b: -b)
    result = ttswap.compare(model, converted, x, threshold=0.99)
    assert result.first_below("propagated").layer == "branch"
    assert result.first_below("isolated").layer == "branch"
    assert result["branch"].metrics["isolated"].pcc < 0.5
    names = [r.layer for r in result.layers]
    downstream = names[names.index("branch") + 1:]
    assert downstream
    assert all(result[name].metrics["isolated"].pcc > 0.99 for name in downstream)  # fed torch's values
    assert all(result[name].metrics["propagated"].pcc < 0.99 for name in downstream)  # inheriting the error
    assert "<- first below" in result.table()


def test_nan_and_inf_are_flagged(setup):
    model, converted, x = setup
    _replace_branch_weights(model, converted, lambda w: w, lambda b: torch.full_like(b, math.nan))
    result = ttswap.compare(model, converted, x)
    for mode in ("propagated", "isolated"):
        assert result.non_finite(mode)[0].layer == "branch"
        assert result.first_below(mode).layer == "branch"
        assert result["branch"].metrics[mode].nan == math.prod(result["branch"].shape)
    assert result["stem"].metrics["isolated"].finite and result["cat"].metrics["isolated"].finite
    data = json.loads(result.to_json())  # strict JSON: NaN written as null
    branch = next(row for row in data["layers"] if row["layer"] == "branch")
    assert branch["isolated"]["pcc"] is None and data["non_finite"]["isolated"] == ["branch"]
    assert "NaN" in result.table()


def test_json_plot_and_single_mode(setup, tmp_path):
    model, converted, x = setup
    result = ttswap.compare(model, converted, x, modes=["isolated"])
    assert result.modes == ("isolated",) and result.output_pcc is None
    with pytest.raises(ValueError, match="was not run"):
        result.first_below("propagated")
    data = json.loads(result.to_json())
    assert [row["layer"] for row in data["layers"]] == [r.layer for r in result.layers]
    assert data["first_below"] == {"isolated": None}
    pytest.importorskip("matplotlib")
    png = result.plot(tmp_path / "pcc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_input_or_mode_is_a_clear_error(setup):
    model, converted, _ = setup
    with pytest.raises(ValueError, match="converted for"):
        ttswap.compare(model, converted, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown mode"):
        ttswap.compare(model, converted, torch.randn(SHAPE), modes=["fast"])
