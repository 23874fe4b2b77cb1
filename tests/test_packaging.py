"""The wheel carries what an installed ttswap needs: the shipped recipes and the data files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_recipes_and_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("ttswap-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (ROOT / "recipes").glob("*.toml"):
        assert f"ttswap/recipes/{recipe.name}" in names
    for data in ("wormhole_n150_cluster.yaml", "mock_compiler.sh", "yolov4.cfg"):
        assert f"ttswap/data/{data}" in names
    # every module of the source tree, so that a new subpackage missing from pyproject's list fails here
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "ttswap").rglob("*.py")}
    assert modules - names == set()
