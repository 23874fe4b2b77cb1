"""The mock boards ttswap ships (``ttswap.mock.BOARDS``): n150, n300 and T3K cluster descriptors.

Default tier: the descriptors against facts about the hardware that do not come from ttswap (UMD's
rule that an n150 has one harvested Tensix row and an n300 chip two; a T3K is four n300 boards, eight
chips in a 2x4 ethernet mesh with one PCIe chip per board), and the board selection rules.
``ttnn_mock`` tier: each board opened by ttnn itself, in a subprocess (ttnn reads the board once per
process): the chip count ttnn sees, and the worker grid against the one ttnn's own core descriptor
gives for worker-row dispatch on that product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ttswap import mock

HARVESTED_ROWS = {"n150": 1, "n300": 2}  # UMD: "Board n300 expects 2 units" of Tensix harvesting
TENSIX_ROWS = 10  # Wormhole b0: 10 rows of 8 Tensix cores


def descriptor(name: str) -> dict:
    return yaml.safe_load(mock.BOARDS[name].descriptor.read_text())


@pytest.mark.parametrize("name", sorted(mock.BOARDS))
def test_descriptor_describes_the_board(name):
    board, desc = mock.BOARDS[name], descriptor(name)
    chips = sorted(desc["arch"])
    assert chips == list(range(board.chips))
    assert set(desc["arch"].values()) == {"wormhole_b0"}
    assert sorted(desc["chips"]) == chips and sorted(desc["harvesting"]) == chips
    for chip, harvest in desc["harvesting"].items():
        mask = harvest["harvest_mask"]
        board_type = desc["chip_to_boardtype"][chip]
        assert mask < 1 << TENSIX_ROWS
        assert bin(mask).count("1") == HARVESTED_ROWS[board_type], f"chip {chip} ({board_type}): mask {mask:#b}"
    # every chip on exactly one board, of its own type; a board of n300 type holds two chips
    on_boards = [entry for b in desc["boards"] for entry in b if "chips" in entry]
    placed = sorted(c for entry in on_boards for c in entry["chips"])
    assert placed == chips
    for b in desc["boards"]:
        fields = {k: v for entry in b for k, v in entry.items()}
        assert {desc["chip_to_boardtype"][c] for c in fields["chips"]} == {fields["board_type"]}
        assert len(fields["chips"]) == {"n150": 1, "n300": 2}[fields["board_type"]]


@pytest.mark.parametrize("name", sorted(mock.BOARDS))
def test_every_chip_is_reached_from_pcie_over_ethernet(name):
    desc = descriptor(name)
    links = [(a["chip"], a["chan"], b["chip"], b["chan"]) for a, b in desc["ethernet_connections"]]
    ports = [(c, ch) for a, ca, b, cb in links for c, ch in ((a, ca), (b, cb))]
    assert len(ports) == len(set(ports)), "an ethernet channel used twice"
    mmio = {chip for entry in desc["chips_with_mmio"] for chip in entry}
    reached, frontier = set(mmio), list(mmio)
    while frontier:
        chip = frontier.pop()
        for a, _, b, _ in links:
            for here, there in ((a, b), (b, a)):
                if here == chip and there not in reached:
                    reached.add(there)
                    frontier.append(there)
    assert reached == set(desc["arch"])
    # one PCIe chip per board
    assert len(mmio) == len(desc["boards"])


def test_t3k_is_a_2x4_ring_of_n300_boards():
    desc = descriptor("t3k")
    neighbours: dict[int, set[int]] = {}
    for a, b in desc["ethernet_connections"]:
        neighbours.setdefault(a["chip"], set()).add(b["chip"])
        neighbours.setdefault(b["chip"], set()).add(a["chip"])
    # 2x4 mesh: four corner chips with 2 neighbours, four middle chips with 3; two links per pair
    assert sorted(len(n) for n in neighbours.values()) == [2, 2, 2, 2, 3, 3, 3, 3]
    assert len(desc["ethernet_connections"]) == 2 * sum(len(n) for n in neighbours.values()) // 2


def test_board_selection(monkeypatch):
    monkeypatch.delenv(mock.BOARD_ENV, raising=False)
    assert mock.board().name == "n150"
    monkeypatch.setenv(mock.BOARD_ENV, "T3K")
    assert mock.board().name == "t3k" and mock.board().chips == 8
    assert mock.board("n300").mesh_shape == (1, 2)
    with pytest.raises(mock.MockSetupError, match="unknown mock board 'n400'.*n150, n300, t3k"):
        mock.board("n400")


def test_a_second_board_in_one_process_is_refused(monkeypatch):
    monkeypatch.setenv(mock.CLUSTER_ENV, str(mock.BOARDS["n150"].descriptor))
    with pytest.raises(mock.MockSetupError, match="'n300' asked for.*once per process"):
        mock.ensure_mock_mode("n300")
    monkeypatch.setenv(mock.CLUSTER_ENV, str(mock.BOARDS["t3k"].descriptor))
    assert mock.current_board().name == "t3k"


# -- ttnn_mock: ttnn opens each board ----------------------------------------------------------------
def run_on_board(board: str, code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose mock mode is ``board`` (the board is process-global)."""
    env = {k: v for k, v in os.environ.items() if k not in (mock.CLUSTER_ENV, mock.BOARD_ENV)}
    env[mock.BOARD_ENV] = board
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


