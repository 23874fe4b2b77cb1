"""Data parallel over a mesh of chips: ``ttswap.convert(..., mesh=(rows, cols))``.

Default tier: on the emulated backend a model converted for a mesh gives exactly one chip's values
(each image is computed alone either way), and a batch the chips cannot share is refused.
``ttnn_mock`` tier: both shipped models dispatch on a 2-chip n300 mesh and ESE-VoVNet on an 8-chip
T3K mesh, each in its own process (ttnn reads the mock board once per process), with the batch
sharded over the chips (``ShardTensorToMesh``), the weights replicated and the outputs gathered
(``ConcatMeshToTensor``); on the mock boards' 8x7 grid, smaller than the n150's 8x8 the recipes were
written for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ttswap
from ttswap import mock
from ttswap.backends.emulated import EmulatedBackend
from ttswap.config import DType, Fidelity, OpConfig
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

EXACT = Recipe(name="exact", defaults=OpConfig(weight_dtype=DType.BF16, fidelity=Fidelity.HIFI4, fp32_acc=True))
LOFI = Recipe(name="lofi", defaults=OpConfig(act_dtype=DType.BFP8_B, weight_dtype=DType.BFP8_B, fidelity=Fidelity.LOFI))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    block = lambda cin, cout, s: nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout),
                                               nn.ReLU())
    model = nn.Sequential(block(3, 16, 2), block(16, 32, 1), nn.MaxPool2d(2), block(32, 32, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("recipe,mesh", [(EXACT, (1, 2)), (LOFI, (2, 2))], ids=["exact-1x2", "bfp8-lofi-2x2"])
def test_a_mesh_gives_one_chips_values(recipe, mesh):
    model = small_net()
    chips = mesh[0] * mesh[1]
    shape = (2 * chips, 3, 32, 32)
    one = ttswap.convert(model, recipe, input_shape=shape, backend="emulated", cache=False)
    many = ttswap.convert(model, recipe, input_shape=shape, backend="emulated", mesh=mesh, cache=False)
    assert many.backend.mesh == mesh and many.backend.chips == chips
    x = torch.randn(shape)
    got = many(x)
    assert torch.equal(got, one(x))
    with torch.no_grad():
        assert pcc(got, model(x)) > (0.999 if recipe is EXACT else 0.98)
    # image by image, as one chip with batch 1 computes them
    single = ttswap.convert(model, recipe, input_shape=(1, 3, 32, 32), backend="emulated", cache=False)
    assert all(torch.equal(got[i:i + 1], single(x[i:i + 1])) for i in range(shape[0]))
    # and through the pipeline, which splits the same way
    assert torch.equal(many.pipeline()(x), got)


def test_a_batch_the_chips_cannot_share_is_refused():
    with pytest.raises(ValueError, match=r"batch of 3 cannot be split evenly over the 2 chips of mesh \(1, 2\)"):
        ttswap.convert(small_net(), EXACT, input_shape=(3, 3, 32, 32), backend="emulated", mesh=(1, 2), cache=False)
    with pytest.raises(ValueError, match=r"mesh must be \(rows, cols\)"):
        EmulatedBackend(mesh=(0, 2))
    with pytest.raises(ValueError, match=r"mesh=\(1, 2\) was asked for, but the emulated backend passed runs on mesh"):
        ttswap.convert(small_net(), EXACT, input_shape=(2, 3, 32, 32), backend=EmulatedBackend(), mesh=(1, 2))


# -- ttnn_mock: the shipped models on a mesh, one process per board ---------------------------------
RUN_ON_MESH = """
import json, sys, torch, timm, ttswap
from ttswap.models.yolov4 import YOLOv4
name, recipe, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
from ttswap.mock import board
b = board()
chips = b.chips
torch.manual_seed(0)
model = (YOLOv4() if name == "yolov4" else timm.create_model(name, pretrained=False)).eval()
converted = ttswap.convert(model, recipe, input_shape=(chips, 3, size, size), backend="ttnn", mesh=b.mesh_shape)
backend = converted.backend
out = converted(torch.rand(chips, 3, size, size))
outs = out if isinstance(out, tuple) else (out,)
with torch.no_grad():
    want = model(torch.zeros(chips, 3, size, size))
want = want if isinstance(want, tuple) else (want,)
print("RESULT", json.dumps({"devices": backend.device.get_num_devices(), "grid": list(backend.grid),
                            "shapes": [list(t.shape) for t in outs], "want": [list(t.shape) for t in want],
                            "mock": backend.mock}))
"""


def run_on_board(board: str, args: list[str], cwd: Path, timeout: int = 1500) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (mock.CLUSTER_ENV, mock.BOARD_ENV)}
    env[mock.BOARD_ENV] = board
    result = subprocess.run([sys.executable, "-c", RUN_ON_MESH, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-2000:], result.stderr[-4000:])
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("board,name,recipe,size", [
    ("n300", "ese_vovnet19b_dw", "ese_vovnet", 224),
    ("n300", "yolov4", "yolov4", 320),
    ("t3k", "ese_vovnet19b_dw", "ese_vovnet", 224),
], ids=["n300-vovnet", "n300-yolov4", "t3k-vovnet"])
def test_shipped_models_dispatch_on_a_mesh(board, name, recipe, size, tmp_path):
    pytest.importorskip("ttnn")
    from ttswap.backends import tenstorrent_device_present

    if tenstorrent_device_present():
        pytest.skip("a Tenstorrent device is present: mock boards are for machines without one")
    found = run_on_board(board, [name, recipe, str(size)], tmp_path)
    assert found["mock"] and found["devices"] == mock.BOARDS[board].chips
    assert found["grid"] == [8, 7]  # worker dispatch on a mock n300 chip: one row less than an n150
    assert found["shapes"] == found["want"]  # the whole batch gathered back, in torch's shapes


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("layout,nhw,channels,want_cores,want_shard", [
    ("height", 56 * 56, 64, 49, (64, 64)),  # 98 tile rows: 2 per core on 49 of the 56 cores (64 on 8x8)
    ("block", 28 * 28, 256, 8 * 7, (128, 32)),  # 8 channel tiles over x = 8; 25 tile rows over y <= 7
    ("width", 7 * 7, 1536, 48, (64, 32)),  # 48 channel tiles: the largest divisor within 56 cores
])
def test_reshards_fit_the_devices_grid(layout, nhw, channels, want_cores, want_shard):
    """Explicit reshards (``to_memory``) take their grid from the device: on the 8x7 grid of a mock n300
    chip they pick the largest grid within it that divides the work (worked out by hand above)."""
    pytest.importorskip("ttnn")
    from ttswap.backends.ttnn_backend import sharded_memory_config
    from ttswap.config import ShardLayout

    config = sharded_memory_config(nhw, channels, ShardLayout(layout), grid=(8, 7))
    spec = config.shard_spec
    box = spec.grid.bounding_box()
    assert box.end.x < 8 and box.end.y < 7
    assert spec.num_cores() == want_cores and tuple(spec.shape) == want_shard
