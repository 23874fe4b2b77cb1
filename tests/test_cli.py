"""The ``ttswap`` command line, run in-process (one subprocess checks ``python -m ttswap``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import ttswap
from ttswap.cli import main
from ttswap.recipe import Recipe, shipped_recipes

RESBLOCK = ["ttswap.models.yolov4:ResBlock", "--model-kwargs", '{"channels": 16, "num_blocks": 1}',
            "--recipe", "yolov4", "--input-shape", "1,16,16,16", "--backend", "emulated", "--no-cache"]


def test_recipes_lists_each_shipped_recipe_with_its_description(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in shipped_recipes():
        recipe = Recipe.load(name)
        row = next(line for line in lines if line.startswith(name + " "))
        assert recipe.description in row and "x".join(map(str, recipe.input_shape)) in row


def test_convert_writes_the_report_and_a_loadable_save(tmp_path, capsys):
    report, saved = tmp_path / "report.json", tmp_path / "block.safetensors"
    assert main(["convert", *RESBLOCK, "--report", str(report), "--save", str(saved)]) == 0
    out, err = capsys.readouterr()
    assert "3 device layers (2 conv, 1 add); 0 fallback(s)" in out
    assert "ttswap: traced ResBlock" in err  # progress on stderr
    data = json.loads(report.read_text())
    assert data["model"] == "ResBlock" and data["input_shape"] == [1, 16, 16, 16] and data["fallbacks"] == []
    loaded = ttswap.load(saved, backend="emulated", cache=False)
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        assert ttswap.metrics.pcc(loaded(x), loaded.source.model(x)) > 0.99


def test_convert_with_auto_saves_the_tuned_recipe_and_converts_from_it(tmp_path, capsys):
    path = tmp_path / "resnet.toml"
    model = ["resnet10t", "--input-shape", "1,3,64,64", "--backend", "emulated", "--no-cache", "-q"]
    assert main(["convert", *model, "--recipe", "auto", "--save-recipe", str(path)]) == 0
    tuned = capsys.readouterr().out
    recipe = Recipe.load(path)
    assert recipe.description.startswith("auto-tuned for ResNet at [1, 3, 64, 64]")
    assert recipe.rules and all(rule.note.startswith("auto: ") for rule in recipe.rules)
    assert main(["convert", *model, "--recipe", str(path)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.split("; converted in")[0] == tuned.splitlines()[0].split("; converted in")[0]


def test_compare_on_a_timm_model_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "pcc.png"
    args = ["compare", "ese_vovnet19b_dw", "--recipe", "ese_vovnet", "--input-shape", "1,3,32,32",
            "--backend", "emulated", "--no-cache", "--json", str(out_json), "--plot", str(out_png), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert len(data["layers"]) > 30 and data["first_below"] == {"propagated": None, "isolated": None}
    assert {row["rewriter"] for row in data["layers"]} >= {"conv", "separable_conv"}
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "first below threshold: none" in out


def test_bench_prints_the_ratio(capsys):
    assert main(["bench", *RESBLOCK, "--repeat", "1", "-q"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert "converted / eager" in header
    assert float(row.split()[-1]) > 0


@pytest.mark.parametrize("argv, message", [
    (["convert", *RESBLOCK[:5], "--recipe", "no_such_recipe"], "no shipped recipe named 'no_such_recipe'"),
    (["convert", "no_such_model_xyz", "--recipe", "yolov4"], "neither a timm model name nor module:callable"),
    (["convert", *RESBLOCK, "--weights", "/no/such.pth"], "no weights file"),
    (["convert", *RESBLOCK, "--weights", "{tmp}/garbage.pth"],
     "garbage.pth is neither a zip checkpoint (torch.save), a legacy pickle checkpoint (torch.save before PyTorch "
     "1.6) nor safetensors (it starts with b'not a ch'); is it a weights file?"),
    (["convert", *RESBLOCK[:3], "--recipe", "{tmp}/bad.toml"],
     "bad.toml: [defaults]: field 'shard' has invalid value 'diagonal'; valid: 'height', 'block',"),
])
def test_errors_are_one_line_without_traceback(argv, message, capsys, tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint: " * 40)
    (tmp_path / "bad.toml").write_text('[defaults]\nshard = "diagonal"\n')
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("ttswap: error:")]
    assert message in line
    for place in ("bad.toml", "[defaults]", "garbage.pth"):
        assert line.count(place) <= 1  # each part of where the error is, said once
    assert main([*argv, "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cache_info_prune_and_clear(tmp_path, capsys):
    from ttswap.cache_store import max_bytes
    from ttswap.models.yolov4 import ResBlock

    cache = tmp_path / "cache"
    sizes = []
    for channels in (16, 32):  # two entries: the 16-channel one used first
        ttswap.convert(ResBlock(channels, 1).eval(), "yolov4", input_shape=(1, channels, 16, 16), backend="emulated",
                       cache=cache)
        sizes.append(sum(p.stat().st_size for p in cache.glob("*.safetensors")) - sum(sizes))
    oldest = min(cache.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    (cache / ".dead.safetensors.1.ab.tmp").write_bytes(b"x")  # a writer that died mid-write
    os.utime(cache / ".dead.safetensors.1.ab.tmp", (time.time() - 60,) * 2)

    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{cache}: 2 entries, {sum(sizes) / 1e3:.0f} kB of a {max_bytes() / 1e6:.1f} MB cap"
    header, _, newest, older = out[1:5]
    assert header.split() == ["last", "used", "size", "model", "recipe", "backend", "input", "key"]
    assert newest.split()[2:8] == [f"{sizes[1] / 1e3:.0f}", "kB", "ResBlock", "yolov4", "emulated", "1x32x16x16"]
    assert older.split()[-1] == oldest.stem[:12] and older.split()[2:4] == [f"{sizes[0] / 1e3:.0f}", "kB"]

    assert main(["cache", "prune", "--cache-dir", str(cache), "--max-bytes", str(sizes[1])]) == 0
    assert capsys.readouterr().out.startswith(f"{cache}: removed 1 entries ({sizes[0] / 1e3:.0f} kB) and 1 unfinished")
    assert not oldest.exists() and len(list(cache.iterdir())) == 1
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and list(cache.iterdir()) == []


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "x", "--recipe", "yolov4", "--input-shape", "1,3,32"])
    assert exit_info.value.code == 2
    assert "N,C,H,W" in capsys.readouterr().err


def test_python_dash_m_ttswap():
    result = subprocess.run([sys.executable, "-m", "ttswap", "recipes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in shipped_recipes())
