"""ttswap: bring PyTorch CNNs to Tenstorrent hardware by swapping FX subgraphs for TT-NN layers.

    converted = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 224, 224))
    logits = converted(images)          # torch in, torch out
    print(converted.report)
"""

from ttswap._version import __version__
from ttswap.config import Activation, DType, Fidelity, OpConfig, ShardLayout
from ttswap.compare import compare
from ttswap.converter import ConversionError, ConvertedModel, convert
from ttswap.recipe import Recipe, RecipeError, shipped_recipes
from ttswap.serialize import load
from ttswap.tuning import AutoRecipe, estimate  # also registers the "auto" recipe


__all__ = [
    "Activation", "ConversionError", "ConvertedModel", "DType", "Fidelity", "OpConfig", "Recipe", "RecipeError",
    "ShardLayout", "AutoRecipe", "compare", "convert", "estimate", "load", "shipped_recipes", "__version__",
]
