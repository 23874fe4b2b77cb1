"""Weight I/O: state dicts (.pth, .safetensors) and Darknet cfg + .weights, against independent readers."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ttswap.models.yolov4 import YOLOv4
from ttswap.weights import (
    YOLOV4_CFG,
    DarknetFormatError,
    StateDictMismatchError,
    darknet_convs,
    load_darknet,
    load_state_dict_strict,
    load_yolov4,
    read_state_dict,
    save_darknet,
)


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-default values in every tensor a checkpoint stores, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) - 0.5) * (12 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.out_channels, generator=g))
    return model.eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def model() -> YOLOv4:
    return randomize(YOLOv4())


@pytest.fixture(scope="module")
def darknet_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("darknet") / "yolov4.weights"
    save_darknet(model, path)
    yield path
    path.unlink()


@pytest.fixture
def scratch(tmp_path):
    """``tmp_path``, emptied afterwards: full-model files are 258 MB and pytest keeps its last 3 runs."""
    yield tmp_path
    for path in tmp_path.iterdir():
        path.unlink()


# -- an independent Darknet reader and interpreter: parses the cfg itself and runs its layer graph --


def _cfg_layers(text: str) -> list[dict[str, str]]:
    sections: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("["):
            sections.append({"type": line.strip("[]")})
        elif line:
            key, value = line.split("=")
            sections[-1][key.strip()] = value.strip()
    return sections[1:]  # drop [net]


def run_darknet(cfg_text: str, weights: bytes, x: torch.Tensor) -> list[torch.Tensor]:
    """Execute a Darknet cfg on ``x`` with parameters read straight from ``.weights`` bytes."""
    floats = torch.from_numpy(np.frombuffer(weights, dtype="<f4", offset=20).copy())
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        out = floats[pos : pos + n].reshape(shape)
        pos += n
        return out

    outputs: list[torch.Tensor] = []
    detections: list[torch.Tensor] = []
    for i, layer in enumerate(_cfg_layers(cfg_text)):
        kind = layer["type"]
        if kind == "convolutional":
            f, k, s = int(layer["filters"]), int(layer["size"]), int(layer["stride"])
            if layer.get("batch_normalize") == "1":
                beta, gamma, mean, var = take(f), take(f), take(f), take(f)
                x = F.conv2d(x, take(f, x.shape[1], k, k), None, s, k // 2)
                x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * gamma[:, None, None]
                x = x + beta[:, None, None]
            else:
                bias = take(f)
                x = F.conv2d(x, take(f, x.shape[1], k, k), bias, s, k // 2)
            if layer["activation"] == "mish":
                x = x * torch.tanh(F.softplus(x))
            elif layer["activation"] == "leaky":
                x = torch.where(x > 0, x, 0.1 * x)
        elif kind == "route":
            x = torch.cat([outputs[j if j >= 0 else i + j] for j in map(int, layer["layers"].split(","))], dim=1)
        elif kind == "shortcut":
            x = x + outputs[i + int(layer["from"])]
        elif kind == "maxpool":
            k = int(layer["size"])
            x = F.max_pool2d(x, k, 1, k // 2)
        elif kind == "upsample":
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        elif kind == "yolo":
            detections.append(x)
        outputs.append(x)
    assert pos == floats.numel(), f"{floats.numel() - pos} floats left unread"
    return detections


# -- Darknet -----------------------------------------------------------------------------------------


def test_bundled_cfg_structure():
    convs = darknet_convs(YOLOV4_CFG.read_text())
    assert len(convs) == 110
    assert sum(not c.batch_normalize for c in convs) == 3
    by_layer = {c.layer: c for c in convs}
    # hand-traced through the cfg's route layers
    assert (by_layer[0].in_channels, by_layer[0].filters) == (3, 32)
    assert by_layer[114].in_channels == 2048  # SPP: route -1,-3,-5,-6 over 4 x 512
    assert by_layer[120].in_channels == 512  # route 85: down4's output
    assert by_layer[130].in_channels == 256  # route 54: down3's output
    assert by_layer[141].in_channels == 128 and by_layer[141].stride == 2  # route -4
    assert by_layer[143].in_channels == 512  # route -1,-16: 256 + neck 256
    assert by_layer[154].in_channels == 1024  # route -1,-37: 512 + neck 512
    assert [by_layer[i].filters for i in (138, 149, 160)] == [255] * 3


def test_darknet_file_layout(model, darknet_file):
    data = darknet_file.read_bytes()
    assert np.frombuffer(data[:12], "<i4").tolist() == [0, 2, 5]
    assert np.frombuffer(data[12:20], "<i8").tolist() == [0]
    stored = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert len(data) == 20 + 4 * stored
    # first conv has BatchNorm: beta, gamma, mean, var, then the weights
    first = torch.from_numpy(np.frombuffer(data, "<f4", offset=20, count=4 * 32 + 32 * 27).copy())
    bn, conv = model.down1.conv1.conv[1], model.down1.conv1.conv[0]
    assert torch.equal(first[:32], bn.bias.detach())
    assert torch.equal(first[32:64], bn.weight.detach())
    assert torch.equal(first[96:128], bn.running_var)
    assert torch.equal(first[128:], conv.weight.detach().flatten())


def test_darknet_round_trip(model, darknet_file):
    fresh = YOLOv4()
    load_darknet(fresh, None, darknet_file)
    assert_same_state(model, fresh)


def test_darknet_graph_matches_model(model, darknet_file):
    """The strongest check of the conv mapping: the cfg's own layer graph, run with the parameters
    as the file stores them, computes what our module tree computes."""
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        got = run_darknet(YOLOV4_CFG.read_text(), darknet_file.read_bytes(), x)
    assert len(got) == 3
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert e.abs().max() > 0.1
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_darknet_int32_seen_header(model, darknet_file, scratch):
    old = scratch / "old.weights"
    data = darknet_file.read_bytes()
    old.write_bytes(np.array([0, 1, 0, 1234], "<i4").tobytes() + data[20:])  # format 0.1: 4-byte `seen`
    fresh = YOLOv4()
    load_darknet(fresh, YOLOV4_CFG, old)
    assert_same_state(model, fresh)


@pytest.mark.parametrize("change, message", [(-4, "ends inside cfg layer 160"), (8, "2 floats left")])
def test_darknet_wrong_length_leaves_model_untouched(darknet_file, scratch, change, message):
    bad = scratch / "bad.weights"
    data = darknet_file.read_bytes()
    bad.write_bytes(data[:change] if change < 0 else data + bytes(change))
    fresh = YOLOv4()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(DarknetFormatError, match=message):
        load_darknet(fresh, None, bad)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key])


def test_darknet_cfg_that_does_not_fit(scratch):
    text = YOLOV4_CFG.read_text()
    # layer 2 is the first 1x1 conv (filters=64); make it 48 wide
    head, marker, rest = text.partition("[convolutional]\nbatch_normalize=1\nfilters=64\nsize=1")
    cfg = scratch / "narrow.cfg"
    cfg.write_text(head + marker.replace("filters=64", "filters=48") + rest)
    with pytest.raises(DarknetFormatError, match=r"cfg layer 2 does not fit model conv 'down1.conv3': filters: cfg 48"):
        save_darknet(YOLOv4(), scratch / "x.weights", cfg)


def test_load_yolov4_dispatches_on_suffix(model, darknet_file, scratch):
    assert_same_state(model, load_yolov4(darknet_file))
    small = YOLOv4(num_classes=3).eval()
    torch.save(small.state_dict(), scratch / "small.pth")
    loaded = load_yolov4(scratch / "small.pth")  # ttswap.weights loads models; models do not load files
    assert loaded.num_classes == 3 and not loaded.training
    assert_same_state(small, loaded)


# -- PyTorch state dicts --------------------------------------------------------------------------------


def test_pth_round_trip_with_wrappers_and_old_names(model, scratch):
    """pytorch-YOLOv4 checkpoints spell the neck `neek`, and may be DataParallel-prefixed and wrapped."""
    state = {f"module.{k.replace('neck.', 'neek.')}": v for k, v in model.state_dict().items()}
    path = scratch / "yolov4.pth"
    torch.save({"state_dict": state, "epoch": 7}, path)
    read = read_state_dict(path)
    assert "neek.conv1.conv.0.weight" in read and not any(k.startswith("module.") for k in read)
    fresh = YOLOv4()
    load_state_dict_strict(fresh, read)
    assert_same_state(model, fresh)


def test_safetensors_round_trip(model, scratch):
    path = scratch / "yolov4.safetensors"
    save_file(model.state_dict(), str(path))
    assert_same_state(model, load_yolov4(path))


def test_pickle_only_checkpoint_is_refused(scratch):
    path = scratch / "whole_model.pth"
    torch.save(nn.Sequential(nn.Conv2d(1, 1, 1)), path)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.container\.Sequential.*refuses"):
        read_state_dict(path)


def test_non_tensor_entries_are_refused(scratch):
    path = scratch / "mixed.pth"
    torch.save({"weight": torch.ones(1), "note": "hello"}, path)
    with pytest.raises(ValueError, match=r"not tensors.*'note'"):
        read_state_dict(path)


def _torch_saved(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _safetensors(tensors) -> bytes:
    from safetensors.torch import save

    return save(tensors)


NEITHER = r"is neither a zip checkpoint \(torch.save\), a legacy pickle checkpoint .* nor safetensors"
STATE = {"w": torch.arange(4.0)}


@pytest.mark.parametrize("name, content, message", [
    ("text.pth", b"this is a README, not a checkpoint\n" * 8, NEITHER + r" \(it starts with b'this is '\)"),
    ("empty.pt", b"", NEITHER + r" \(it is empty\)"),
    ("plain_pickle.pth", pickle.dumps({"w": [1.0, 2.0]}), NEITHER),  # a pickle, but not torch's format
    ("zeros.safetensors", bytes(64), NEITHER),
    ("cut.pth", _torch_saved(STATE)[:300], r"cut.pth is a damaged zip checkpoint: RuntimeError: "),
    ("cut_legacy.pth", _torch_saved(STATE, _use_new_zipfile_serialization=False)[:40],
     r"cut_legacy.pth is a damaged legacy checkpoint"),
    ("cut.safetensors", _safetensors(STATE)[:-4], r"cut.safetensors is a damaged safetensors file"),
])
def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_state_dict(tmp_path / name)


@pytest.mark.parametrize("name, content", [
    ("legacy.pth", _torch_saved(STATE, _use_new_zipfile_serialization=False)),
    ("really_safetensors.pth", _safetensors(STATE)),  # the first bytes tell the format, not the suffix
])
def test_every_checkpoint_format_is_read(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    assert torch.equal(read_state_dict(tmp_path / name)["w"], STATE["w"])


def test_strict_load_lists_every_mismatch_and_loads_nothing():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}
    del state["1.running_var"]
    state["0.weight"] = torch.zeros(4, 2, 1, 1)
    state["2.weight"] = torch.zeros(3)
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_strict(model, state)
    text = str(err.value)
    assert "1 missing:\n  1.running_var" in text
    assert "1 unexpected:\n  2.weight" in text
    assert "1 misshaped:\n  0.weight: checkpoint (4, 2, 1, 1) vs model (4, 2, 3, 3)" in text
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_strict_load_applies_renames():
    model = nn.Sequential(nn.Linear(2, 2))
    load_state_dict_strict(model, {"old.weight": torch.eye(2), "old.bias": torch.ones(2)}, renames={"old.": "0."})
    assert torch.equal(model[0].weight.detach(), torch.eye(2))
    assert torch.equal(model[0].bias.detach(), torch.ones(2))


def test_unknown_suffix_is_refused(scratch):
    with pytest.raises(ValueError, match="unknown weights format '.bin'"):
        read_state_dict(scratch / "w.bin")
