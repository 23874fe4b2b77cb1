"""Recording: the backend ops one forward pass of a converted model issues, with what they were given.

``record_ops(converted)`` wraps the backend instance's op methods for the duration of a block (only
the ops ``ttswap.tuning.pricing`` has a price for), and forward pre-hooks on the top-level device
layers and transfers say which layer issued each call. Calls keep descriptions of their tensors
(shape, dtype, layout, placement), never payloads.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ttswap.backends.base import Backend, DeviceTensor
from ttswap.modules import Download, TTModule, Upload
from ttswap.tuning.pricing import PRICES

if TYPE_CHECKING:
    from ttswap.converter import ConvertedModel


@dataclass
class OpCall:
    """One backend op call as a forward pass issued it: bound arguments (tensors without payloads),
    the result's description, which earlier calls produced its tensor arguments, and the L1 that
    other live tensors held on each core when it ran (known on the emulated backend, else 0)."""

    op: str
    key: str  # the graph target of the top-level device layer (or transfer) that issued it
    args: dict[str, Any]
    output: Any
    sources: dict[str, Any] = field(default_factory=dict)  # argument -> index of the producing call
    resident_bytes: int = 0


def _describe(value: Any) -> Any:
    if isinstance(value, DeviceTensor):
        return dataclasses.replace(value, payload=None)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, DeviceTensor) for v in value):
        return [_describe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return value


def _device_tensors(value: Any) -> list[DeviceTensor]:
    if isinstance(value, DeviceTensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, DeviceTensor)]
    return []


def _linear_out_features(weights: Any) -> int:
    # TtnnBackend's PreparedLinear says it; EmulatedBackend's PreparedWeights hold the [K, N] matrix
    if hasattr(weights, "out_features"):
        return int(weights.out_features)
    return int(weights.operands["full"].shape[1])


class _Recorder:
    """The state of one recording: the calls so far, which call produced each live tensor, the layer
    running now, and how deep inside another op the backend is (ops a backend issues from inside
    another, such as a conv's unfused activation, are priced as part of that op, the same way for
    every backend)."""

    def __init__(self, backend: Backend):
        self.calls: list[OpCall | None] = []
        self.producer: dict[int, int] = {}  # id of a live output tensor -> index of the call that returned it
        self.layer = "?"  # graph target of the module running now
        self.depth = 0
        self.resident = getattr(backend, "resident", None)  # the emulated backend's live-tensor accounting

    def wrap(self, name: str, method: Callable) -> Callable:
        signature = inspect.signature(method)

        def recorded(*args, **kwargs):
            if self.depth:
                return method(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            tensors = {k: _device_tensors(v) for k, v in bound.arguments.items()}
            held = self.resident.bytes_besides([t for ts in tensors.values() for t in ts]) if self.resident else 0
            sources = {k: [self.producer.get(id(t)) for t in ts] if isinstance(bound.arguments[k], (list, tuple))
                       else self.producer.get(id(ts[0])) for k, ts in tensors.items() if ts}
            index = len(self.calls)
            self.calls.append(None)  # this call's place, before the ops it issues itself
            self.depth += 1
            try:
                out = method(*args, **kwargs)
            finally:
                self.depth -= 1
            described = {k: _describe(v) for k, v in bound.arguments.items() if k != "weights"}
            if name == "linear":
                described["out_features"] = _linear_out_features(bound.arguments["weights"])
            self.calls[index] = OpCall(name, self.layer, described, _describe(out), sources, held)
            if isinstance(out, DeviceTensor):
                self.producer[id(out)] = index
            return out

        return recorded

    def enter(self, key: str) -> None:
        self.layer = key


@contextmanager
def record_ops(converted: "ConvertedModel") -> Iterator[list[OpCall]]:
    """Record every priced backend op the converted model's layers call while the block runs. The
    backend instance's op methods are wrapped for the duration (instance attributes shadow the
    class's) and restored after."""
    backend: Backend = converted.backend
    recorder = _Recorder(backend)
    wrapped = [name for name in PRICES if getattr(backend, name, None) is not None]
    for name in wrapped:
        setattr(backend, name, recorder.wrap(name, getattr(backend, name)))
    hooks = [module.register_forward_pre_hook(lambda _m, _a, key=key: recorder.enter(key))
             for key, module in top_level_modules(converted).items()]
    try:
        yield recorder.calls  # type: ignore[misc]  # every slot is filled by the time a call returns
    finally:
        for name in wrapped:
            delattr(backend, name)
        for hook in hooks:
            hook.remove()


def observe(converted: "ConvertedModel", x: torch.Tensor | None = None) -> list[OpCall]:
    """The backend ops one forward pass of ``converted`` issues (on zeros of its input shape by
    default: shapes and placements do not depend on the values)."""
    x = torch.zeros(converted.input_shape) if x is None else x
    with record_ops(converted) as calls:
        converted(x)
    return calls


def top_level_modules(converted: "ConvertedModel") -> dict[str, torch.nn.Module]:
    """Graph target -> module, in graph order, for the device layers and transfers the graph calls.
    Targets are unique; layer names need not be (a timm ResNet block's conv1 and conv2 are both
    matched as layer ``layer1.0``)."""
    gm = converted.graph_module
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (TTModule, Upload, Download))}


def top_level_layers(converted: "ConvertedModel") -> dict[str, TTModule]:
    """Graph target -> device layer, for the layers the converted graph calls (``device_layers``
    also lists their parts, by layer name)."""
    return {key: m for key, m in top_level_modules(converted).items() if isinstance(m, TTModule)}


__all__ = ["OpCall", "observe", "record_ops", "top_level_layers", "top_level_modules"]
