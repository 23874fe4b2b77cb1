"""Every model of the new-user table (benchmarks/new_user_table.py) converts and then runs, under
"auto" and under a plain recipe whose layouts are all ``shard = "auto"``: a conversion that returns
must run. Small inputs keep it affordable; a quick subset runs in the default tier, the rest is
``exhaustive`` (``make test-all``). The plain recipe's output is checked against torch fp32 on the
same input: no worse than torch's own bfloat16 autocast loses, with room for a random-weight network's amplified rounding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import ttswap
from ttswap.metrics import pcc
from ttswap.tuning import AutoRecipe

timm = pytest.importorskip("timm")

_spec = importlib.util.spec_from_file_location(
    "new_user_table", Path(__file__).resolve().parent.parent / "benchmarks" / "new_user_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

SIZES = {"inception_v3": 96}  # it needs 75 or more; the others run at 64
PARAMS = [pytest.param(name, marks=() if name in table.QUICK else pytest.mark.exhaustive) for name in table.MODELS]


def size_of(name: str) -> int:
    return SIZES.get(name, 64)


def run(model, recipe, size: int):
    image = table.held_out(size, count=1)
    converted = ttswap.convert(model, recipe, input_shape=(1, 3, size, size), backend="emulated", cache=False)
    out = converted(image)
    assert torch.isfinite(out).all()
    return converted, out, image


@pytest.mark.parametrize("name", PARAMS)
def test_converts_and_runs_with_a_plain_recipe(name):
    model = table.build(name, size_of(name))
    converted, out, image = run(model, table.ACCURATE, size_of(name))
    with torch.no_grad():
        want = model(image)
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = model(image).float()
    assert out.shape == want.shape
    assert converted.report.layers, "nothing was converted"
    loss, floor = 1 - pcc(out, want), 1 - pcc(bf16, want)
    assert loss <= max(3 * floor, 0.01), f"PCC {1 - loss:.4f}, torch bf16 {1 - floor:.4f}"


@pytest.mark.parametrize("name", PARAMS)
def test_converts_and_runs_with_auto(name):
    model = table.build(name, size_of(name))
    converted, out, image = run(model, AutoRecipe(max_evaluations=2, sample_count=2, holdout_count=1), size_of(name))
    with torch.no_grad():
        assert out.shape == model(image).shape
    assert converted.recipe.description.startswith("auto-tuned")
