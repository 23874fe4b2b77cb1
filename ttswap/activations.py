"""Which torch activation modules and functions map to which device activation."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ttswap.config import Activation
from ttswap.trace import call_arg
from ttswap.unsupported import Unsupported

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


def _unsupported(what: str) -> Unsupported:
    return Unsupported(f"activation {what} has no device implementation")


def activation_of_module(module: nn.Module) -> Activation | None:
    """The device activation a torch module computes; None for Identity."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.GELU):
        if module.approximate != "none":
            raise _unsupported(f"GELU(approximate={module.approximate!r})")
        return Activation("gelu")
    for cls, kind in _MODULES.items():
        if isinstance(module, cls):
            return Activation(kind)
    raise _unsupported(type(module).__name__)


def activation_of_call(node: fx.Node) -> Activation:
    """The device activation a traced call_function or call_method node computes."""
    target = node.target
    if target is F.leaky_relu:
        return Activation("leaky_relu", float(call_arg(node, 1, "negative_slope", 0.01)))
    if target is F.gelu:
        if call_arg(node, 1, "approximate", "none") != "none":
            raise _unsupported("gelu(approximate='tanh')")
        return Activation("gelu")
    if isinstance(target, str) and (node.args[1:] or node.kwargs):
        raise _unsupported(f".{target}() with arguments")
    if target in _FUNCTIONS:
        return Activation(_FUNCTIONS[target])
    raise _unsupported(getattr(target, "__name__", str(target)))


def activation_of(gm: fx.GraphModule, node: fx.Node) -> Activation | None:
    """The device activation of a matched activation node, a module or a call."""
    if node.op == "call_module":
        return activation_of_module(gm.get_submodule(node.target))
    return activation_of_call(node)
