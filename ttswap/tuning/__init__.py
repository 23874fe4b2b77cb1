"""Tuning, a layer above the converter: the Wormhole n150 cost model and the "auto" recipe.

    hardware.py   the device's constants (published, fitted, assumed)
    pricing.py    the device ops each backend call stands for, and their time
    recording.py  the backend calls one forward pass of a converted model issues
    report.py     those calls priced per layer: ``estimate(converted)``
    samples.py    the inputs the auto recipe tunes and validates on
    auto.py       the auto recipe: ``tune`` and ``AutoRecipe``

Everything here depends on the converter, never the reverse: ``convert(model, "auto")`` reaches the
tuner through ``ttswap.recipe``'s factory registry, which this package fills when ``ttswap`` is imported.
"""

from ttswap.recipe import register_recipe_factory
from ttswap.tuning.auto import LADDER, AutoRecipe, Rung, Tuning, tune
from ttswap.tuning.hardware import N150, WormholeN150
from ttswap.tuning.report import CostReport, LayerCost, cost_report, estimate

register_recipe_factory("auto", AutoRecipe)

__all__ = ["LADDER", "N150", "AutoRecipe", "CostReport", "LayerCost", "Rung", "Tuning", "WormholeN150",
           "cost_report", "estimate", "tune"]
