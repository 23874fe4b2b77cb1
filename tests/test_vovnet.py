"""ESE-VoVNet family end to end on the emulated backend, with realistic weights (timm random init,
BatchNorm statistics recalibrated on sample images), against torch fp32."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

import ttswap
from ttswap.calibration import make_batchnorm_ill_conditioned, recalibrate_batchnorm, sample_batch
from ttswap.converter import ConversionError
from ttswap.metrics import pcc
from ttswap.recipe import Recipe

FAMILY = ["ese_vovnet19b_dw", "ese_vovnet19b_slim", "ese_vovnet19b_slim_dw", "ese_vovnet39b", "ese_vovnet57b",
          "ese_vovnet99b", "vovnet39a", "vovnet57a"]


def realistic(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    return recalibrate_batchnorm(model, sample_batch((224, 224), crops=2))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return sample_batch((224, 224))  # astronaut, coffee, chelsea, rocket


@pytest.fixture(scope="module")
def vovnet19() -> nn.Module:
    return realistic("ese_vovnet19b_dw")


def run_each(converted, images: torch.Tensor) -> torch.Tensor:
    n = converted.input_shape[0]
    return torch.cat([converted(images[i:i + n]) for i in range(0, len(images), n)])


def reference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("name", FAMILY)
def test_family_converts_fully_on_device(name):
    converted = ttswap.convert(timm.create_model(name, pretrained=False), "ese_vovnet", backend="emulated")
    report = converted.report
    assert report.fallbacks == []
    assert (report.transfers.uploads, report.transfers.downloads) == (1, 1)
    kinds = {r.replacement for r in report.records}
    assert {"conv", "concat", "maxpool", "classifier_head"} <= kinds
    if name.startswith("ese_"):
        assert "squeeze_excite" in kinds
    # every traced compute node is accounted for by a device layer
    assert all(r.layer for r in report.records if r.replacement not in ("input", "output", "constant"))


def test_shipped_recipe_accuracy_and_on_device_chaining(vovnet19, images):
    converted = ttswap.convert(vovnet19, "ese_vovnet", backend="emulated")
    out = run_each(converted, images)
    ref = reference(vovnet19, images)
    assert pcc(out, ref) >= 0.99
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert (converted.transfer_counter.uploads, converted.transfer_counter.downloads) == (4, 4)  # 1 + 1 per forward


def test_residual_variant_accuracy(images):
    model = realistic("vovnet39a")  # the most precision-sensitive member that meets the bar
    converted = ttswap.convert(model, "ese_vovnet", backend="emulated")
    assert pcc(run_each(converted, images[:2]), reference(model, images[:2])) >= 0.99


def test_report_starting_point_is_what_hardware_measured(vovnet19, images):
    """The hand-written model's config (bfp8_b weights, LoFi, bf16 accumulation) lands where its
    hardware test did (PCC 0.79), far below torch bf16 (0.9986 on the same images): the fidelity
    model is what makes the shipped recipe's choices. Measured here: 0.764 (the bar allows the
    emulator +-0.04 of that, never the bf16 floor)."""
    recipe = Recipe.load("ese_vovnet").override(weight_dtype="bfp8_b", fidelity="LoFi", fp32_acc=False,
                                                packer_l1_acc=False)
    converted = ttswap.convert(vovnet19, recipe, backend="emulated")
    assert 0.72 < pcc(run_each(converted, images[:2]), reference(vovnet19, images[:2])) < 0.81


def test_shipped_recipe_matches_torch_bf16(vovnet19, images):
    """bf16 storage bounds any bf16 device: compare with torch itself under bf16 autocast on the
    same inputs (0.99875 here; the shipped recipe measured 0.99875). Without packer_l1_acc a 3x3
    conv's partial sums pass through bf16 twice (0.99858): that would fail the second bar."""
    out = run_each(ttswap.convert(vovnet19, "ese_vovnet", backend="emulated"), images)
    ref = reference(vovnet19, images)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        torch_bf16 = vovnet19(images).float()
    assert pcc(out, ref) >= min(0.99, pcc(torch_bf16, ref))
    assert pcc(out, ref) >= pcc(torch_bf16, ref) - 0.0001


def test_batch_two(vovnet19, images):
    converted = ttswap.convert(vovnet19, "ese_vovnet", input_shape=(2, 3, 224, 224), backend="emulated")
    assert converted.report.fallbacks == []
    out = run_each(converted, images)
    assert out.shape == (4, 1000)
    assert pcc(out, reference(vovnet19, images)) >= 0.99


