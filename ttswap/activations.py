"""Which torch activation modules and functions map to which device activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttswap.config import Activation

_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Mish: "mish",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish",
}

_FUNCTIONS: dict[object, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.mish: "mish",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.hardsigmoid: "hardsigmoid",
    F.hardswish: "hardswish",
    # tensor methods, matched by name (x.sigmoid() in timm's SEModule)
    "relu": "relu",
    "sigmoid": "sigmoid",
}


def _timm_modules() -> dict[type, str]:
    try:
        from timm.layers import activations as ta
    except ImportError:
        return {}
    # timm's own re-implementations of the same functions, used when torch's are not picked
    names = {"Swish": "silu", "Mish": "mish", "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid",
             "HardSwish": "hardswish", "HardMish": None, "GELU": "gelu"}
    return {getattr(ta, k): v for k, v in names.items() if hasattr(ta, k) and v}


_MODULES.update(_timm_modules())

ACTIVATION_MODULE_TYPES: tuple[type, ...] = (*_MODULES, nn.LeakyReLU, nn.GELU)
ACTIVATION_FUNCTIONS: tuple[object, ...] = (*_FUNCTIONS, F.leaky_relu, F.gelu)


class UnsupportedActivation(ValueError):
    pass


def activation_of_module(module: nn.Module) -> Activation | None:
    """The device activation a torch module computes; None for Identity."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.GELU):
        if module.approximate != "none":
            raise UnsupportedActivation(f"GELU(approximate={module.approximate!r})")
        return Activation("gelu")
    for cls, kind in _MODULES.items():
        if isinstance(module, cls):
            return Activation(kind)
    raise UnsupportedActivation(type(module).__name__)


def activation_of_call(target: object, args: tuple, kwargs: dict) -> Activation:
    if target is F.leaky_relu:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return Activation("leaky_relu", float(slope))
    if target is F.gelu:
        if kwargs.get("approximate", "none") != "none":
            raise UnsupportedActivation("gelu(approximate='tanh')")
        return Activation("gelu")
    if isinstance(target, str) and (args[1:] or kwargs):
        raise UnsupportedActivation(f".{target}() with arguments")
    if target in _FUNCTIONS:
        return Activation(_FUNCTIONS[target])
    raise UnsupportedActivation(getattr(target, "__name__", str(target)))
