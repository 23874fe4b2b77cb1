"""Recipe files: parsing into typed configs, rule resolution, and errors that name file, rule and field."""

from __future__ import annotations

import pytest

from ttswap.config import DType, Fidelity, ShardLayout, resolve_auto_shard
from ttswap.recipe import Recipe, RecipeError, shipped_recipes

GOOD = """
[recipe]
name = "demo"
input_shape = [1, 3, 64, 64]

[defaults]
weight_dtype = "bfp8_b"
fidelity = "LoFi"
shard = "height"

[[rules]]
match = "stages.*"
shard = "block"

[[rules]]
match = "stages.3.*"
op = "conv"
fidelity = "HiFi4"
act_block_h = 64

[resolutions."640x640"]
rules = [{ match = "stages.3.*", act_block_h = 128 }]
"""


def test_shipped_recipe_found_by_name():
    assert "ese_vovnet" in shipped_recipes()
    recipe = Recipe.load("ese_vovnet")
    assert recipe.name == "ese_vovnet"
    assert recipe.input_shape == (1, 3, 224, 224)
    assert recipe.defaults.weight_dtype is DType.BF16 and recipe.defaults.fidelity is Fidelity.HIFI4


def test_rules_apply_in_order_with_globs_and_op_filter():
    recipe = Recipe.from_toml(GOOD, "demo.toml")
    stem = recipe.resolve("stem.0", "conv", nhw=4096, channels=64)
    assert stem.config.shard is ShardLayout.HEIGHT and stem.rules == ()
    mid = recipe.resolve("stages.1.blocks.0", "conv", nhw=1024, channels=128)
    assert mid.config.shard is ShardLayout.BLOCK and mid.config.fidelity is Fidelity.LOFI
    deep = recipe.resolve("stages.3.blocks.0", "conv", nhw=49, channels=1024)
    assert deep.config.fidelity is Fidelity.HIFI4 and deep.config.act_block_h == 64
    assert deep.rules == ("rules[0] 'stages.*'", "rules[1] 'stages.3.*'")
    # the op filter keeps the conv-only rule off a concat in the same block
    cat = recipe.resolve("stages.3.blocks.0.conv_mid.cat", "concat", nhw=49, channels=1024)
    assert cat.config.fidelity is Fidelity.LOFI


def test_resolution_sections_apply_only_at_their_size():
    recipe = Recipe.from_toml(GOOD, "demo.toml")
    assert recipe.resolve("stages.3.x", "conv", 49, 1024, input_hw=(320, 320)).config.act_block_h == 64
    assert recipe.resolve("stages.3.x", "conv", 49, 1024, input_hw=(640, 640)).config.act_block_h == 128


def test_auto_shard_follows_shape_ratio():
    assert resolve_auto_shard(nhw=112 * 112, channels=64) is ShardLayout.HEIGHT
    assert resolve_auto_shard(nhw=28 * 28, channels=736) is ShardLayout.BLOCK
    assert resolve_auto_shard(nhw=7 * 7, channels=1024) is ShardLayout.WIDTH
    recipe = Recipe.from_toml('[defaults]\nshard = "auto"\n')
    assert recipe.resolve("x", "conv", nhw=7 * 7, channels=1024).config.shard is ShardLayout.WIDTH


def test_override_appends_a_winning_rule():
    recipe = Recipe.load("ese_vovnet").override(weight_dtype="bfp8_b", fidelity="LoFi", fp32_acc=False)
    cfg = recipe.resolve("stem.0", "conv", 12544, 64).config
    assert (cfg.weight_dtype, cfg.fidelity, cfg.fp32_acc) == (DType.BFP8_B, Fidelity.LOFI, False)
    assert cfg.act_block_h == 32  # earlier rules still apply where the override is silent


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[defaults]\nfidelity = "HiFi9"\n', ["bad.toml", "[defaults]", "'fidelity'", "'HiFi9'"]),
        ('[[rules]]\nmatch = "stem.*"\nact_block_h = 33\n', ["bad.toml", "rules[0]", "'stem.*'", "'act_block_h'"]),
        ('[[rules]]\nmatch = "a"\n[[rules]]\nmatch = "b"\nsharding = "height"\n', ["rules[1]", "'b'", "'sharding'"]),
        ('[[rules]]\nshard = "height"\n', ["rules[0]", "'match'"]),
        ('[[rules]]\nmatch = "x"\nop = "convolution"\n', ["rules[0]", "'op'", "convolution"]),
        ('[recipe]\ninput_shape = [1, 3, 224]\n', ["[recipe]", "'input_shape'"]),
        ('[defaults]\nfp32_acc = "yes"\n', ["'fp32_acc'", "true or false"]),
        ('[resolutions.big]\nrules = []\n', ["resolutions", "640x640"]),
        ('[rules]\nmatch = 1\n', ["rules", "array of tables"]),
        ("[defaults\n", ["bad.toml", "not valid TOML"]),
    ],
)
def test_errors_name_file_rule_and_field(text, expected):
    with pytest.raises(RecipeError) as err:
        Recipe.from_toml(text, "bad.toml")
    for fragment in expected:
        assert fragment in str(err.value)


def test_unknown_recipe_name_lists_shipped_ones(tmp_path):
    with pytest.raises(RecipeError, match="ese_vovnet"):
        Recipe.load("no_such_recipe")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "missing.toml")


def test_recipe_file_path_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    recipe = Recipe.load(path)
    assert recipe.name == "demo" and recipe.source == str(path)
    assert recipe.to_dict()["rules"][1] == {"match": "stages.3.*", "ops": ["conv"], "fidelity": "HiFi4", "act_block_h": 64}


def _rule_fields(rules):
    return [(r.match, r.overrides, r.ops, r.note) for r in rules]


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipes_survive_writing_and_reading_back(name):
    recipe = Recipe.load(name)
    again = Recipe.from_toml(recipe.to_toml(), "again.toml")
    assert (again.name, again.description, again.input_shape, again.bfp8_guard, again.defaults) == \
        (recipe.name, recipe.description, recipe.input_shape, recipe.bfp8_guard, recipe.defaults)
    assert _rule_fields(again.rules) == _rule_fields(recipe.rules)
    assert {k: _rule_fields(v) for k, v in again.resolutions.items()} == \
        {k: _rule_fields(v) for k, v in recipe.resolutions.items()}


def test_default_act_block_h_undoes_a_wider_rule_and_is_written_back():
    text = GOOD + '\n[[rules]]\nmatch = "stages.3.conv"\nact_block_h = "default"\nnote = "ttnn\'s \\"own\\" choice"\n'
    recipe = Recipe.from_toml(text, "mine.toml")
    assert recipe.resolve("stages.3.other", "conv", 4096, 64).config.act_block_h == 64
    assert recipe.resolve("stages.3.conv", "conv", 4096, 64).config.act_block_h is None
    written = recipe.to_toml()
    assert 'act_block_h = "default"' in written
    again = Recipe.from_toml(written, "again.toml")
    assert _rule_fields(again.rules) == _rule_fields(recipe.rules)
    assert again.rules[-1].note == 'ttnn\'s "own" choice'
    with pytest.raises(RecipeError, match="'act_block_h'.*'default'"):
        Recipe.from_toml('[[rules]]\nmatch = "x"\nact_block_h = "auto"\n', "bad.toml")