def test_ill_conditioned_batchnorm(images):
    model = make_batchnorm_ill_conditioned(realistic("ese_vovnet19b_dw"))
    ref = reference(model, images[:2])
    shipped = ttswap.convert(model, "ese_vovnet", backend="emulated")
    assert pcc(run_each(shipped, images[:2]), ref) >= 0.98
    # Switched to bfloat8_b weights, the guard keeps the layers whose exponent blocks the stretched
    # channels would ruin in bf16, and that measurably helps.
    bfp8 = Recipe.load("ese_vovnet").override(weight_dtype="bfp8_b")
    guarded = ttswap.convert(model, bfp8, backend="emulated")
    kept = [r for r in guarded.report.records if any("bf16 weights: bfp8_b would put" in n for n in r.notes)]
    assert kept, "the guard should have kept some layers in bf16"
    guarded_pcc = pcc(run_each(guarded, images[:2]), ref)
    unguarded = ttswap.convert(model, Recipe(**{**bfp8.__dict__, "bfp8_guard": None}), backend="emulated")
    assert pcc(run_each(unguarded, images[:2]), ref) < guarded_pcc


def test_user_model_is_never_mutated(vovnet19):
    model = copy.deepcopy(vovnet19).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ttswap.convert(model, "ese_vovnet", backend="emulated")
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.eval()(torch.zeros(1, 3, 224, 224))  # still runs as torch


def test_strict_lists_every_fallback_and_why():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return torch.flip(y, dims=[3]).cumsum(2)

    model = Odd().eval()
    lenient = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 32, 32), backend="emulated")
    assert lenient.report.fallbacks == ["flip", "cumsum"]
    assert (lenient.report.transfers.uploads, lenient.report.transfers.downloads) == (1, 1)
    x = torch.randn(1, 3, 32, 32)
    assert pcc(lenient(x), model(x)) > 0.999
    with pytest.raises(ConversionError) as err:
        ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 32, 32), backend="emulated", strict=True)
    assert "flip" in str(err.value) and "cumsum" in str(err.value) and "no rewriter matches" in str(err.value)


def test_bad_inputs_get_clear_errors(vovnet19):
    converted = ttswap.convert(vovnet19, "ese_vovnet", backend="emulated")
    with pytest.raises(ValueError, match=r"converted for input shape \[1, 3, 224, 224\]"):
        converted(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="input_shape"):
        ttswap.convert(vovnet19, "ese_vovnet", input_shape=(1, 3, 224), backend="emulated")
    with pytest.raises(TypeError, match="nn.Module"):
        ttswap.convert("ese_vovnet19b_dw", "ese_vovnet")
    with pytest.raises(ValueError, match="backend"):
        ttswap.convert(vovnet19, "ese_vovnet", backend="cuda")


def test_oversized_override_is_rejected_naming_layer_and_rule(vovnet19):
    recipe = Recipe.load("ese_vovnet").override("stages.0.blocks.0.conv_mid.1", act_block_h=4096)
    with pytest.raises(ConversionError) as err:
        ttswap.convert(vovnet19, recipe, backend="emulated")
    assert "stages.0.blocks.0.conv_mid.1" in str(err.value) and "override('stages.0.blocks.0.conv_mid.1')" in str(err.value)


def test_report_lists_every_node_with_config(vovnet19):
    converted = ttswap.convert(vovnet19, "ese_vovnet", backend="emulated")
    report = converted.report
    by_layer = {r.layer: r for r in report.records if r.layer}
    se = [r for r in report.records if r.layer == "stages.3.blocks.0.attn"]
    assert sorted(r.op for r in se) == ["Conv2d stages.3.blocks.0.attn.fc", "Hardsigmoid stages.3.blocks.0.attn.gate", "mean", "mul"]
    assert by_layer["stages.1.pool"].replacement == "maxpool" and "ceil" in " ".join(by_layer["stages.1.pool"].notes)
    assert by_layer["head"].replacement == "classifier_head"
    text = report.table()
    for column in ("replacement", "shard", "weights", "fidelity", "L1/core"):
        assert column in text
    data = json.loads(report.to_json())
    assert data["transfers"] == {"uploads": 1, "downloads": 1} and data["fallbacks"] == []
    assert len(data["nodes"]) == len(report.records)
    conv = next(n for n in data["nodes"] if n["layer"] == "stem.0" and n["l1_bytes_per_core"])
    assert conv["config"]["fidelity"] == "HiFi4" and conv["config"]["act_block_h"] == 32


def test_classify_example_loads_a_local_safetensors_file(tmp_path, vovnet19, capsys):
    """The example's real loading path, on a weights file this test writes."""
    import importlib.util

    from safetensors.torch import save_file

    path = tmp_path / "ese_vovnet19b_dw.safetensors"
    save_file({k: v.contiguous() for k, v in vovnet19.state_dict().items()}, str(path))
    spec = importlib.util.spec_from_file_location("classify_vovnet", "examples/classify_vovnet.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--weights", str(path), "--image", "chelsea", "--backend", "emulated"])
    out = capsys.readouterr().out
    assert f"loaded weights from {path}" in out
    value = float(out.split("logits PCC vs torch fp32:")[1].split()[0])
    assert value >= 0.99
