"""Save and load: one safetensors file, no pickles; clear errors for anything wrong with it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ttswap
from ttswap.models.yolov4 import ResBlock
from ttswap.recipe import Recipe, shipped_recipes
from ttswap.serialize import SerializationError, build_model, model_ref_of

SHAPE = (1, 16, 16, 16)
REF = "ttswap.models.yolov4:ResBlock"
KWARGS = {"channels": 16, "num_blocks": 2}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ResBlock(**KWARGS).eval()
    converted = ttswap.convert(model, "yolov4", input_shape=SHAPE, backend="emulated", cache=False)
    path = tmp_path / "resblock.safetensors"
    converted.save(path, model_ref=REF, model_kwargs=KWARGS)
    return converted, path


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _rewrite(path, tensors=None, **metadata):
    save_file(tensors or load_file(str(path)), str(path), metadata={**_metadata(path), **metadata})


def test_load_converts_again_bit_for_bit(saved):
    converted, path = saved
    loaded = ttswap.load(path, backend="emulated", cache=False)
    x = torch.randn(SHAPE)
    assert torch.equal(loaded(x), converted(x))
    assert [r.to_dict() for r in loaded.report.records] == [r.to_dict() for r in converted.report.records]
    meta = _metadata(path)
    assert json.loads(meta["ttswap.model"]) == {"ref": REF, "kwargs": KWARGS}
    assert json.loads(meta["ttswap.input_shape"]) == list(SHAPE)
    assert meta["ttswap.version"] == ttswap.__version__


def test_timm_model_reference_is_inferred(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("ese_vovnet19b_dw", num_classes=10).eval()
    assert model_ref_of(model) == ("ese_vovnet19b_dw", {"num_classes": 10})
    converted = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 32, 32), backend="emulated", cache=False)
    converted.save(tmp_path / "vovnet.safetensors")
    loaded = ttswap.load(tmp_path / "vovnet.safetensors", backend="emulated", cache=False)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), converted(x))


@pytest.mark.parametrize("name", shipped_recipes())
def test_recipes_round_trip_through_their_tables(name):
    recipe = Recipe.load(name).override("stem*", fidelity="HiFi4")
    back = Recipe.from_dict(json.loads(json.dumps(recipe.to_tables())))
    assert {**back.to_dict(), "source": None} == {**recipe.to_dict(), "source": None}
    assert back.description == recipe.description


def test_a_model_load_cannot_rebuild_is_refused_at_save(tmp_path):
    class Local(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    converted = ttswap.convert(Local(), "yolov4", input_shape=SHAPE, backend="emulated", cache=False)
    with pytest.raises(SerializationError, match="model_ref="):
        converted.save(tmp_path / "local.safetensors")
    with pytest.raises(SerializationError, match="differ"):  # builds, but not this model
        converted.save(tmp_path / "local.safetensors", model_ref=REF, model_kwargs=KWARGS)
    assert not (tmp_path / "local.safetensors").exists()


def test_weights_changed_after_conversion_are_refused(tmp_path):
    model = ResBlock(**KWARGS).eval()
    converted = ttswap.convert(model, "yolov4", input_shape=SHAPE, backend="emulated", cache=False)
    with torch.no_grad():
        model.module_list[0][0].conv[0].weight.mul_(2)
    with pytest.raises(SerializationError, match="changed after it was converted"):
        converted.save(tmp_path / "m.safetensors", model_ref=REF, model_kwargs=KWARGS)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved ttswap model"):
        ttswap.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SerializationError, match="not a readable safetensors file"):
        ttswap.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SerializationError, match="not a saved ttswap model"):
        ttswap.load(tmp_path / "plain.safetensors")


def test_format_mismatch_names_both_versions(saved):
    _, path = saved
    _rewrite(path, **{"ttswap.format": "99", "ttswap.version": "9.9.9"})
    with pytest.raises(SerializationError, match=r"format 99 by ttswap 9\.9\.9; ttswap .* reads format 1"):
        ttswap.load(path)


def test_corrupt_weights_are_detected(saved):
    _, path = saved
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name] + 1e-3
    _rewrite(path, tensors)
    with pytest.raises(SerializationError, match="corrupt"):
        ttswap.load(path, backend="emulated", cache=False)


def test_a_ttswap_that_converts_differently_is_refused(saved):
    _, path = saved
    graph = json.loads(_metadata(path)["ttswap.graph"])
    changed = next(d for d in graph if d["replacement"] == "add")
    changed["config"]["act_block_h"] = 4096  # as if an older ttswap had configured the add so
    _rewrite(path, **{"ttswap.graph": json.dumps(graph), "ttswap.version": "0.0.1"})
    expected = rf"(?s)saved by ttswap 0\.0\.1; .*1 node\(s\) differ.*node {changed['node']}: config.act_block_h 4096 -> None"
    with pytest.raises(SerializationError, match=expected):
        ttswap.load(path, backend="emulated", cache=False)


def test_build_model_errors():
    with pytest.raises(SerializationError, match="cannot import"):
        build_model("ttswap.models.yolov4:NoSuchThing")
    with pytest.raises(SerializationError, match="not a torch.nn.Module"):
        build_model("collections:OrderedDict")
