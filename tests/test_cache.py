"""The weight cache: a hit recomputes nothing and converts bit for bit as without the cache; any change
to what a conversion depends on misses; a damaged file is never used."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import ttswap
from ttswap import cache as cache_module
from ttswap import layers
from ttswap.backends.emulated import EmulatedBackend
from ttswap.cache import CacheWarning, cache_dir
from ttswap.recipe import Recipe

SHAPE = (1, 3, 32, 32)


class Toy(nn.Module):
    """Conv+BN+ReLU, a branch concatenated back, a pool and a classifier head; two outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        y = self.pool(torch.cat([x, self.branch(x)], 1))
        return self.head(y), y


def toy() -> Toy:
    torch.manual_seed(0)
    model = Toy().eval()
    for bn in (model.stem[1], model.branch[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    # Channel scales 1000x apart inside one bfloat8_b block: the guard keeps the stem's weights bf16.
    model.stem[1].weight.data[0] = 30.0
    model.stem[1].weight.data[1:] = 0.03
    return model


RECIPE = Recipe.from_toml('[recipe]\nname = "toy"\nbfp8_guard = 0.05\n[defaults]\nweight_dtype = "bfp8_b"\n')


def convert(model, cache, recipe=RECIPE, shape=SHAPE):
    return ttswap.convert(model, recipe, input_shape=shape, backend="emulated", cache=cache)


def records(converted):
    return [r.to_dict() for r in converted.report.records]


def outputs(converted, x):
    return [t.clone() for t in converted(x)]


def cache_files(directory):
    return sorted(directory.glob("*.safetensors"))


def test_a_hit_recomputes_nothing_and_matches_bit_for_bit(tmp_path, monkeypatch):
    model = toy()
    first = convert(model, tmp_path)
    assert len(cache_files(tmp_path)) == 1

    def recomputed(*args, **kwargs):
        raise AssertionError("recomputed on a cache hit")

    for owner, name in ((layers, "fold_batchnorm"), (layers, "bfp8_channel_error"), (cache_module, "propagate_shapes"),
                        (EmulatedBackend, "prepare_conv"), (EmulatedBackend, "prepare_linear")):
        monkeypatch.setattr(owner, name, recomputed)
    second = convert(model, tmp_path)
    monkeypatch.undo()
    uncached = convert(model, False)

    x = torch.randn(SHAPE)
    for a, b, c in zip(outputs(uncached, x), outputs(first, x), outputs(second, x)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert records(second) == records(uncached)
    stem = [r for r in second.report.records if r.layer == "stem"]
    assert {r.config.weight_dtype.value for r in stem} == {"bf16"}  # the guard's decision, taken again
    assert any(note.startswith("bf16 weights") for r in stem for note in r.notes)
    shapes = [n.meta.get("tensor_meta") for n in second.graph_module.graph.nodes]
    assert shapes == [n.meta.get("tensor_meta") for n in uncached.graph_module.graph.nodes]
    assert len(cache_files(tmp_path)) == 1  # a hit rewrites nothing


def test_any_change_the_conversion_depends_on_misses(tmp_path):
    model = toy()
    x = torch.randn(SHAPE)
    convert(model, tmp_path)
    model.branch[1].running_mean.add_(0.25)  # new weights
    changed = convert(model, tmp_path)
    assert len(cache_files(tmp_path)) == 2
    for a, b in zip(outputs(changed, x), outputs(convert(model, False), x)):
        assert torch.equal(a, b)
    convert(model, tmp_path, recipe=RECIPE.override(fidelity="HiFi4"))
    convert(model, tmp_path, shape=(1, 3, 64, 64))
    assert len(cache_files(tmp_path)) == 4


def _rewrite_metadata(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, **changes})


@pytest.mark.parametrize("damage, message", [
    ("flip a data byte", "checksum mismatch"),
    ("truncate", "unusable"),
    ("other key", "holds key"),
    ("other format", "format"),
])
def test_a_damaged_or_mismatched_file_is_rebuilt_with_a_warning(tmp_path, damage, message):
    model = toy()
    convert(model, tmp_path)
    (path,) = cache_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip a data byte":
        data[-3] ^= 0x40  # the end of the file is tensor data
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "other key":
        _rewrite_metadata(path, **{"ttswap.key": "0" * 40})
    else:
        _rewrite_metadata(path, **{"ttswap.format": "0"})

    with pytest.warns(CacheWarning, match=message):
        rebuilt = convert(model, tmp_path)
    x = torch.randn(SHAPE)
    for a, b in zip(outputs(rebuilt, x), outputs(convert(model, False), x)):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        convert(model, tmp_path)  # the rebuilt file is whole again


def test_location_env_var_and_disabling(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSWAP_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir(True) == tmp_path / "env"
    assert cache_dir(False) is None
    assert cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    with pytest.raises(TypeError, match="cache must be"):
        cache_dir(3)
    model = toy()
    convert(model, False)
    assert not (tmp_path / "env").exists()
    convert(model, True)
    assert len(cache_files(tmp_path / "env")) == 1


def test_least_recently_used_files_are_evicted(tmp_path, monkeypatch):
    model = toy()
    convert(model, tmp_path)
    (oldest,) = cache_files(tmp_path)
    monkeypatch.setattr(cache_module, "MAX_CACHE_BYTES", int(oldest.stat().st_size * 1.5))
    model.stem[1].running_mean.add_(0.1)
    convert(model, tmp_path)
    (newest,) = cache_files(tmp_path)
    assert newest != oldest


def test_file_holds_what_the_docs_say(tmp_path):
    from safetensors import safe_open

    convert(toy(), tmp_path)
    (path,) = cache_files(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    entries = json.loads(metadata["ttswap.entries"])
    assert metadata["ttswap.key"] == path.stem
    assert set(entries["prepared"]) == {"stem", "branch", "head"}
    assert set(entries["values"]) == {"stem/bfp8_error", "branch/bfp8_error"}
    assert entries["values"]["stem/bfp8_error"] > 0.05 > entries["values"]["branch/bfp8_error"]
    assert "x" in entries["shapes"] and entries["shapes"]["x"]["tensor"]["shape"] == list(SHAPE)


@pytest.mark.ttnn_mock
def test_ttnn_backend_caches_folded_weights(tmp_path, monkeypatch):
    import ttnn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    convert_ttnn = lambda: ttswap.convert(model, RECIPE, input_shape=SHAPE, backend="ttnn", cache=tmp_path)  # noqa: E731
    first = convert_ttnn()
    monkeypatch.setattr(layers, "fold_batchnorm", lambda *a: pytest.fail("folded again on a cache hit"))
    second = convert_ttnn()
    (a,), (b,) = first.device_layers().values(), second.device_layers().values()
    assert torch.equal(ttnn.to_torch(a.weights.weight), ttnn.to_torch(b.weights.weight))
    assert torch.equal(ttnn.to_torch(a.weights.bias), ttnn.to_torch(b.weights.bias))


def test_layers_sharing_a_block_get_their_own_names_and_cache_entries(tmp_path):
    """A timm ResNet block holds conv1/bn1/act1 and conv2/bn2 under one path; each conv must be its
    own layer, or a cache hit would hand conv2 the weights of conv1."""
    import timm

    from ttswap.metrics import pcc

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    for _ in range(2):  # miss, then hit
        converted = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 64, 64), backend="emulated", cache=tmp_path)
        layers = converted.report.layers
        assert len(layers) == len(set(layers))
        assert {"layer1.0.conv1", "layer1.0.conv2"} <= set(layers)
        assert pcc(converted(x), ref) > 0.999
