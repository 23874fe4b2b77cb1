"""The auto recipe on a small CNN: it meets its PCC target against torch fp32 on every sample, validates
on held-back samples and backs off when they fail, is never slower (by the cost model) than the most
accurate numerics with ttnn's default placement, says per layer what it chose and why, and fits layers
whose default placement does not fit L1. On a real model (ese_vovnet19b_dw) it is estimated no slower
than the shipped recipe at the same PCC bar."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import ttswap
from ttswap.tuning.auto import LADDER, AutoRecipe, LayerChoice, Rung, _moves, tune
from ttswap.backends.base import L1_ALLOCATABLE_BYTES
from ttswap.config import OpConfig
from ttswap.converter import ConversionError
from ttswap.tuning.report import estimate
from ttswap.metrics import pcc
from ttswap.recipe import Recipe, Rule

SHAPE = (1, 3, 28, 28)
TOP = Recipe(name="top", defaults=OpConfig(fidelity=LADDER[0].fidelity, weight_dtype=LADDER[0].weight_dtype,
                                           fp32_acc=LADDER[0].fp32_acc))


class Net(nn.Module):
    """A stem, an SE block, and a 992-channel pre-activation BatchNorm at 14x14: its depthwise 1x1
    weights do not fit L1 block-sharded (992 channels are 31 tiles, prime: one grid column)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.SiLU())
        self.expand = nn.Conv2d(32, 960, 1)
        self.norm = nn.BatchNorm2d(992)
        self.act = nn.ReLU()
        self.reduce = nn.Conv2d(992, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.conv(self.stem(x))
        x = self.act(self.norm(torch.cat([x, self.expand(x)], 1)))
        return self.fc(self.reduce(x).mean((2, 3)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # trained-looking statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.2)
    return net


@pytest.fixture(scope="module")
def samples():
    return torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def holdout():
    return torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tuning(model, samples, holdout):
    return tune(model, SHAPE, AutoRecipe(samples=samples, holdout=holdout, pcc_target=0.99, max_evaluations=8))


def worst_sample_pcc(converted, model, xs):
    with torch.no_grad():
        return min(pcc(converted(x[None])[0], model(x[None])[0]) for x in xs)


@pytest.fixture(scope="module")
def converted(model, tuning):
    return ttswap.convert(model, tuning.recipe, input_shape=SHAPE, backend="emulated", cache=False)


def test_default_placement_does_not_fit_the_wide_batchnorm(model):
    # set explicitly, ttnn's default choice for it (block) stops the conversion, naming the layer
    block = TOP.override("norm", shard="block")
    with pytest.raises(ConversionError, match=r"exceed the 1,360,544 B of L1 per core:\n  norm: "):
        ttswap.convert(model, block, input_shape=SHAPE, backend="emulated", cache=False)
    # left to "auto", a layout that fits is chosen, and a rule says why
    converted = ttswap.convert(model, TOP, input_shape=SHAPE, backend="emulated", cache=False)
    norm = next(r for r in converted.report.records
                if r.replacement == "batchnorm" and not any(n.startswith("absorbed") for n in r.notes))
    assert norm.config.shard.value == "width"
    assert any(n.startswith("shard auto: width, because block sharding needs ~") for n in norm.notes), norm.notes
    assert converted(torch.zeros(SHAPE)).shape == (1, 10)


def test_tuned_recipe_meets_its_pcc_target_on_every_sample(model, samples, holdout, tuning, converted):
    assert tuning.top_pcc >= 0.995
    assert tuning.bar == 0.99
    assert tuning.target == pytest.approx(tuning.top_pcc - 0.4 * (tuning.top_pcc - 0.99))  # 40% of the budget
    worst = worst_sample_pcc(converted, model, samples)
    if tuning.undone == 0:
        assert worst == pytest.approx(tuning.pcc, abs=1e-9)  # the search measured this very config
    assert worst >= tuning.target
    held = worst_sample_pcc(converted, model, holdout)
    assert held == pytest.approx(tuning.holdout_pcc, abs=1e-9)
    assert held >= tuning.holdout_target
    holdout_bar = min(0.99, 1 - 1.5 * (1 - tuning.holdout_top_pcc))
    room = tuning.holdout_top_pcc - holdout_bar
    assert tuning.holdout_target == pytest.approx(tuning.holdout_top_pcc - 0.6 * room)
    assert tuning.evaluations <= 8


def test_every_layer_fits_l1_and_is_explained(converted):
    roots = [r for r in converted.report.records if r.layer and not any(n.startswith("absorbed") for n in r.notes)]
    assert roots
    for record in roots:
        assert any(n.startswith("auto: ") for n in record.notes), record
        assert record.l1_bytes is None or record.l1_bytes <= L1_ALLOCATABLE_BYTES
    norm = next(r for r in roots if r.replacement == "batchnorm")
    assert norm.config.shard.value == "width"  # the layout that fits
    assert "fitting layouts" in " ".join(norm.notes)


def test_no_slower_than_the_most_accurate_rung_with_the_same_layouts(model, tuning, converted):
    layouts = [Rule(r.match, {k: v for k, v in r.overrides.items() if k in ("shard", "act_block_h")}, r.ops)
               for r in tuning.recipe.rules]
    layouts_only = Recipe(name="top", defaults=TOP.defaults, rules=layouts)
    top = ttswap.convert(model, layouts_only, input_shape=SHAPE, backend="emulated", cache=False)
    auto_s, top_s = estimate(converted).device_seconds, estimate(top).device_seconds
    assert auto_s <= top_s
    total = sum(c.seconds[c.rung] for c in tuning.choices.values())
    assert total == pytest.approx(auto_s, rel=0.02)  # what the description claims is what the model costs


def test_unreachable_target_becomes_relative(model, samples):
    tuning = tune(model, SHAPE, AutoRecipe(samples=samples[:1], pcc_target=1.0, max_evaluations=3))
    assert tuning.bar == pytest.approx(1 - 1.5 * (1 - tuning.top_pcc))  # lose at most half as much again
    assert tuning.target == pytest.approx(1 - 1.2 * (1 - tuning.top_pcc))  # the search spends 40% of that
    assert "so at most 1.5x their error" in tuning.recipe.description
    assert tuning.pcc >= tuning.target


def test_convert_accepts_auto_by_name_and_as_a_recipe(model, samples):
    assert isinstance(Recipe.load("auto"), AutoRecipe)
    converted = ttswap.convert(model, AutoRecipe(samples=samples[:1], max_evaluations=2), input_shape=SHAPE,
                               backend="emulated", cache=False)
    assert converted.recipe.description.startswith("auto-tuned for Net")
    assert converted.report.fallbacks == []


def test_tuning_reports_progress_and_only_the_final_conversion(model, samples, caplog):
    with caplog.at_level("INFO", logger="ttswap"):
        ttswap.convert(model, AutoRecipe(samples=samples[:1], max_evaluations=2), input_shape=SHAPE,
                       backend="emulated", cache=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("auto recipe: tuning evaluation 1 of at most 2: 0 layer(s) below the top rung")
               for line in lines)
    assert sum("device layers" in line for line in lines) == 1  # the search's own conversions stay quiet


def test_samples_must_match_the_input_shape(model):
    with pytest.raises(ValueError, match="samples have shape"):
        tune(model, SHAPE, AutoRecipe(samples=torch.zeros(2, 3, 32, 32)))


def test_moves_go_down_each_layers_hull_best_value_first():
    us = 1e-6
    a = LayerChoice("a", "conv", seconds=[10 * us, 9 * us, 9 * us, 5 * us, 2 * us], errors=[0, 0.01, 0.01, 0.02, 0.2])
    b = LayerChoice("b", "conv", seconds=[10 * us, 10 * us, 10 * us, 10 * us, 1 * us], errors=[0, 0, 0, 0, 0.01])
    moves = _moves({("a", "conv"): a, ("b", "conv"): b})
    # a: to HiFi2 (rung 3) saves 5 us for 4e-4; then LoFi saves 3 us for 0.0396. b: LoFi saves 9 us for 1e-4.
    assert [(group[0], rung) for group, rung, _ in moves] == [("b", 4), ("a", 3), ("a", 4)]
    assert [saving / us for _, _, saving in moves] == pytest.approx([9, 5, 3])


def test_rungs_run_most_accurate_first():
    assert LADDER[0] == Rung(LADDER[0].fidelity, LADDER[0].weight_dtype, True)
    assert [str(r) for r in LADDER] == ["HiFi4 bf16 fp32-acc", "HiFi4 bf16", "HiFi4 bfp8_b", "HiFi2 bfp8_b",
                                        "LoFi bfp8_b"]


def test_tuned_recipe_round_trips_through_its_tables_notes_included(tuning):
    again = Recipe.from_dict(tuning.recipe.to_tables(), source="saved")
    assert [(r.match, r.ops, r.overrides, r.note) for r in again.rules] == \
        [(r.match, r.ops, r.overrides, r.note) for r in tuning.recipe.rules]
    assert again.defaults == tuning.recipe.defaults


def test_tuned_recipe_written_as_a_file_converts_the_same(model, samples, tuning, converted, tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(tuning.recipe.to_toml())
    again = ttswap.convert(model, path, input_shape=SHAPE, backend="emulated", cache=False)
    assert [(r.layer, r.config) for r in again.report.records] == \
        [(r.layer, r.config) for r in converted.report.records]
    assert torch.equal(again(samples[:1]), converted(samples[:1]))
    assert any("auto: " in n for r in again.report.records for n in r.notes)  # the why travels with the file


@pytest.mark.ttnn_mock
def test_tuned_layouts_fit_l1_on_ttnn_itself(model, tuning, converted):
    # the tuner checks L1 with the emulated estimate; ttnn's allocator has the last word
    pytest.importorskip("ttnn", reason="ttnn is not installed (pip install 'ttswap[tt]')")
    from ttswap.mock import ensure_mock_mode

    ensure_mock_mode()
    on_ttnn = ttswap.convert(model, tuning.recipe, input_shape=SHAPE, backend="ttnn", cache=False)
    try:
        assert on_ttnn(torch.zeros(SHAPE)).shape == (1, 10)  # raises, naming the layer, where L1 overflows
        assert [(r.layer, r.config) for r in on_ttnn.report.records] == \
            [(r.layer, r.config) for r in converted.report.records]
    finally:
        on_ttnn.backend.close()


@pytest.mark.parametrize("top_pcc, bar, target", [
    (0.9999, 0.99, 0.99594),  # 40% of the way from the top rung to 0.99
    (0.9905, 0.98575, 0.9886),  # 0.99 would leave almost no room: at most 1.5x the top rung's error
    (0.98, 0.97, 0.976),  # the top rung misses 0.99: at most 1.5x its error, and the search aims at 1.2x
])
def test_target_follows_the_room_the_top_rung_leaves(model, samples, monkeypatch, top_pcc, bar, target):
    from ttswap.tuning import auto

    def fake(self, assignment, floors=None):
        self.per_sample, self.passed = dict.fromkeys(range(len(self.batches)), top_pcc), True
        return top_pcc

    monkeypatch.setattr(auto._Evaluator, "__call__", fake)
    tuning = tune(model, SHAPE, AutoRecipe(samples=samples[:1], max_evaluations=1))
    assert (tuning.bar, tuning.target) == (pytest.approx(bar), pytest.approx(target))


@pytest.mark.slow
def test_beats_the_shipped_recipe_on_a_real_model():
    """The issue's bar on ese_vovnet19b_dw (realistic weights): "auto" by name is estimated no slower
    than the shipped ese_vovnet recipe and keeps logits PCC >= 0.99 on crops it did not tune on.
    benchmarks/auto_recipe.py measures the whole family and YOLOv4."""
    timm = pytest.importorskip("timm")
    from ttswap.calibration import recalibrate_batchnorm, sample_batch

    shape = (1, 3, 224, 224)
    vovnet = recalibrate_batchnorm(timm.create_model("ese_vovnet19b_dw", pretrained=False).eval(),
                                   sample_batch(shape[2:]))
    auto = ttswap.convert(vovnet, "auto", input_shape=shape, backend="emulated", cache=False)
    shipped = ttswap.convert(vovnet, "ese_vovnet", input_shape=shape, backend="emulated", cache=False)
    assert estimate(auto).fps >= estimate(shipped).fps
    held_out = sample_batch(shape[2:], crops=2)[1::2]  # shifted crops of the photos "auto" tuned on
    with torch.no_grad():
        want = vovnet(held_out)
    assert pcc(torch.cat([auto(x[None]) for x in held_out]), want) >= 0.99


def test_numerics_worth_less_than_the_minimum_gain_are_not_traded(model, samples):
    tuning = tune(model, SHAPE, AutoRecipe(samples=samples[:1], max_evaluations=4, min_numerics_gain=0.99))
    assert tuning.evaluations == 1  # the top rung's: no search can save 99%
    assert all(choice.rung == 0 for choice in tuning.choices.values())
    assert tuning.pcc == tuning.top_pcc
    assert "worth any accuracy" in tuning.recipe.description
    assert all("worth any accuracy" in rule.note for rule in tuning.recipe.rules)


def test_a_layer_short_of_l1_on_the_target_backend_gives_up_fp32_accumulation_then_its_layout(model, samples, tuning):
    from ttswap.tuning.auto import fit_on
    from ttswap.backends.base import L1BudgetError
    from ttswap.backends.emulated import EmulatedBackend

    class Fragmented(EmulatedBackend):
        """Refuses the stem conv while it keeps fp32 accumulation, as a fragmented L1 would."""

        def conv2d(self, x, weights, spec, cfg, layer, activation=None):
            if layer == "stem" and cfg.fp32_acc:
                raise L1BudgetError(layer, 600_000, 500_000, "clash")
            return super().conv2d(x, weights, spec, cfg, layer, activation)

    fitted = fit_on(Fragmented(), model, tuning, SHAPE)
    converted = ttswap.convert(model, fitted, input_shape=SHAPE, backend="emulated", cache=False)
    stem = next(r for r in converted.report.records if r.layer == "stem" and any("auto: " in n for n in r.notes))
    assert stem.config.fp32_acc is False
    assert any("needs 600,000 B of L1 where 500,000 B are free (fragmentation)" in n for n in stem.notes), stem.notes
    others = {r.layer: r.config for r in converted.report.records if r.layer != "stem"}
    original = ttswap.convert(model, tuning.recipe, input_shape=SHAPE, backend="emulated", cache=False)
    assert others == {r.layer: r.config for r in original.report.records if r.layer != "stem"}


def test_held_back_samples_that_fail_undo_the_cheapest_moves_first(model, samples, monkeypatch):
    from ttswap.tuning import auto

    def fake(self, assignment, floors=None):
        self.count += 1
        lowered = sum(1 for rung in assignment.values() if rung)
        # every move passes the tuning samples; the held-back ones allow two layers below the top rung
        value = 0.9999 if self.name == "tuning" or lowered <= 2 else 0.95
        self.per_sample = dict.fromkeys(range(len(self.batches)), value)
        self.passed = floors is None or all(value >= f for f in floors)
        return value

    monkeypatch.setattr(auto._Evaluator, "__call__", fake)
    settings = AutoRecipe(samples=samples[:2], holdout=samples[2:], max_evaluations=4, min_numerics_gain=0.0)
    tuning = tune(model, SHAPE, settings)
    lowered = [c for c in tuning.choices.values() if c.rung]
    assert len(lowered) == 2 and tuning.undone > 0
    first_two = []
    for group, _, _ in auto._moves(tuning.choices):  # the most valuable moves, in the order they were taken
        if group not in first_two:
            first_two.append(group)
    assert {(c.layer, c.rewriter) for c in lowered} <= set(first_two[:3])
    undone = [c for c in tuning.choices.values() if c.undone is not None]
    assert undone and all("held-back samples" in c.note() for c in undone)
    assert f"after undoing {tuning.undone} move(s)" in tuning.recipe.description
    assert tuning.validations <= (tuning.undone + 2).bit_length() + 3  # bisection, not one by one


def test_the_worst_sample_decides_not_the_pooled_pcc(model, samples, tuning):
    from ttswap.tuning.auto import _Evaluator

    # a sample whose output is nearly constant makes its own PCC fragile; pooled with others it hides
    noise = torch.randn(1, *SHAPE[1:], generator=torch.Generator().manual_seed(3))
    dull = torch.full((1, *SHAPE[1:]), 0.1) + 1e-3 * noise
    evaluator = _Evaluator(tuning_hybrid(model, tuning), model, [samples[:1], dull], budget=4, name="test")
    lowest = {group: len(LADDER) - 1 for group in tuning.choices}
    worst = evaluator(lowest)
    outputs = [evaluator.hybrid.model(x) for x in (samples[:1], dull)]
    per_sample = [pcc(o[0], r[0][0]) for o, r in zip(outputs, evaluator.reference)]
    assert worst == pytest.approx(min(per_sample))
    assert worst <= pcc(torch.cat(outputs), torch.cat([r[0] for r in evaluator.reference]))


def tuning_hybrid(model, tuning):
    from ttswap.backends.emulated import EmulatedBackend
    from ttswap.tuning.auto import _build_variants

    base = dataclasses.replace(tuning.recipe, rules=[])
    return _build_variants(model, base, tuning.choices, SHAPE, EmulatedBackend())[0]


def test_default_samples_are_varied_and_held_back_ones_differ():
    from ttswap.tuning.samples import sample_sets

    sets = sample_sets((1, 3, 64, 64))
    tuning, held = torch.cat(sets.tuning), torch.cat(sets.holdout)
    assert sets.counts == (8, 4)
    assert not any(torch.equal(a, b) for a in tuning for b in held)
    # photos, textures, synthetic 1/f images: the per-image statistics spread, no two images alike
    stds = tuning.flatten(1).std(1)
    assert stds.max() / stds.min() > 1.2
    assert len({round(float(v), 4) for v in tuning.flatten(1).mean(1)}) == 8
    user = sample_sets((2, 3, 8, 8), torch.zeros(8, 3, 8, 8))  # 4 batches of 2: the last one held back
    assert [len(b) for b in user.tuning] == [2, 2, 2] and [len(b) for b in user.holdout] == [2]


def test_tuning_converts_a_fixed_number_of_times_whatever_the_depth(samples, monkeypatch):
    # the search reuses two conversions (bf16 and bfloat8_b weights) for every evaluation, so its
    # conversions do not grow with the layers; its forward passes grow linearly (evaluations x layers)
    from ttswap.tuning import auto

    conversions = []
    real = auto.convert
    monkeypatch.setattr(auto, "convert", lambda *a, **k: conversions.append(1) or real(*a, **k))

    def deep(blocks: int) -> nn.Module:
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()

    counts = []
    for blocks in (1, 6):
        conversions.clear()
        tuning = tune(deep(blocks), SHAPE, AutoRecipe(samples=samples[:2], holdout=samples[2:], max_evaluations=6))
        counts.append((len(conversions), tuning.evaluations))
    assert counts[0][0] == counts[1][0] == 3  # observe, then the two weight dtypes
    assert all(evaluations <= 6 for _, evaluations in counts)
