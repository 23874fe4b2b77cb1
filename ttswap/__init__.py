"""ttswap: bring PyTorch CNNs to Tenstorrent hardware by swapping FX subgraphs for TT-NN layers.

    converted = ttswap.convert(model, "ese_vovnet", input_shape=(1, 3, 224, 224))
    logits = converted(images)          # torch in, torch out
    print(converted.report)
"""

from ttswap.config import Activation, DType, Fidelity, OpConfig, ShardLayout
from ttswap.compare import compare
from ttswap.converter import ConversionError, ConvertedModel, convert
from ttswap.recipe import Recipe, RecipeError, shipped_recipes
from ttswap.serialize import load

__version__ = "0.1.0"

__all__ = [
    "Activation", "ConversionError", "ConvertedModel", "DType", "Fidelity", "OpConfig", "Recipe", "RecipeError",
    "ShardLayout", "compare", "convert", "load", "shipped_recipes", "__version__",
]