OPEN_BOARD = """
import json, torch, ttnn
from ttswap.mock import ensure_mock_mode, board
b = board()
ensure_mock_mode()
kind = {"worker": ttnn.DispatchCoreType.WORKER, "ethernet": ttnn.DispatchCoreType.ETH}[b.dispatch]
mesh = ttnn.open_mesh_device(ttnn.MeshShape(*b.mesh_shape), l1_small_size=32768,
                             dispatch_core_config=ttnn.DispatchCoreConfig(kind, ttnn.DispatchCoreAxis.ROW))
grid = mesh.compute_with_storage_grid_size()
x = torch.arange(b.chips * 32 * 64, dtype=torch.float32).reshape(b.chips, 1, 32, 64) - 1000
t = ttnn.from_torch(x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=mesh,
                    mesh_mapper=ttnn.ShardTensorToMesh(mesh, dim=0))
y = ttnn.to_torch(ttnn.relu(t), mesh_composer=ttnn.ConcatMeshToTensor(mesh, dim=0))
print("RESULT", json.dumps({"devices": ttnn.get_num_devices(), "mesh": mesh.get_num_devices(),
                            "grid": [grid.x, grid.y], "shape": list(y.shape)}))
ttnn.close_mesh_device(mesh)
"""


def _core_descriptor_grid(product: str) -> list[int]:
    """The worker grid ttnn's own core descriptor gives ``product`` with one command queue and dispatch
    on a worker row (``compute_with_storage_grid_range``)."""
    import importlib.util

    ttnn_dir = Path(importlib.util.find_spec("ttnn").origin).parent
    cores = yaml.safe_load((ttnn_dir / "tt_metal" / "core_descriptors" / "wormhole_b0_80_arch.yaml").read_text())
    end = cores[product]["row"][1]["compute_with_storage_grid_range"]["end"]
    return [end[0] + 1, end[1] + 1]


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("name,product", [("n300", "nebula_x2"), ("t3k", "nebula_x2")])
def test_ttnn_opens_the_board(name, product, tmp_path):
    pytest.importorskip("ttnn")
    board = mock.BOARDS[name]
    result = run_on_board(name, OPEN_BOARD, tmp_path)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    found = json.loads(lines[0][len("RESULT "):])
    assert found["devices"] == found["mesh"] == board.chips
    assert found["grid"] == _core_descriptor_grid(product) == [8, 7]
    assert found["shape"] == [board.chips, 1, 32, 64]


@pytest.mark.ttnn_mock
def test_mock_cli_prints_the_board(tmp_path):
    pytest.importorskip("ttnn")
    env = {k: v for k, v in os.environ.items() if k not in (mock.CLUSTER_ENV, mock.BOARD_ENV)}
    result = subprocess.run([sys.executable, "-m", "ttswap.mock", "--board", "t3k"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"export {mock.BOARD_ENV}=t3k" in result.stdout
    assert f"export {mock.CLUSTER_ENV}={mock.BOARDS['t3k'].descriptor}" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "ttswap.mock", "--board", "n400"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "invalid choice: 'n400'" in bad.stderr
