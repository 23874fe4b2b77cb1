"""The weight cache: a hit recomputes nothing and converts bit for bit as without the cache; any change
to what a conversion depends on misses; a damaged file is never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

import ttswap
from ttswap import cache as cache_module
from ttswap import cache_store, layers
from ttswap.backends.emulated import EmulatedBackend
from ttswap.cache import CacheWarning, ConversionCache, cache_dir
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


def test_a_cache_location_that_is_no_directory_costs_one_warning(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.warns(CacheWarning) as record:
        converted = convert(toy(), tmp_path / "file" / "cache")
    (warning,) = [w for w in record if w.category is CacheWarning]
    assert "Not a directory" in str(warning.message) and "converted without caching" in str(warning.message)
    x = torch.randn(SHAPE)
    for a, b in zip(outputs(converted, x), outputs(convert(toy(), False), x)):
        assert torch.equal(a, b)


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


def _entry_of(directory, before):
    (path,) = set(cache_files(directory)) - set(before)
    return path


def _age(path, seconds):
    os.utime(path, (time.time() - seconds,) * 2)


def test_least_recently_used_entries_are_evicted_beyond_the_env_cap(tmp_path, monkeypatch):
    models = []
    for shift in (0.1, 0.2, 0.3):  # three sets of weights: three entries of one size
        model = toy()
        model.stem[1].running_mean.add_(shift)
        models.append(model)
    convert(models[0], tmp_path)
    first = _entry_of(tmp_path, [])
    convert(models[1], tmp_path)
    second = _entry_of(tmp_path, [first])
    _age(first, 100)
    _age(second, 50)
    monkeypatch.setenv("TTSWAP_CACHE_MAX_BYTES", str(int(first.stat().st_size * 2.5)))
    convert(models[0], tmp_path)  # a hit: the first entry is now the most recently used
    convert(models[2], tmp_path)  # a third entry does not fit: the least recently used goes
    remaining = cache_files(tmp_path)
    assert first in remaining and second not in remaining and len(remaining) == 2


def test_the_cap_argument_overrides_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSWAP_CACHE_MAX_BYTES", "1G")
    assert cache_store.max_bytes() == 2**30 and cache_store.max_bytes("512M") == 2**29
    ttswap.convert(toy(), RECIPE, input_shape=SHAPE, backend="emulated", cache=tmp_path, cache_max_bytes=0)
    assert cache_files(tmp_path) == []  # an entry larger than the cap is not written
    monkeypatch.setenv("TTSWAP_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="TTSWAP_CACHE_MAX_BYTES must be a number of bytes.*'lots'"):
        convert(toy(), tmp_path)
    with pytest.raises(ValueError, match="cache_max_bytes must be a number of bytes >= 0, got -1"):
        ttswap.convert(toy(), RECIPE, input_shape=SHAPE, backend="emulated", cache=tmp_path, cache_max_bytes=-1)


def test_an_entry_a_conversion_is_reading_is_not_evicted(tmp_path, monkeypatch):
    """While a conversion builds its layers from an entry, no eviction (its own included) deletes it."""
    model = toy()
    convert(model, tmp_path)
    (path,) = cache_files(tmp_path)
    evictable_during_hit = []
    save = ConversionCache.save

    def save_checking(self):
        evictable_during_hit.append(cache_store._remove_unless_in_use(path))
        save(self)

    monkeypatch.setattr(ConversionCache, "save", save_checking)
    convert(model, tmp_path)
    assert evictable_during_hit == [False] and path.exists()


def test_an_entry_in_use_by_another_process_is_not_evicted(tmp_path, monkeypatch):
    model = toy()
    convert(model, tmp_path)
    (held,) = cache_files(tmp_path)
    _age(held, 100)  # the least recently used: first to go
    monkeypatch.setenv("TTSWAP_CACHE_MAX_BYTES", str(int(held.stat().st_size * 1.5)))
    reader = subprocess.Popen(  # another process reading the entry holds a shared lock on it
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_SH); "
         "print('locked', flush=True); sys.stdin.read()", str(held)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "locked"
        model.stem[1].running_mean.add_(0.1)
        convert(model, tmp_path)  # over the cap, but the other entry is in use
        assert held.exists() and len(cache_files(tmp_path)) == 2
        (newest,) = set(cache_files(tmp_path)) - {held}
        pruned = cache_store.prune(tmp_path, cache_store.max_bytes(), keep=newest)
        assert pruned.removed == [] and [e.path for e in pruned.in_use] == [held]
    finally:
        reader.communicate("", timeout=30)  # the reader is done: its lock goes with it
    pruned = cache_store.prune(tmp_path, cache_store.max_bytes(), keep=newest)
    assert [e.path for e in pruned.removed] == [held] and cache_files(tmp_path) == [newest]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    seen = []

    def write(temp):
        temp.write_bytes(b"x" * 100)
        _age(temp, 60)  # as old as a dead writer's, but its writer holds the lock
        seen.append(cache_store.prune(tmp_path, 0).temporary_files)

    cache_store.write_atomically(tmp_path / "k.safetensors", write)
    assert seen == [0] and [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


@pytest.mark.parametrize("text, size", [("2147483648", 2**31), ("512M", 2**29), ("2G", 2**31), ("1.5GiB", 3 * 2**29),
                                        ("0", 0), ("64kb", 2**16)])
def test_sizes_parse_in_binary_units(text, size):
    assert cache_store.parse_size(text) == size


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
    assert json.loads(metadata["ttswap.about"]) == {"model": "Toy", "recipe": "toy", "backend": "emulated",
                                                    "input_shape": "1x3x32x32"}
    # Only what a hit cannot rebuild for free is stored: the `high` operands are the `full` ones masked.
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    index = json.loads(metadata["ttswap.tensors"])
    high = {name for name in index if name.endswith("/high")}
    assert high and not high & stored
    assert {index[name]["derived_from"] for name in high} == {name.replace("/high", "/full") for name in high} <= stored


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
